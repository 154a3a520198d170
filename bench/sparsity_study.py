"""Sparsity study (issue 9): N-LoRA (paper default and the exact-sparsity variants) against
O-LoRA, O-LoRA + N-LoRA, IncLoRA and SeqLoRA on the same real tasks, several seeds.

Every (variant, seed) is an ordinary nlora run folder under ``--out``, so rerunning the
same command resumes: finished runs are skipped, an interrupted one continues after its last
finished task. At the end the script analyses every run (``nlora.analysis``) and writes
``study.json`` and ``study.md`` (mean ± 95 % confidence interval over seeds, t-distribution)
into the study folder, and a copy of both under bench/results/.

    # the full study (test split, generate scoring; the command docs/results.md quotes)
    .venv/bin/python bench/sparsity_study.py --out runs/sparsity-study
    # settings sweep on a validation split carved from TRAIN rows (rank scoring)
    .venv/bin/python bench/sparsity_study.py --split validation --eval-mode rank \\
        --variants nlora,nlora-prox --out runs/sparsity-pilot
    # a few minutes, end to end, to check the machinery
    .venv/bin/python bench/sparsity_study.py --quick

``--split validation`` never reads the test files: each task's train.json is split once
(seeded) into a held-out part that plays the test set and the rest, which training samples
from, in ``<out>/data-validation``. Choose settings there, report on ``--split test``.

Variants: the built-in table below (``--variants`` picks some, in that order), or inline
``name:key=value:key=value`` with RunConfig fields (e.g. ``p3:method=nlora:prox_lambda=0.3``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from nlora.analysis import analyse_run
from nlora.presets import make_config
from nlora.rundir import finished_task_dirs
from nlora.study.stats import mean_interval

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DEFAULT_DATA = Path(os.environ.get("NLORA_DATA", REPO.parent / "shared" / "CL_Benchmark"))

# The tasks: three categories, short prompts (median 49 / 101 / 78 tokens with SmolLM2's
# tokenizer), so that 3 seeds x 8 variants fit in about 2 hours on 2 CPU cores (two
# processes of one thread each, split by --variants). At 25 steps QQP stays at its
# majority-class rate for every method (docs/results.md); --tasks swaps it.
TASKS = ["SC/SST-2", "TC/agnews", "QQP/QQP"]

# Shared settings, fixed before the study and not tuned (docs/results.md "Settings").
COMMON: dict[str, Any] = {
    "train_per_task": 200,
    "test_per_task": 200,
    "epochs": 1,
    "batch_size": 8,
    "learning_rate": 1e-3,
    "eval_batch_size": 32,
}

# name -> RunConfig options. The sparse variants' values were set a priori (prune to the
# issue's 5 % target; prox 0.3), not tuned: docs/results.md "Settings".
VARIANTS: dict[str, dict[str, Any]] = {
    "nlora": {"method": "nlora"},  # the paper's objective, nlora's default λ
    "nlora-prox": {"method": "nlora", "prox_lambda": 0.3},
    "nlora-prune": {"method": "nlora", "prune_density": 0.05},
    "nlora-cf": {"method": "nlora", "prune_density": 0.05, "collision_free": True},
    "olora": {"method": "olora"},
    "olora+nlora": {"method": "olora+nlora"},
    "inclora": {"method": "inclora"},
    "seqlora": {"method": "seqlora"},
}

# --quick: one optimiser step and 8 test rows per task, one seed, rank scoring
QUICK = {"train_per_task": 8, "test_per_task": 8, "epochs": 1, "batch_size": 8,
         "max_source_length": 128}

# column -> (where in analyse_run's result, label)
COLUMNS: list[tuple[str, str]] = [
    ("AA", "AA"),
    ("F.Ra", "F.Ra"),
    ("BWT", "BWT"),
    ("density_exact", "density (exact)"),
    ("density", "density (τ 0.01 rel)"),
    ("ACR_exact", "ACR (exact)"),
    ("ACR", "ACR (τ 0.01 rel)"),
    ("OO", "OO"),
    ("subspace_use", "subspace use"),
]


def mean_ci(values: list[float]) -> dict[str, Any]:
    """Mean and half-width of the 95 % t confidence interval (exact t quantile for any df;
    None where undefined), from nlora's one statistics module."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    interval = mean_interval(values)
    return {"mean": interval.mean, "ci95": interval.half_width, "n": interval.n,
            "values": values}


