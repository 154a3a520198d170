"""Plain-text result tables for the terminal."""

from __future__ import annotations

from typing import Any

from nlora.metrics import forward_transfer
from nlora.scoring import METRIC_TITLES

SCORER_NAMES = {"normalised": "normalised exact match", "strict": "strict exact match"}


def _fmt(value: float | None, width: int = 7) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.1f}"


def format_results(metrics: dict[str, Any]) -> str:
    """The score matrix (rows: tasks, columns: after training task j) and the summary.

    A first column ``base`` holds the zero-shot row when the run made it. When a task is not
    scored by accuracy (ROUGE-L, exact match over references) the header says so and a last
    column names each row's metric.
    """
    names = [n.split("/")[-1] for n in metrics["tasks"]]
    width = max(7, *(len(n) for n in names)) + 1
    zero = metrics.get("zero_shot")
    columns = len(metrics["accuracy"][0])
    kinds = metrics.get("metrics") or ["accuracy"] * len(names)
    mixed = any(k != "accuracy" for k in kinds)
    header = f"{'task':<{width}}" + (f"{'base':>9}" if zero else "") + "".join(
        f"{f'after {j + 1}':>9}" for j in range(columns)
    ) + ("  metric" if mixed else "")
    scorer = SCORER_NAMES.get(metrics.get("scorer") or "", "exact match")
    if mixed:
        used = ", ".join(f"{k}: {METRIC_TITLES.get(k, k)}" for k in dict.fromkeys(kinds))
        lines = [f"Score of each task (row) after training task j (column), by the task's "
                 f"metric ({used}); exact match is {scorer}", header]
    else:
        lines = [f"Accuracy (%) of each task (row) after training task j (column); {scorer}",
                 header]
    for i, row in enumerate(metrics["accuracy"]):
        base = _fmt(zero[i], 9) if zero else ""
        lines.append(f"{names[i]:<{width}}{base}" + "".join(_fmt(v, 9) for v in row)
                     + (f"  {kinds[i]}" if mixed else ""))
    summary = metrics.get("summary")
    if summary:
        mean = "mean over tasks" + (" of each one's metric" if len(set(kinds)) > 1 else "")
        parts = [f"AA {_fmt(summary['AA'], 0).strip()} ({mean})"]
        if summary.get("EM") is not None:
            parts.append(f"EM {_fmt(summary['EM'], 0).strip()} (mean final exact match)")
        if summary.get("AA_pooled") is not None:
            parts.append(f"pooled AA {_fmt(summary['AA_pooled'], 0).strip()} (all test rows)")
        parts += [f"{k} {_fmt(summary[k], 0).strip()}" for k in ("F.Ra", "BWT")]
        fwt = forward_transfer(metrics["accuracy"], zero) if zero else None
        if fwt is not None:
            parts.append(f"FWT {fwt:.1f}")
        lines += ["", "   ".join(parts)]
    else:
        lines.append(f"(finished {metrics.get('finished', 0)} of {len(names)} tasks)")
    return "\n".join(lines)
