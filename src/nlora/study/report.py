"""``nlora study report STUDY``: the final cells' metrics as the paper's Table 1, with error
bars, in Markdown, CSV and LaTeX, a figure, and paired differences against a reference.

For each method, metric and order: mean ± half-width of the 95 % t interval over seeds. For
each group of orders (the paper's "avg" columns): each seed's values averaged over the
group's orders first (orders as fixed effects), then the interval over seeds; only seeds
with every order of the group finished count (n says how many). Paired differences: method
minus reference on the same (order, seed), mean ± 95 % t interval and the paired t-test's
two-sided p; for a group, each seed's difference averaged over the group's orders.
Cells not finished are listed, never dropped silently.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from nlora.errors import ConfigError
from nlora.io import write_text_atomic
from nlora.study.aggregate import run_metrics
from nlora.study.plan import INDEX, is_finished
from nlora.study.spec import METRICS, read_spec
from nlora.study.stats import Interval, mean_interval, paired_test

REPORT = "report"
CAPTION = ("mean ± half-width of the 95 % Student t interval over seeds (exact t quantile, "
           "df = n - 1); n: seeds; an average over orders averages each seed over the orders "
           "first. No ± with n = 1.")

Values = dict[str, dict[str, dict[int, dict[str, float | None]]]]  # method/order/seed/metric


def collect(study: Path) -> tuple[Any, Values, list[dict[str, Any]]]:
    """The spec, every finished final cell's metrics, and the cells not finished."""
    study = Path(study)
    if not (study / INDEX).is_file():
        raise ConfigError(f"{study} is not an nlora study folder (no {INDEX})")
    index = json.loads((study / INDEX).read_text(encoding="utf-8"))
    spec = read_spec(study / "spec.yaml", check=False)
    values: Values = {}
    missing = []
    for cell_id, cell in index["cells"].items():
        if cell["stage"] != "final":
            continue
        folder = study / cell_id  # not the recorded path: a study folder may be moved
        if not is_finished(folder):
            status = cell.get("status", "pending")  # the folder decides, not the record
            missing.append({"cell": cell_id, "status": "pending" if status == "finished"
                            else status, "log": cell.get("log")})
            continue
        values.setdefault(cell["method"], {}).setdefault(cell["order"], {})[cell["seed"]] = (
            run_metrics(folder, spec.report_metrics))
    return spec, values, missing


def _per_seed(values: Values, method: str, orders: list[str], metric: str) -> dict[int, float]:
    """Each seed's metric averaged over ``orders``; seeds missing an order are left out."""
    runs = values.get(method, {})
    seeds = set.intersection(*(set(runs.get(o, {})) for o in orders)) if orders else set()
    out = {}
    for seed in sorted(seeds):
        xs = [runs[o][seed].get(metric) for o in orders]
        if all(x is not None for x in xs):
            out[seed] = sum(xs) / len(xs)
    return out


def tables(spec: Any, values: Values) -> dict[str, Any]:
    """rows: one per (metric, method, column); diffs: one per (metric, method, column)."""
    columns = [(o.name, [o.name]) for o in spec.orders]
    columns += [(g, members) for g, members in spec.groups.items()]
    rows, diffs = [], []
    for metric in spec.report_metrics:
        for method in spec.methods:
            for column, orders in columns:
                seeds = _per_seed(values, method.label, orders, metric)
                interval = mean_interval(list(seeds.values()))
                rows.append({"metric": metric, "method": method.label, "column": column,
                             "orders": orders, "mean": interval.mean,
                             "half_width": interval.half_width, "n": interval.n,
                             "per_seed": seeds})
                ref = spec.reference
                if ref is None or ref == method.label:
                    continue
                theirs = _per_seed(values, ref, orders, metric)
                common = sorted(set(seeds) & set(theirs))
                test = paired_test([seeds[s] for s in common], [theirs[s] for s in common])
                diffs.append({"metric": metric, "method": method.label, "reference": ref,
                              "column": column, "mean": test.difference.mean,
                              "half_width": test.difference.half_width,
                              "n": test.difference.n, "t": test.t, "p": test.p})
    return {"columns": [c for c, _ in columns], "rows": rows, "diffs": diffs}


def _cell(row: dict[str, Any]) -> str:
    return Interval(row["mean"], row["half_width"], row["n"]).text(1)


def _p(p: float | None) -> str:
    return "-" if p is None else ("< 0.001" if p < 0.001 else f"{p:.3f}")