def parse_variants(text: str | None) -> dict[str, dict[str, Any]]:
    if not text:
        return dict(VARIANTS)
    chosen = {}
    for item in [x.strip() for x in text.split(",") if x.strip()]:
        if ":" in item:
            name, *pairs = item.split(":")
            options = {}
            for pair in pairs:
                key, sep, value = pair.partition("=")
                if not sep:
                    sys.exit(f"sparsity_study: variant {item!r}: expected key=value, got {pair!r}")
                options[key] = yaml.safe_load(value)
            chosen[name] = options
        elif item in VARIANTS:
            chosen[item] = VARIANTS[item]
        else:
            sys.exit(f"sparsity_study: unknown variant {item!r}; built in: {', '.join(VARIANTS)}")
    return chosen


def validation_data(source: Path, tasks: list[str], folder: Path, held_out: int,
                    seed: int = 1234) -> Path:
    """A CL_Benchmark-style folder whose test.json is ``held_out`` rows of each task's
    train.json and whose train.json is the rest (the real test files are never read)."""
    for name in tasks:
        target = folder / name
        if (target / "test.json").is_file():
            continue
        rows = json.loads((source / name / "train.json").read_text(encoding="utf-8"))
        order = list(range(len(rows)))
        random.Random(f"{seed}/{name}").shuffle(order)
        if len(rows) < 2 * held_out:
            sys.exit(f"sparsity_study: {name} has {len(rows)} training rows, too few to hold "
                     f"out {held_out}")
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(source / name / "labels.json", target / "labels.json")
        rest = [rows[i] for i in order[held_out:]]
        held = [rows[i] for i in order[:held_out]]
        (target / "train.json").write_text(json.dumps(rest), encoding="utf-8")
        (target / "test.json").write_text(json.dumps(held), encoding="utf-8")
    return folder


def run_folder(out: Path, variant: str, seed: int) -> Path:
    return out / variant / f"seed{seed}"


def is_finished(folder: Path, n_tasks: int) -> bool:
    return len(finished_task_dirs(folder)) == n_tasks and (folder / "metrics.json").is_file()


def run_seconds(folder: Path) -> float:
    """Training + evaluation seconds recorded in the run's done.json files."""
    total = 0.0
    for task in finished_task_dirs(folder):
        done = json.loads((task / "done.json").read_text(encoding="utf-8"))
        total += done["train"]["seconds"] + done.get("eval_seconds", 0.0)
    return total


def summarise(folder: Path) -> dict[str, Any]:
    r = analyse_run(folder, progress=False)
    p = (r["parameter"] or {}).get("summary", {})
    row = {k: r["scores"].get(k) for k in ("AA", "F.Ra", "BWT")}
    row.update({k: p.get(k) for k in ("density_exact", "density", "ACR_exact", "ACR", "OO",
                                      "AWOM", "GSR", "subspace_use")})
    row["per_task_density_exact"] = (r["parameter"] or {}).get("per_task", {}).get(
        "density_exact")
    row["accuracy"] = r["accuracy"]
    row["seconds"] = run_seconds(folder)
    row["method_info"] = [
        json.loads((t / "done.json").read_text(encoding="utf-8")).get("method")
        for t in finished_task_dirs(folder)
    ]
    return row


def fmt(cell: dict[str, Any], key: str) -> str:
    mean, ci = cell["mean"], cell["ci95"]
    if mean is None:
        return "–"
    digits = 1 if key in ("AA", "F.Ra", "BWT") else 3
    if key in ("density_exact", "density", "ACR_exact", "ACR") and 0 < abs(mean) < 1e-3:
        text = f"{mean:.1e}" + (f" ± {ci:.1e}" if ci is not None else "")
        return text
    if key == "OO" and abs(mean) >= 100:
        return f"{mean:.3g}" + (f" ± {ci:.2g}" if ci is not None else "")
    return f"{mean:.{digits}f}" + (f" ± {ci:.{digits}f}" if ci is not None else "")


