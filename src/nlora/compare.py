"""Several methods on the same tasks, data subsample and seed, side by side.

Each method gets its own run folder ``OUT/<method>/`` (so a comparison resumes like a run),
then one table: AA, F.Ra and BWT per method, the best of each column marked with ``*``
(highest AA, lowest F.Ra, highest BWT), and the time spent training and evaluating.

One seed, one order, in this process: the numbers come from the study machinery's reader
(``nlora.study.aggregate``); for seeds, orders, a grid and intervals use ``nlora study``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nlora.config import RunConfig
from nlora.io import write_json_atomic
from nlora.runner import run
from nlora.study.aggregate import run_metrics, run_seconds

__all__ = ["compare", "format_comparison", "run_seconds", "COLUMNS"]

# summary key, and which end of it is best; AA_pooled: all final test rows pooled (release)
COLUMNS = (("AA", max), ("AA_pooled", max), ("F.Ra", min), ("BWT", max))
HEADERS = {"AA": "AA", "AA_pooled": "pooled", "F.Ra": "F.Ra", "BWT": "BWT"}


def compare(
    configs: Mapping[str, RunConfig], out: Path | str, report_to: str | None = None
) -> list[dict[str, Any]]:
    """Run (or resume) each named config in ``out/<name>/``; rows for ``format_comparison``,
    also written to ``out/compare.json``."""
    out = Path(out)
    rows = []
    for name, config in configs.items():
        run_dir = out / name
        run(config, run_dir, report_to=report_to)
        values = run_metrics(run_dir, [k for k, _ in COLUMNS])
        rows.append({"method": name, **values,
                     "seconds": run_seconds(run_dir), "run": str(run_dir)})
    write_json_atomic(out / "compare.json", rows)
    return rows


def format_comparison(rows: list[dict[str, Any]]) -> str:
    """One line per method; ``*`` marks the best value of each column."""
    best = {}
    for key, pick in COLUMNS:
        values = [r.get(key) for r in rows if r.get(key) is not None]
        best[key] = pick(values) if values else None
    width = max(6, *(len(r["method"]) for r in rows)) + 2
    lines = [f"{'method':<{width}}" + "".join(f"{HEADERS[k]:>9}" for k, _ in COLUMNS)
             + f"{'time (s)':>10}"]
    for r in rows:
        cells = []
        for key, _ in COLUMNS:
            value = r.get(key)
            text = "-" if value is None else f"{value:.1f}" + ("*" if value == best[key] else " ")
            cells.append(f"{text:>9}")
        lines.append(f"{r['method']:<{width}}{''.join(cells)}{r['seconds']:>10.0f}")
    lines.append("* best of the column (highest AA, lowest F.Ra, highest BWT); AA: mean over "
                 "tasks (paper eq. 5), pooled: all final test rows")
    return "\n".join(lines)