def markdown(spec: Any, result: dict[str, Any], missing: list[dict[str, Any]]) -> str:
    cols = result["columns"]
    lines = [f"# Study {spec.name}", "", CAPTION, ""]
    for metric in spec.report_metrics:
        better = {"max": " (higher is better)", "min": " (lower is better)", "": ""}[
            METRICS[metric]]
        lines += [f"## {metric}{better}", "",
                  "| method | " + " | ".join(cols) + " | n |",
                  "|---|" + "---:|" * len(cols) + "---:|"]
        for method in spec.methods:
            mine = [r for r in result["rows"] if r["metric"] == metric
                    and r["method"] == method.label]
            n = max((r["n"] for r in mine), default=0)
            lines.append(f"| {method.label} | " + " | ".join(_cell(r) for r in mine)
                         + f" | {n} |")
        lines.append("")
    if result["diffs"]:
        lines += [f"## Paired differences: method − {spec.reference}, same (order, seed)", "",
                  "mean difference ± 95 % t half-width (n pairs), two-sided paired t-test p; "
                  "an average column pairs each seed's mean over its orders.", "",
                  "| metric | method | column | difference | n | p |",
                  "|---|---|---|---:|---:|---:|"]
        for d in result["diffs"]:
            lines.append(f"| {d['metric']} | {d['method']} | {d['column']} | {_cell(d)} | "
                         f"{d['n']} | {_p(d['p'])} |")
        lines.append("")
    lines += ["## Cells not in the table", ""]
    if missing:
        lines += [f"- {m['cell']}: {m['status']} (log {m['log']})" for m in missing]
    else:
        lines.append("none: every final cell finished")
    return "\n".join(lines) + "\n"


def to_csv(result: dict[str, Any]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["metric", "method", "column", "mean", "ci95_half_width", "n",
                     "per_seed", "reference", "p_paired"])
    for r in result["rows"]:
        writer.writerow([r["metric"], r["method"], r["column"], r["mean"], r["half_width"],
                         r["n"], json.dumps(r["per_seed"]), "", ""])
    for d in result["diffs"]:
        writer.writerow([d["metric"], f"{d['method']} - {d['reference']}", d["column"],
                         d["mean"], d["half_width"], d["n"], "", d["reference"], d["p"]])
    return buffer.getvalue()


def latex(spec: Any, result: dict[str, Any]) -> str:
    """One tabular per metric, methods as rows, orders and averages as columns (Table 1)."""
    cols = result["columns"]
    out = []
    for metric in spec.report_metrics:
        out += [f"% {metric}: {CAPTION}", "\\begin{tabular}{l" + "c" * len(cols) + "}",
                "\\toprule", "Method & " + " & ".join(c.replace("_", "\\_") for c in cols)
                + " \\\\", "\\midrule"]
        for method in spec.methods:
            mine = [r for r in result["rows"] if r["metric"] == metric
                    and r["method"] == method.label]
            cells = [_cell(r).replace("±", "$\\pm$") for r in mine]
            out.append(method.label.replace("_", "\\_") + " & " + " & ".join(cells) + " \\\\")
        out += ["\\bottomrule", "\\end{tabular}", ""]
    return "\n".join(out)


def figure(spec: Any, result: dict[str, Any], path: Path) -> None:
    """Means with 95 % t intervals per method, one panel per metric (the last group)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    column = list(spec.groups)[-1]
    metrics = spec.report_metrics
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        rows = [r for r in result["rows"] if r["metric"] == metric and r["column"] == column]
        xs = list(range(len(rows)))
        means = [r["mean"] if r["mean"] is not None else float("nan") for r in rows]
        errs = [r["half_width"] or 0.0 for r in rows]
        ax.errorbar(xs, means, yerr=errs, fmt="o", capsize=4)
        ax.set_xticks(xs, [r["method"] for r in rows], rotation=30, ha="right")
        ax.set_title(f"{metric} ({column})")
    fig.suptitle("mean ± 95 % t interval over seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_study_report(study: Path | str) -> dict[str, Any]:
    """STUDY/report/{table.md, table.csv, table.tex, means.png}; returns the tables."""
    study = Path(study)
    spec, values, missing = collect(study)
    result = tables(spec, values)
    result["missing"] = missing
    folder = study / REPORT
    folder.mkdir(parents=True, exist_ok=True)
    text = markdown(spec, result, missing)
    write_text_atomic(folder / "table.md", text)
    write_text_atomic(folder / "table.csv", to_csv(result))
    write_text_atomic(folder / "table.tex", latex(spec, result))
    figure(spec, result, folder / "means.png")
    result["markdown"] = text
    result["folder"] = str(folder)
    return result