def targets(table: dict[str, dict[str, Any]]) -> list[str]:
    """The issue's three targets, checked on the table (only where the rows exist)."""
    lines = []

    def get(v: str, k: str) -> tuple[float | None, float]:
        cell = table.get(v, {}).get(k) or {}
        return cell.get("mean"), cell.get("ci95") or 0.0

    inc_aa, inc_ci = get("inclora", "AA")
    for v in [v for v in table if v.startswith("nlora")]:
        dens, _ = get(v, "density_exact")
        aa, _ = get(v, "AA")
        if None in (dens, aa, inc_aa):
            continue
        # round(P·out·in) kept entries per module can exceed P by a fraction of one entry
        ok = round(dens, 4) <= 0.05 and aa >= inc_aa - inc_ci
        lines.append(f"- {v}: density (exact) {dens:.5f} ≤ 0.05 and AA {aa:.1f} within IncLoRA's "
                     f"CI ({inc_aa:.1f} ± {inc_ci:.1f}, i.e. ≥ {inc_aa - inc_ci:.1f}): "
                     f"**{'met' if ok else 'missed'}**")
    for key, label in (("ACR_exact", "exact"), ("ACR", "τ 0.01 rel")):
        for v in [v for v in table if v.startswith("nlora")]:
            acr, _ = get(v, key)
            refs = {r: get(r, key)[0] for r in ("olora", "inclora")}
            if acr is None or any(x is None for x in refs.values()):
                continue
            ok = all(acr <= x / 20 for x in refs.values())
            lines.append(f"- {v}: ACR ({label}) {acr:.2e} ≤ 1/20 of O-LoRA's {refs['olora']:.2e} "
                         f"and IncLoRA's {refs['inclora']:.2e}: **{'met' if ok else 'missed'}**")
    seq, seq_ci = get("seqlora", "F.Ra")
    for v in [v for v in table if v.startswith("nlora")]:
        fra, ci = get(v, "F.Ra")
        if fra is None or seq is None:
            continue
        ok = fra + ci < seq - seq_ci
        lines.append(f"- {v}: F.Ra {fra:.1f} ± {ci:.1f} below SeqLoRA's {seq:.1f} ± {seq_ci:.1f} "
                     f"beyond the CIs: **{'met' if ok else 'missed'}**")
    return lines


