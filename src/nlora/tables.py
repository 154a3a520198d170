"""Plain-text result tables for the terminal."""

from __future__ import annotations

from typing import Any


def _fmt(value: float | None, width: int = 7) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.1f}"


def format_results(metrics: dict[str, Any]) -> str:
    """The accuracy matrix (rows: tasks, columns: after training task j) and the summary."""
    names = [n.split("/")[-1] for n in metrics["tasks"]]
    width = max(7, *(len(n) for n in names)) + 1
    header = f"{'task':<{width}}" + "".join(
        f"{f'after {j + 1}':>9}" for j in range(len(metrics["accuracy"][0]))
    )
    lines = ["Accuracy (%) of each task (row) after training task j (column)", header]
    for i, row in enumerate(metrics["accuracy"]):
        lines.append(f"{names[i]:<{width}}" + "".join(_fmt(v, 9) for v in row))
    summary = metrics.get("summary")
    if summary:
        lines.append("")
        lines.append(
            "AA {}   F.Ra {}   BWT {}".format(
                *(_fmt(summary[k], 0).strip() for k in ("AA", "F.Ra", "BWT"))
            )
        )
    else:
        lines.append(f"(finished {metrics.get('finished', 0)} of {len(names)} tasks)")
    return "\n".join(lines)
