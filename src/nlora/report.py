"""A Markdown report with figures on one or more run folders (``nlora report``).

``write_report(runs, out)`` writes ``report.md``, PNG figures and ``metrics.json`` (every metric
per run, module, task and pair) into ``out``. Several runs in one report are compared side by
side.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nlora import figures
from nlora.analysis import analyse_run, is_cumulative_adapter
from nlora.errors import ConfigError
from nlora.param_metrics import (
    DEFAULT_AWOM_NORM,
    DEFAULT_MODE,
    DEFAULT_THRESHOLD,
    MatrixNorm,
    ThresholdMode,
)
from nlora.rundir import load_task_updates, refuse_output_in_run, require_run_dir
from nlora.scoring import METRIC_TITLES


@dataclass
class ReportOptions:
    threshold: float = DEFAULT_THRESHOLD  # |x| > threshold (x max|ΔW| when relative): non-zero
    threshold_mode: ThresholdMode = DEFAULT_MODE
    awom_norm: MatrixNorm = DEFAULT_AWOM_NORM
    module: str | None = None  # collision map's module (regex); None: the first adapted one
    pair: tuple[int, int] = (1, 2)  # tasks (1-based) compared in the collision map
    subspace_task: int = 1  # task (1-based) whose subspace use per layer is plotted
    crop: int = 96  # collision maps show the top-left crop x crop block (0: all)


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        if x != 0 and (abs(x) < 10 ** -digits or abs(x) >= 1e5):
            return f"{x:.2e}"
        return f"{x:.{digits}f}"
    return str(x)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) if not isinstance(v, str) else v for v in row) + " |"
              for row in rows]
    return "\n".join(lines)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "run"


def _unique_names(runs: list[Path]) -> list[str]:
    names = [p.resolve().name for p in runs]
    out = []
    for p, name in zip(runs, names, strict=True):
        if names.count(name) > 1:
            name = f"{p.resolve().parent.name}/{name}"
        out.append(name)
    while len(set(out)) < len(out):  # still ambiguous: number them
        out = [f"{k + 1}:{n}" for k, n in enumerate(out)]
    return out


def _pick_module(modules: list[str], pattern: str | None) -> str | None:
    if not modules:
        return None
    if pattern is None:
        return modules[0]
    for m in modules:
        if re.search(pattern, m):
            return m
    return None


NOT_APPLICABLE = "n/a"  # a metric that does not exist for the run's method


def _parameter_cell(r: dict[str, Any], key: str, value: Any) -> Any:
    """n/a for runs without a weight update (prompts, full fine-tuning) and for metrics the
    method's adapters do not define (OO of OSF)."""
    if r["parameter"] is None or key in r.get("undefined", ()):
        return NOT_APPLICABLE
    return value