def markdown(study: dict[str, Any]) -> str:
    table, cfg = study["table"], study["settings"]
    head = ["variant", "options", "n"] + [label for _, label in COLUMNS] + ["min/run"]
    lines = [
        f"# Sparsity study ({cfg['split']} split, {cfg['eval_mode']} scoring)", "",
        f"Tasks {' → '.join(cfg['tasks'])}; {cfg['common']['train_per_task']} training and "
        f"{cfg['common']['test_per_task']} test rows per task; seeds {cfg['seeds']}; "
        f"model {cfg['model']}. Mean ± 95 % CI (t-distribution) over seeds. AA, F.Ra, BWT "
        "in %. Density and ACR at exactly zero (|x| > 0) and at 1 % of each matrix's max; OO "
        "is – for updates saved as sparse deltas (not LoRA factors) and n/a for SeqLoRA (its "
        "per-task update, adapter t minus adapter t-1, has no A of its own); its other "
        "parameter metrics are on those per-task updates.", "",
        "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
    ]
    for name, row in table.items():
        options = ", ".join(f"{k}={v}" for k, v in study["variants"][name].items())
        minutes = row["seconds"]["mean"] / 60 if row["seconds"]["mean"] else None
        cells = [name, options, str(row["AA"]["n"])]
        cells += [fmt(row[k], k) for k, _ in COLUMNS]
        cells.append(f"{minutes:.1f}" if minutes else "–")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Targets of the issue:", ""] + (targets(table) or ["- (rows missing)"])
    lines += ["", f"Command: `{study['command']}`",
              f"Recorded run time (train + eval) of all runs: "
              f"{study['total_seconds'] / 3600:.2f} h; wall time of this invocation "
              f"{study['wall_seconds'] / 3600:.2f} h.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="CL_Benchmark folder (default $NLORA_DATA, else "
                        "../shared/CL_Benchmark)")
    parser.add_argument("--out", type=Path, default=None,
                        help="study folder (default runs/sparsity-study, or "
                        "runs/sparsity-quick with --quick)")
    parser.add_argument("--split", choices=["test", "validation"], default="test")
    parser.add_argument("--eval-mode", choices=["generate", "rank"], default="generate")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--variants", default=None,
                        help=f"comma list of {', '.join(VARIANTS)} or inline name:key=value:...")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a shared setting for every run, e.g. epochs=2")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--quick", action="store_true",
                        help="8 rows per task, one seed, rank scoring: checks the machinery")
    parser.add_argument("--no-report", action="store_true",
                        help="skip `nlora report` on the first seed's runs")
    parser.add_argument("--analyse-only", action="store_true",
                        help="only analyse the runs already finished; train nothing")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    common = dict(COMMON)
    seeds = [int(s) for s in args.seeds.split(",")]
    eval_mode = args.eval_mode
    if args.quick:
        common.update(QUICK)
        seeds = seeds[:1]
        eval_mode = "rank"
    for item in args.set:
        key, _, value = item.partition("=")
        common[key] = yaml.safe_load(value)
    out = args.out or REPO / "runs" / ("sparsity-quick" if args.quick else "sparsity-study")
    out = out / args.split if args.split == "validation" else out
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    data = args.data.resolve()
    if args.split == "validation":
        data = validation_data(data, tasks, out / "data-validation", common["test_per_task"])
    variants = parse_variants(args.variants)

    configs = {}
    for name, options in variants.items():
        for seed in seeds:
            configs[name, seed] = make_config(
                **{**common, **options}, model=args.model, data_dir=str(data), tasks=tasks,
                eval_mode=eval_mode, seed=seed,
            )
    todo = [k for k in configs if not is_finished(run_folder(out, *k), len(tasks))]
    print(f"sparsity_study: {len(configs)} runs in {out}, {len(configs) - len(todo)} finished",
          flush=True)
    if not args.analyse_only:
        from nlora.runner import run

        for k, (name, seed) in enumerate(todo):
            folder = run_folder(out, name, seed)
            began = time.perf_counter()
            print(f"[{k + 1}/{len(todo)}] {name} seed {seed} -> {folder}", flush=True)
            run(configs[name, seed], folder)
            print(f"    done in {(time.perf_counter() - began) / 60:.1f} min", flush=True)

    rows: dict[str, list[dict[str, Any]]] = {}
    for (name, seed) in configs:
        folder = run_folder(out, name, seed)
        if is_finished(folder, len(tasks)):
            rows.setdefault(name, []).append({"seed": seed, **summarise(folder)})
    table = {
        name: {key: mean_ci([r[key] for r in runs])
               for key in [k for k, _ in COLUMNS] + ["AWOM", "GSR", "seconds"]}
        for name, runs in rows.items()
    }
    study = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": {"split": args.split, "eval_mode": eval_mode, "tasks": tasks,
                     "seeds": seeds, "model": args.model, "common": common,
                     "data": str(data)},
        "variants": {name: variants[name] for name in table},
        "table": table,
        "runs": rows,
        "total_seconds": sum(r["seconds"] for runs in rows.values() for r in runs),
        "wall_seconds": time.perf_counter() - start,
    }
    text = markdown(study)
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps(study, indent=1), encoding="utf-8")
    (out / "study.md").write_text(text, encoding="utf-8")
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "sparsity_study" + ("_quick" if args.quick else "") + (
        "_validation" if args.split == "validation" else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps(study, indent=1), encoding="utf-8")
    (RESULTS / f"{stem}.md").write_text(text, encoding="utf-8")
    if not args.no_report and rows:
        from nlora.report import write_report

        first = [run_folder(out, name, seeds[0]) for name in rows
                 if is_finished(run_folder(out, name, seeds[0]), len(tasks))]
        report = write_report(first, out / "report")
        print(f"report of seed {seeds[0]}'s runs: {report}")
    print(text)
    print(f"wrote {out / 'study.md'}, {out / 'study.json'} and bench/results/{stem}.*")


if __name__ == "__main__":
    main()
