"""``nlora compare``: several methods on the same tasks, data subsample and seed.

Each method gets its own run folder ``DIR/<method>/`` (so a comparison resumes like a run),
then one table: AA, F.Ra and BWT per method, the best of each column marked with ``*``
(highest AA, lowest F.Ra, highest BWT), and the time spent training and evaluating.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

from nlora.cli import _names, add_run_arguments, config_from_args
from nlora.errors import ConfigError
from nlora.io import write_json_atomic

COLUMNS = (("AA", max), ("F.Ra", min), ("BWT", max))  # and which end of each is best


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser, with_method=False)  # --out is the comparison folder
    parser.add_argument("--methods", type=_names, required=True,
                        help="methods to compare, e.g. nlora,olora,inclora,seqlora")


def run_seconds(run_dir: Path) -> float:
    """Training plus evaluation time of every finished step (survives resumes)."""
    total = 0.0
    for done in sorted(run_dir.glob("tasks/*/done.json")):
        record = json.loads(done.read_text(encoding="utf-8"))
        total += record["train"]["seconds"] + record["eval_seconds"]
    return total


def format_comparison(rows: list[dict[str, Any]]) -> str:
    """One line per method; ``*`` marks the best value of each column."""
    best = {}
    for key, pick in COLUMNS:
        values = [r[key] for r in rows if r[key] is not None]
        best[key] = pick(values) if values else None
    width = max(6, *(len(r["method"]) for r in rows)) + 2
    lines = [f"{'method':<{width}}{'AA':>9}{'F.Ra':>9}{'BWT':>9}{'time (s)':>10}"]
    for r in rows:
        cells = []
        for key, _ in COLUMNS:
            value = r[key]
            text = "-" if value is None else f"{value:.1f}" + ("*" if value == best[key] else " ")
            cells.append(f"{text:>9}")
        lines.append(f"{r['method']:<{width}}{''.join(cells)}{r['seconds']:>10.0f}")
    lines.append("* best of the column (highest AA, lowest F.Ra, highest BWT)")
    return "\n".join(lines)


def run_compare(args: argparse.Namespace) -> int:
    from nlora.methods import get_method
    from nlora.runner import run  # heavy imports only when running

    if len(set(args.methods)) != len(args.methods):
        raise ConfigError(f"a method appears twice in --methods {','.join(args.methods)}")
    configs = {}
    for name in args.methods:  # check every method and option before training anything
        get_method(name)
        method_args = copy.copy(args)
        method_args.method = name
        configs[name] = config_from_args(method_args)
        configs[name].validate()
    rows = []
    for name, config in configs.items():
        out = Path(args.out) / name
        summary = run(config, out).get("summary") or {}
        rows.append({"method": name, **{k: summary.get(k) for k, _ in COLUMNS},
                     "seconds": run_seconds(out), "run": str(out)})
    write_json_atomic(Path(args.out) / "compare.json", rows)
    print(format_comparison(rows))
    print(f"\nrun folders: {args.out}/<method>/")
    return 0
