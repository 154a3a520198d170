"""Continual-learning scores from the accuracy matrix.

``matrix[i][j]`` is the accuracy (percent) on task i after training task j, ``None``
where it was not measured (j < i unless every task is evaluated after every step).
Indices below are 0-based; the paper's are 1-based.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Matrix = Sequence[Sequence[float | None]]


def _value(matrix: Matrix, task: int, step: int) -> float:
    value = matrix[task][step]
    if value is None:
        raise ValueError(f"accuracy of task {task + 1} after step {step + 1} was not measured")
    return value


def _is_joint(matrix: Matrix) -> bool:
    """One column for several tasks: a single joint training step (multi-task learning)."""
    return len(matrix) > 1 and len(matrix[0]) == 1


def average_accuracy(matrix: Matrix) -> float:
    """Paper eq. 5: mean accuracy over all tasks after the last task (step)."""
    last = len(matrix[0]) - 1
    return sum(_value(matrix, i, last) for i in range(len(matrix))) / len(matrix)


def forgetting(matrix: Matrix) -> float | None:
    """Paper eq. 6 (Chaudhry et al., 2018): mean drop from each earlier task's best to final.

    For task t < T: max over steps k in [t, T-1) of a[t][k], minus a[t][T-1]. The paper writes
    the max as over a_{k,t}; with its own definition of a_{i,j} (task i after step j) the
    maximum must run over the training steps of task t, which is what this computes.
    """
    last = len(matrix) - 1
    if last == 0 or _is_joint(matrix):  # nothing was learned before the end
        return None
    drops = [
        max(_value(matrix, t, k) for k in range(t, last)) - _value(matrix, t, last)
        for t in range(last)
    ]
    return sum(drops) / last


def backward_transfer(matrix: Matrix) -> float | None:
    """BWT (Lopez-Paz and Ranzato, 2017): mean of a[t][T-1] - a[t][t] over t < T-1."""
    last = len(matrix) - 1
    if last == 0 or _is_joint(matrix):
        return None
    return sum(_value(matrix, t, last) - _value(matrix, t, t) for t in range(last)) / last


def forward_transfer(matrix: Matrix, zero_shot: Sequence[float | None]) -> float | None:
    """FWT (Lopez-Paz & Ranzato 2017): mean over i ≥ 2 of a[i][i-1] − b_i (1-based tasks).

    a[i][i-1] is the accuracy on task i just *before* it is trained; b_i the zero-shot accuracy
    of the untrained model. None when either was not measured (runs that evaluate only seen
    tasks have no a[i][i-1]).
    """
    t = len(matrix)
    if t < 2 or len(zero_shot) < t or len(matrix[0]) < t:  # joint training: no a[i][i-1]
        return None
    gains = []
    for i in range(1, t):
        before, base = matrix[i][i - 1], zero_shot[i]
        if before is None or base is None:
            return None
        gains.append(before - base)
    return sum(gains) / len(gains)


def unseen_generalisation(unseen: dict[str, Sequence[float | None]]) -> dict[str, Any]:
    """Fig. 4: accuracy on tasks never trained on; "final" is after the last trained task."""
    out = {}
    for task, curve in unseen.items():
        measured = [v for v in curve if v is not None]
        out[task] = {"final": measured[-1] if measured else None, "curve": list(curve)}
    return out


def _tidy(value: float | None) -> float | None:
    """Accuracies are percentages of row counts: differences below 1e-9 are float rounding
    (e.g. 3.55e-15 for an unchanged task), shown as 0."""
    return None if value is None else round(value, 9) + 0.0


def summarize(matrix: Matrix) -> dict[str, float | None]:
    return {
        "AA": _tidy(average_accuracy(matrix)),
        "F.Ra": _tidy(forgetting(matrix)),
        "BWT": _tidy(backward_transfer(matrix)),
    }