def _summary_rows(results: list[dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for r in results:
        s, p = r["scores"], (r["parameter"] or {}).get("summary", {})
        params = [_parameter_cell(r, key, p.get(key)) for key in
                  ("OO", "AWOM", "GSR", "density", "density_exact", "ACR", "ACR_exact",
                   "subspace_use", "nuclear_norm")]
        rows.append([r["name"], str(r["method"]), str(len(r["tasks"])),
                     s.get("AA"), s.get("AA_pooled"), s.get("F.Ra"), s.get("BWT"), s.get("FWT"),
                     *params,
                     _unseen_cell(r)])
    return rows


def _unseen_cell(r: dict[str, Any]) -> str:
    if not r["unseen"]:
        return "–"
    return ", ".join(f"{t}: {_fmt(v['final'], 1)}" for t, v in r["unseen"].items())


def _metric_note(r: dict[str, Any]) -> str:
    """Which metric scores each task of a run, and the mean final exact match beside."""
    by_metric: dict[str, list[str]] = {}
    for k, metric in enumerate(r["metrics"]):
        by_metric.setdefault(metric, []).append(str(k + 1))
    parts = [f"{METRIC_TITLES.get(m, m)} for task{'s' if len(ks) > 1 else ''} {', '.join(ks)}"
             for m, ks in by_metric.items()]
    em = r["scores"].get("EM")
    return "; ".join(parts) + (f"; mean final exact match {_fmt(em, 1)}" if em is not None
                               else "")


def _square_table(m: list[list[Any]], tasks: list[str]) -> str:
    header = ["task"] + [str(k + 1) for k in range(len(m))]
    rows = [[f"{i + 1}. {tasks[i] if i < len(tasks) else ''}"] + list(row)
            for i, row in enumerate(m)]
    return _table(header, rows)


def write_report(
    runs: Sequence[Path | str], out: Path | str, options: ReportOptions | None = None
) -> Path:
    """Analyse ``runs`` and write the report into the folder ``out``; return report.md's path."""
    opts = options or ReportOptions()
    runs = [require_run_dir(p) for p in runs]  # only finished tasks are read from each
    out = Path(out)
    refuse_output_in_run(out, runs)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; the report needs a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create --out {out}: {err.strerror}") from None
    names = _unique_names(runs)
    results = []
    for path, name in zip(runs, names, strict=True):
        r = analyse_run(path, threshold=opts.threshold, mode=opts.threshold_mode,
                        awom_norm=opts.awom_norm)
        r["name"] = name
        results.append(r)
    analysed = [r for r in results if r["parameter"]]

    md = [f"# nlora report: {', '.join(names)}", ""]
    thr = f"{opts.threshold:g}" + (" × max|ΔW| per matrix" if opts.threshold_mode == "relative"
                                    else " (absolute)")
    thr_short = f"{opts.threshold:g}" + (" rel" if opts.threshold_mode == "relative" else " abs")
    md += [
        "Definitions, with the paper's equation numbers and the choices where it is ambiguous, "
        "are in `docs/metrics.md`. Settings: an entry of ΔW counts as non-zero when "
        f"|x| > {thr}; AWOM uses the {'Frobenius' if opts.awom_norm == 'fro' else 'spectral'} "
        "norm. OO and AWOM are the last task against all earlier ones, summed over modules; "
        "GSR is each task's whole adapter taken as one vector, averaged over tasks (lower = "
        "sparser); subspace use is ‖ΔW‖\\*/‖ΔW‖₂ ≤ rank(ΔW) (≤ r for a fresh adapter per task, "
        "≤ 2r for SeqLoRA's task t, adapter t minus adapter t-1), averaged over modules and "
        "tasks, with "
        "the raw nuclear norm ‖ΔW‖\\* beside it. Density and ACR are given at the threshold "
        "and at exactly zero (**exact**: |x| > 0), so exactly sparse updates are judged on "
        "their true zeros; GSR has no threshold. OO is defined on a task's own LoRA factor A: "
        "shown as – for updates saved as sparse deltas (pruned or collision-free runs) and as "
        "n/a for SeqLoRA (task t's update, adapter t minus adapter t-1, has no A of its own) "
        "and OSF.",
        "",
        "## Summary",
        "",
        _table(["run", "method", "T", "AA", "pooled AA", "F.Ra", "BWT", "FWT", "OO", "AWOM",
                "GSR", f"density (τ {thr_short})", "density (exact)", f"ACR (τ {thr_short})",
                "ACR (exact)", "subspace use", "‖ΔW‖*", "unseen (final)"],
               _summary_rows(results)),
        "",
    ]
    scored = [(r["name"], _metric_note(r)) for r in results if set(r["metrics"]) != {"accuracy"}]
    if scored:  # AA, F.Ra, BWT and FWT are then over each task's own metric
        md += ["Scores not in accuracy (AA, F.Ra, BWT and FWT are over each task's own "
               "metric):", ""] + [f"- **{name}**: {n}" for name, n in scored] + [""]
    notes = [(r["name"], n) for r in results for n in r["notes"]]
    if notes:
        md += ["Notes:", ""] + [f"- **{name}**: {n}" for name, n in notes] + [""]

    if analysed:
        md += ["## Comparisons", ""]
        figures.gsr_vs_acr(analysed, out / "gsr_vs_acr.png")
        md += ["### Sparsity, collisions and forgetting (Fig. 5)", "",
               "![GSR vs ACR](gsr_vs_acr.png)", ""]
        figures.acr_curves(analysed, out / "acr_curves.png")
        md += ["### ACR against the non-zero threshold", "", "![ACR curves](acr_curves.png)", ""]
        task = opts.subspace_task - 1
        figures.subspace_use_per_layer(analysed, out / "subspace_use.png", task=task)
        md += [f"### Subspace use per layer, task {opts.subspace_task} (Fig. 3)", "",
               "![subspace use](subspace_use.png)", ""]
    if any(r["unseen"] for r in results):
        figures.unseen_tasks(results, out / "unseen.png")
        md += ["### Unseen-task generalisation (Fig. 4)", "", "![unseen](unseen.png)", ""]

    for r in results:
        slug = _slug(r["name"])
        md += [f"## Run {r['name']}", "",
               f"`{r['dir']}` — method {r['method']}, model {r['model']}, "
               f"tasks: {' → '.join(r['tasks'])}", ""]
        md += [f"- {n}" for n in r["notes"]] + ([""] if r["notes"] else [])
        if set(r["metrics"]) != {"accuracy"}:
            md += [_metric_note(r), ""]
        if r["accuracy"]:
            figures.accuracy_heatmap(r, out / f"{slug}_accuracy.png")
            md += [f"![accuracy matrix]({slug}_accuracy.png)", ""]
        p = r["parameter"]
        if not p:
            continue
        md += _collision_section(r, opts, out, slug)
        pt = p["per_task"]
        rows = [[f"{k + 1}. {r['tasks'][k] if k < len(r['tasks']) else ''}",
                 pt["gsr"][k], pt["density"][k], pt["density_exact"][k], pt["subspace_use"][k],
                 pt["nuclear_norm"][k], _parameter_cell(r, "OO", pt["oo"][k]), pt["awom"][k]]
                for k in range(len(pt["gsr"]))]
        md += ["Per task (OO_t, AWOM_t: task t against all earlier tasks, summed over modules):",
               "",
               _table(["task", "GSR", "density", "density (exact)", "subspace use", "‖ΔW‖*",
                       "OO_t", "AWOM_t"], rows), ""]
        if len(pt["gsr"]) > 1:
            for key, title in [("cr", "Collision rate CR_ij (eq. 11, pooled over modules)"),
                               ("cr_exact", "Collision rate CR_ij at exactly zero (|x| > 0)"),
                               ("oo", "‖A_iᵀA_j‖²_F summed over modules (eq. 7 terms)"),
                               ("awom", "‖ΔW_jᵀΔW_i‖ summed over modules (eq. 8 terms)")]:
                if key.upper() in r.get("undefined", ()):
                    md += [f"{title}: n/a for {r['method']}.", ""]
                    continue
                md += [f"{title}:", "", _square_table(p["pairs"][key], r["tasks"]), ""]
        md += [f"Per-module values are in `metrics.json` ({len(p['modules'])} modules).", ""]

    metrics = json.dumps(results, indent=1, ensure_ascii=False)
    (out / "metrics.json").write_text(metrics, encoding="utf-8")
    (out / "report.md").write_text("\n".join(md), encoding="utf-8")
    return out / "report.md"


def _collision_section(
    r: dict[str, Any], opts: ReportOptions, out: Path, slug: str
) -> list[str]:
    p = r["parameter"]
    i, j = (k - 1 for k in opts.pair)
    t = len(p["per_task"]["gsr"])
    if t < 2:
        return []
    if not (0 <= i < t and 0 <= j < t and i != j):
        return [f"- collision map skipped: --pair {opts.pair[0]} {opts.pair[1]} is not a pair of "
                f"the {t} tasks with adapters", ""]
    module = _pick_module(p["modules"], opts.module)
    if module is None:
        return [f"- collision map skipped: no module matches {opts.module!r}", ""]
    updates = load_task_updates(r["dir"], cumulative=is_cumulative_adapter(r["method_name"]))
    dw_i, dw_j = updates[i][module].delta(), updates[j][module].delta()
    labels = (f"task {i + 1} ({r['tasks'][i].split('/')[-1]})",
              f"task {j + 1} ({r['tasks'][j].split('/')[-1]})")
    name = f"{slug}_collision.png"
    figures.collision_map(dw_i, dw_j, out / name, opts.threshold, opts.threshold_mode,
                          labels=labels, title=f"{r['name']}: {module}",
                          crop=opts.crop or None)
    cr = p["per_module"][module]["cr"][i][j]
    return [f"Collision map (Fig. 2), `{module}`, CR = {_fmt(cr)}:", "",
            f"![collision map]({name})", ""]
