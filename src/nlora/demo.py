"""The demo (``nlora demo``, ``make demo``): N-LoRA beside SeqLoRA on the same short task
sequence, one table showing that each task is learned, how much is forgotten, and how
often the tasks' weight updates collide.

The settings (``DEMO_OPTIONS``) were chosen on a validation split carved from the sample's
*training* rows (``bench/demo_tuning.py``), never on test answers; the README explains them.
The methods compared are ``DEMO_METHODS``: switching the N-LoRA variant is a one-line
change there (or ``nlora demo --methods``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nlora.methods import METHODS
from nlora.presets import make_config

DEMO_METHODS: tuple[str, ...] = ("nlora", "seqlora")

DEMO_OPTIONS: dict[str, Any] = {
    "model": "smollm2-135m",
    "tasks": ["sst-2", "agnews", "dbpedia"],
    "train_per_task": 96,
    "test_per_task": 60,
    "epochs": 1,
    "batch_size": 8,
    "learning_rate": 2e-3,
    "max_source_length": 256,
    "eval_mode": "generate",
    "seed": 42,
    "zero_shot": False,  # the table shows no FWT; the base model's pass would add a minute
}

@dataclass
class DemoMethod:
    method: str
    run_dir: Path
    accuracy: list[list[float | None]]  # task i after training task j (percent)
    summary: dict[str, float | None]  # AA, F.Ra, BWT
    acr: float | None  # average collision rate of the task updates (percent)
    density: float | None  # mean share of non-zero ΔW entries (percent)
    seconds: float


@dataclass
class DemoResult:
    tasks: list[str]
    labels: list[int]  # label count per task
    eval_mode: str
    test_rows: int | None
    threshold: float | None
    methods: list[DemoMethod] = field(default_factory=list)
    seconds: float = 0.0


def run_demo(
    out: Path | str,
    methods: tuple[str, ...] | list[str] = DEMO_METHODS,
    data_dir: str | Path | None = None,
    report_to: str | None = None,
    **overrides: Any,
) -> DemoResult:
    """Run (or resume) every method on ``DEMO_OPTIONS`` (with ``overrides``) in
    ``out/<method>/`` and gather what the demo table shows."""
    from nlora.analysis import analyse_run  # heavy (torch, PEFT): only when running
    from nlora.compare import compare
    from nlora.data import load_task
    from nlora.rundir import load_run_info

    start = time.perf_counter()
    options = {**DEMO_OPTIONS, **overrides}
    if data_dir is not None:
        options["data_dir"] = str(data_dir)
    configs = {m: make_config(**options, method=m) for m in methods}
    rows = compare(configs, out, report_to=report_to)
    first = next(iter(configs.values()))
    labels = [len(load_task(Path(first.data_dir), name, 1, 1, splits=()).labels)
              for name in first.tasks]
    result = DemoResult(tasks=[n.split("/")[-1] for n in first.tasks], labels=labels,
                        eval_mode=first.eval_mode, test_rows=first.test_per_task,
                        threshold=None)
    for row in rows:
        run_dir = Path(row["run"])
        metrics = load_run_info(run_dir)["metrics"]
        analysis = analyse_run(run_dir, progress=False)
        acr = density = None
        if analysis["parameter"] is not None:
            p = analysis["parameter"]
            result.threshold = p["threshold"]["value"]
            acr = _percent(p["summary"]["ACR"])
            dens = [d for d in p["per_task"]["density"] if d is not None]
            density = _percent(sum(dens) / len(dens)) if dens else None
        result.methods.append(DemoMethod(
            method=row["method"], run_dir=run_dir, accuracy=metrics["accuracy"],
            summary=metrics.get("summary") or {}, acr=acr, density=density,
            seconds=row["seconds"],
        ))
    result.seconds = time.perf_counter() - start
    return result


def _percent(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else 100.0 * x


def _cell(x: float | None, width: int) -> str:
    return f"{'-':>{width}}" if x is None else f"{x:>{width}.1f}"


def format_demo(result: DemoResult) -> str:
    """The demo table: per task its chance level and, per method, the accuracy right after
    its own training and at the end; then AA, F.Ra, BWT, ACR and ΔW density per method."""
    names = [METHODS[m.method].title if m.method in METHODS else m.method
             for m in result.methods]
    width = max(8, *(len(t) for t in result.tasks)) + 1
    scoring = ("rank scoring: the most likely of the task's labels"
               if result.eval_mode == "rank" else "greedy generation, exact match")
    rows = f"{result.test_rows} test rows per task" if result.test_rows else "all test rows"
    lines = [f"Accuracy (%), {rows}, {scoring}.",
             "'own' = right after training that task, 'end' = after the last task; "
             "chance = 100 / labels.", ""]
    head1 = f"{'':<{width}}{'':>7}{'':>8}" + "".join(f"{n:>16}" for n in names)
    head2 = f"{'task':<{width}}{'labels':>7}{'chance':>8}" + "".join(
        f"{'own':>8}{'end':>8}" for _ in names)
    lines += [head1, head2]
    for i, task in enumerate(result.tasks):
        line = f"{task:<{width}}{result.labels[i]:>7}{100 / result.labels[i]:>8.1f}"
        for m in result.methods:
            line += _cell(m.accuracy[i][i], 8) + _cell(m.accuracy[i][-1], 8)
        lines.append(line)
    lines += ["", f"{'method':<16}{'AA':>7}{'F.Ra':>7}{'BWT':>7}{'ACR %':>8}{'ΔW dense %':>12}"
              f"{'time s':>8}"]
    for name, m in zip(names, result.methods, strict=True):
        s = m.summary
        lines.append(f"{name:<16}{_cell(s.get('AA'), 7)}{_cell(s.get('F.Ra'), 7)}"
                     f"{_cell(s.get('BWT'), 7)}{_cell(m.acr, 8)}{_cell(m.density, 12)}"
                     f"{m.seconds:>8.0f}")
    threshold = f"{result.threshold:g}" if result.threshold is not None else "0.01"
    lines += [
        "",
        "AA: mean final accuracy. F.Ra: mean drop from a task's best to its final accuracy "
        "(forgetting; lower is better). BWT: mean final minus own accuracy.",
        f"ACR: share of weight positions that two tasks' updates ΔW both change (|entry| > "
        f"{threshold} x the matrix's max), mean over task pairs; ΔW dense: share of "
        "entries above that threshold, mean over tasks. SeqLoRA's update of task t is its "
        "adapter minus task t-1's.",
        "One seed on a small sample: a demonstration, not a comparison "
        "(test accuracies over 60-100 rows are about ±10 points wide).",
    ]
    return "\n".join(lines)
