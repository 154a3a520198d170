"""The demo (``nlora demo``, ``make demo``): N-LoRA beside SeqLoRA on the same short task
sequence, one table showing that each task is learned, how much is forgotten, and how
often the tasks' weight updates collide.

The settings (``DEMO_OPTIONS``) were chosen on a validation split carved from the sample's
*training* rows (``bench/demo_tuning.py``), never on test answers; the README explains them.
The methods compared are ``DEMO_METHODS``: switching the N-LoRA variant is a one-line
change there (or ``nlora demo --methods``).

``benchmark="superni"`` (``nlora demo --benchmark superni``) runs three short-answer SuperNI
tasks from the SuperNI sample shipped in the package (``scripts/make_superni_sample.py``),
scored by ROUGE-L, with the same training settings: those were tuned on the classification
sample only, not on SuperNI.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nlora.errors import ConfigError
from nlora.methods import METHODS
from nlora.presets import make_config
from nlora.scoring import METRIC_TITLES

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

# The SuperNI sample shipped in the package (scripts/make_superni_sample.py)
SUPERNI_SAMPLE = Path(__file__).resolve().parent / "sample_data" / "superni"
DEMO_BENCHMARKS = ("cl", "superni")
DEMO_SUPERNI_OPTIONS: dict[str, Any] = {
    **DEMO_OPTIONS,
    "tasks": ["task363_sst2_polarity_classification", "task591_sciq_answer_generation",
              "task875_emotion_classification"],
    "test_per_task": 40,  # the sample's whole test split
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
    labels: list[int]  # label count per task (0: a generation task without a label set)
    eval_mode: str
    test_rows: int | None
    threshold: float | None
    methods: list[DemoMethod] = field(default_factory=list)
    seconds: float = 0.0
    metrics: list[str] = field(default_factory=list)  # each task's metric (nlora.scoring)


def run_demo(
    out: Path | str,
    methods: tuple[str, ...] | list[str] = DEMO_METHODS,
    data_dir: str | Path | None = None,
    report_to: str | None = None,
    benchmark: str = "cl",
    **overrides: Any,
) -> DemoResult:
    """Run (or resume) every method on ``DEMO_OPTIONS`` (``DEMO_SUPERNI_OPTIONS`` for
    ``benchmark="superni"``, on the SuperNI sample unless ``data_dir`` is given), with
    ``overrides``, in ``out/<method>/`` and gather what the demo table shows."""
    from nlora.analysis import analyse_run  # heavy (torch, PEFT): only when running
    from nlora.compare import compare
    from nlora.families import load_task
    from nlora.rundir import load_run_info

    start = time.perf_counter()
    if benchmark not in DEMO_BENCHMARKS:
        raise ConfigError(f"--benchmark must be one of {', '.join(DEMO_BENCHMARKS)}, got "
                          f"{benchmark!r}")
    superni = benchmark == "superni"
    options = {**(DEMO_SUPERNI_OPTIONS if superni else DEMO_OPTIONS), **overrides}
    if superni and data_dir is None:
        data_dir = SUPERNI_SAMPLE
    if data_dir is not None:
        options["data_dir"] = str(data_dir)
    configs = {m: make_config(**options, method=m) for m in methods}
    rows = compare(configs, out, report_to=report_to)
    first = next(iter(configs.values()))
    loaded = [load_task(Path(first.data_dir), name, 1, 1, splits=()) for name in first.tasks]
    result = DemoResult(tasks=[n.split("/")[-1] for n in first.tasks],
                        labels=[len(t.labels) for t in loaded],
                        eval_mode=first.eval_mode, test_rows=first.test_per_task,
                        threshold=None, metrics=[t.metric for t in loaded])
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
    """The demo table: per task its chance level (or its metric) and, per method, the score
    right after its own training and at the end; then AA, F.Ra, BWT, ACR and ΔW density per
    method."""
    names = [METHODS[m.method].title if m.method in METHODS else m.method
             for m in result.methods]
    width = max(8, *(len(t) for t in result.tasks)) + 1
    kinds = result.metrics or ["accuracy"] * len(result.tasks)
    generation = any(k != "accuracy" for k in kinds)
    scoring = ("rank scoring: the most likely of the task's labels"
               if result.eval_mode == "rank" else "greedy generation, exact match")
    rows = f"{result.test_rows} test rows per task" if result.test_rows else "all test rows"
    if generation:
        lines = [f"Score of each task by its metric, {rows}, greedy generation "
                 f"({', '.join(f'{k}: {METRIC_TITLES[k]}' for k in dict.fromkeys(kinds))}).",
                 "'own' = right after training that task, 'end' = after the last task.", ""]
        head1 = f"{'':<{width}}{'':>13}" + "".join(f"{n:>16}" for n in names)
        head2 = f"{'task':<{width}}{'metric':>13}" + "".join(
            f"{'own':>8}{'end':>8}" for _ in names)
    else:
        lines = [f"Accuracy (%), {rows}, {scoring}.",
                 "'own' = right after training that task, 'end' = after the last task; "
                 "chance = 100 / labels.", ""]
        head1 = f"{'':<{width}}{'':>7}{'':>8}" + "".join(f"{n:>16}" for n in names)
        head2 = f"{'task':<{width}}{'labels':>7}{'chance':>8}" + "".join(
            f"{'own':>8}{'end':>8}" for _ in names)
    lines += [head1, head2]
    for i, task in enumerate(result.tasks):
        if generation:
            line = f"{task:<{width}}{kinds[i]:>13}"
        else:
            line = f"{task:<{width}}{result.labels[i]:>7}{100 / result.labels[i]:>8.1f}"
        for m in result.methods:
            line += _cell(m.accuracy[i][i], 8) + _cell(m.accuracy[i][-1], 8)
        lines.append(line)
    lines += ["", f"{'method':<16}{'AA':>7}{'F.Ra':>7}{'BWT':>7}{'ACR %':>8}{'ΔW dense %':>12}"
              f"{'time s':>8}" + (f"{'EM':>7}" if generation else "")]
    for name, m in zip(names, result.methods, strict=True):
        s = m.summary
        lines.append(f"{name:<16}{_cell(s.get('AA'), 7)}{_cell(s.get('F.Ra'), 7)}"
                     f"{_cell(s.get('BWT'), 7)}{_cell(m.acr, 8)}{_cell(m.density, 12)}"
                     f"{m.seconds:>8.0f}" + (_cell(s.get("EM"), 7) if generation else ""))
    threshold = f"{result.threshold:g}" if result.threshold is not None else "0.01"
    what = "score (each task's metric)" if generation else "accuracy"
    lines += [
        "",
        f"AA: mean final {what}. F.Ra: mean drop from a task's best to its final {what} "
        f"(forgetting; lower is better). BWT: mean final minus own {what}."
        + (" EM: mean final exact match." if generation else ""),
        f"ACR: share of weight positions that two tasks' updates ΔW both change (|entry| > "
        f"{threshold} x the matrix's max), mean over task pairs; ΔW dense: share of "
        "entries above that threshold, mean over tasks. SeqLoRA's update of task t is its "
        "adapter minus task t-1's.",
        "One seed on a small sample: a demonstration, not a comparison "
        + ("(a few dozen test rows per task)." if generation else
           "(test accuracies over 60-100 rows are about ±10 points wide)."),
    ]
    return "\n".join(lines)
