"""The continual loop: learn tasks one after another, evaluate after each, keep a run folder
(its layout: ``nlora.rundir``).

Rerunning the same command resumes after the last finished task. Every task seeds its own
randomness from (seed, task index), or from the seed alone with ``task_seed="same"`` (the
release), so a resumed run ends exactly where an uninterrupted one does.

Before task 1 the base model answers every task once (the zero-shot row, for FWT) when asked
(``zero_shot=True``) or, by default, when that costs at most ``ZERO_SHOT_MAX_SHARE`` of the
run's estimated work (``zero_shot_plan``).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed

from nlora.batching import Encoder
from nlora.config import RunConfig
from nlora.data import INSTRUCTIONS, Task, load_task, merged_instructions
from nlora.evaluate import Prediction, predict
from nlora.io import write_json_atomic, write_text_atomic
from nlora.methods import get_method
from nlora.model import load_backbone
from nlora.presets import describe_presets
from nlora.rundir import (
    collect_metrics,
    finished_tasks,
    prepare_run_dir,
    step_folders,
    zero_shot_folder,
)
from nlora.scoring import is_correct, scored_form
from nlora.tables import format_results
from nlora.train import train_task

log = logging.getLogger("nlora")


def _attach_log_file(out_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(out_dir / "run.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger = logging.getLogger("nlora")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)  # the run log keeps progress whatever the console shows
    return handler


def load_tasks(config: RunConfig) -> list[Task]:
    """Read and validate every task before any training, so bad data fails up front."""
    instructions = merged_instructions(config.instructions)
    tasks = []
    for name in config.tasks:
        task = load_task(
            Path(config.data_dir), name, config.train_per_task, config.test_per_task,
            config.seed, instructions=instructions, count_unlabelled=config.count_unlabelled,
        )
        for split, count in task.skipped.items():
            if count:
                log.warning(
                    "%s %s: left out %d rows whose label is not in labels.json "
                    "(--count-unlabelled keeps them, as wrong answers)",
                    task.name, split, count,
                )
        if task.unlabelled.get("test"):
            log.info(
                "%s test: %d rows whose label is not in labels.json are counted as wrong "
                "(--count-unlabelled, as the released code)", task.name, task.unlabelled["test"],
            )
        if task.category not in instructions:
            log.info(
                "note: category %s has no instruction (paper Table 6 has %s); %s gets the "
                "released code's bare prompt (Task/Dataset header, the sentence, Answer:); "
                "--instructions FILE gives it one",
                task.category, ", ".join(INSTRUCTIONS), task.name,
            )
        tasks.append(task)
    return tasks


# The zero-shot row is on by default when it adds at most this share of the run's work.
ZERO_SHOT_MAX_SHARE = 0.25
TRAIN_ROW_COST = 3.0  # a training row costs about three forward passes (forward + backward)


def zero_shot_plan(config: RunConfig, tasks: list[Task], joint: bool = False) -> tuple[bool, str]:
    """Whether to evaluate the base model on every task before task 1, and why.

    The zero-shot row costs one more evaluation of every test set. The run's own work is
    estimated in row passes: a training row x epochs counts ``TRAIN_ROW_COST``, an evaluated
    test row 1 (every seen task after each step, or every task with ``eval_on="all"``). When
    ``zero_shot`` is None the row is made if it adds at most ``ZERO_SHOT_MAX_SHARE``.
    """
    if config.zero_shot is not None:
        return config.zero_shot, "asked for" if config.zero_shot else "--no-zero-shot"
    n = len(tasks)
    tests = [len(t.test) for t in tasks]
    zero = sum(tests)
    if joint:
        epochs = int(config.per_task("epochs", 0))
        work = TRAIN_ROW_COST * epochs * sum(len(t.train) for t in tasks) + zero
    else:
        train = sum(
            TRAIN_ROW_COST * int(config.per_task("epochs", j)) * len(t.train)
            for j, t in enumerate(tasks)
        )
        evaluated = sum(
            zero if config.eval_on == "all" else sum(tests[: j + 1]) for j in range(n)
        )
        work = train + evaluated
    share = zero / work if work else 1.0
    why = f"adds ~{share:.0%} to the run's estimated work (default: at most " \
          f"{ZERO_SHOT_MAX_SHARE:.0%})"
    return share <= ZERO_SHOT_MAX_SHARE, why


def evaluate_tasks(
    model: torch.nn.Module,
    method: Any,
    encoder: Encoder,
    tasks: list[Task],
    indices: list[int],
    accelerator: Accelerator,
    batch_size: int,
    mode: str = "generate",
) -> dict[int, list[Prediction]]:
    """Predictions for each task in ``indices``; examples are split across processes."""
    results = {}
    for i in indices:
        task = tasks[i]
        eval_model = model if method is None else method.eval_model(model, i)  # None: as is
        positions = list(range(len(task.test)))
        with accelerator.split_between_processes(positions) as mine:
            preds = predict(
                eval_model, encoder, [task.test[k] for k in mine], task.labels, batch_size,
                mode, desc=f"eval {task.dataset}",
            )
            preds = [Prediction(mine[p.index], p.prediction, p.label) for p in preds]
        preds = sorted(gather_object(preds), key=lambda p: p.index)
        results[i] = preds
    return results


def run(config: RunConfig, out_dir: Path) -> dict[str, Any]:
    """Run (or resume) the continual sequence in ``out_dir``; return metrics.json's content."""
    config.validate()
    get_method(config.method)  # an unknown method fails before the run folder is made
    out_dir = Path(out_dir).resolve()
    accelerator = Accelerator()
    tasks = load_tasks(config)
    if accelerator.is_main_process:
        prepare_run_dir(config, out_dir)
    accelerator.wait_for_everyone()
    handler = _attach_log_file(out_dir) if accelerator.is_main_process else None
    try:
        return _run(config, out_dir, tasks, accelerator)
    finally:
        if handler is not None:
            logging.getLogger("nlora").removeHandler(handler)
            handler.close()


def _run(
    config: RunConfig, out_dir: Path, tasks: list[Task], accelerator: Accelerator
) -> dict[str, Any]:
    for line in describe_presets(config):  # what the protocol and presets set, with sources
        log.info(line)
    backbone = load_backbone(config.model)
    model = backbone.model.to(accelerator.device)
    encoder = Encoder(backbone.tokenizer, backbone.is_seq2seq, config.max_source_length)
    method = get_method(config.method)(config, backbone.is_seq2seq)
    method.is_main_process = accelerator.is_main_process
    method.encoder = encoder
    method.check_model(model)  # e.g. the released N-LoRA term on non-square modules
    joint = method.joint  # multi-task learning: a single step on every task's data
    folders = step_folders(out_dir, tasks, joint)
    done = finished_tasks(out_dir, tasks, joint)
    log.info(
        "run %s: method %s, model %s, %d tasks (%d finished)",
        out_dir, config.method, config.model, len(tasks), done,
    )
    judge = Judge(config, causal=not backbone.is_seq2seq)
    _zero_shot_step(config, out_dir, tasks, model, encoder, accelerator, judge, joint)
    for j in range(done):
        model = method.restore_task(model, j, tasks[j], folders[j])
        log.info("restored task %d/%d %s from %s", j + 1, len(folders), folders[j].name, out_dir)

    for j in range(done, len(folders)):
        task, folder = tasks[j], folders[j]
        seed = config.seed_for_task(j)  # per task: resume reproduces an uninterrupted run
        set_seed(seed)
        label = "joint training" if joint else f"task {j + 1}/{len(tasks)} {task.dataset}"
        model = method.begin_task(model, j, task)
        model, result = train_task(
            model, method, j, method.train_examples(j, tasks), encoder, accelerator,
            learning_rate=float(config.per_task("learning_rate", j)),
            epochs=int(config.per_task("epochs", j)),
            batch_size=config.batch_size,
            weight_decay=config.weight_decay,
            seed=seed,
            desc=f"train {label}",
            group_by_length=config.group_by_length,
        )
        log.info(
            "%s: %d steps in %.0fs, loss %.4f -> %.4f, penalty %.4g",
            label, result.steps, result.seconds, result.first_loss, result.last_loss,
            result.last_penalty,
        )
        if accelerator.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
        model = method.end_task(model, j, task, folder)
        every = joint or config.eval_on == "all"
        seen = list(range(len(tasks))) if every else list(range(j + 1))
        start = time.perf_counter()
        predictions = evaluate_tasks(
            model, method, encoder, tasks, seen, accelerator, config.eval_batch_size,
            config.eval_mode,
        )
        eval_seconds = time.perf_counter() - start
        if accelerator.is_main_process:
            record = {
                "task": "joint" if joint else task.name,
                "index": j + 1,
                **judge.record(tasks, predictions),
                "train": {"steps": result.steps, "seconds": round(result.seconds, 2),
                          "first_loss": result.first_loss, "last_loss": result.last_loss,
                          "last_penalty": result.last_penalty},
                "eval_seconds": round(eval_seconds, 2),
            }
            _write_record(folder, judge.lines(tasks, predictions), record)
            method.task_recorded(j, folder)
            metrics = collect_metrics(out_dir, tasks, joint, config.eval_mode, config.scorer)
            write_json_atomic(out_dir / "metrics.json", metrics)
            accs = ", ".join(f"{tasks[i].dataset} {record['accuracy'][tasks[i].name]:.1f}"
                             for i in predictions)
            log.info("%s evaluated in %.0fs: %s", label, eval_seconds, accs)
        accelerator.wait_for_everyone()

    metrics = collect_metrics(out_dir, tasks, joint, config.eval_mode, config.scorer)
    if accelerator.is_main_process:
        write_json_atomic(out_dir / "metrics.json", metrics)
    return metrics


class Judge:
    """Scores predictions with the run's scorer (``nlora.scoring``), for records and logs."""

    def __init__(self, config: RunConfig, causal: bool) -> None:
        self.scorer = config.scorer
        self.causal = causal

    def verdicts(self, task: Task, preds: list[Prediction]) -> list[bool]:
        labels = set(task.labels)  # a row labelled outside them (kept "-" rows) is wrong
        return [is_correct(p.prediction, p.label, self.scorer, self.causal, labels)
                for p in preds]

    def record(self, tasks: list[Task], predictions: dict[int, list[Prediction]]) -> dict:
        """done.json's accuracy (percent) and counts ([correct, rows]) per task."""
        counts = {tasks[i].name: [sum(self.verdicts(tasks[i], p)), len(p)]
                  for i, p in predictions.items()}
        return {"scorer": self.scorer,
                "accuracy": {name: 100.0 * c / n for name, (c, n) in counts.items()},
                "counts": counts}

    def lines(self, tasks: list[Task], predictions: dict[int, list[Prediction]]) -> list[str]:
        """predictions.jsonl: the raw answer, its normalised form and the verdict."""
        return [
            json.dumps(
                {"task": tasks[i].name, "index": p.index, "prediction": p.prediction,
                 "normalised": scored_form(p.prediction, "normalised", self.causal),
                 "label": p.label, "correct": ok},
                ensure_ascii=False,
            )
            for i, preds in predictions.items()
            for p, ok in zip(preds, self.verdicts(tasks[i], preds), strict=True)
        ]


def _write_record(folder: Path, lines: list[str], record: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / "predictions.jsonl", "\n".join(lines) + "\n")
    write_json_atomic(folder / "done.json", record)  # last: marks the step finished


def _zero_shot_step(
    config: RunConfig,
    out_dir: Path,
    tasks: list[Task],
    model: torch.nn.Module,
    encoder: Encoder,
    accelerator: Accelerator,
    judge: Judge,
    joint: bool,
) -> None:
    """The base model (no adapter, nothing restored yet) on every task: the zero-shot row."""
    folder = zero_shot_folder(out_dir)
    if (folder / "done.json").is_file():
        return
    wanted, why = zero_shot_plan(config, tasks, joint)
    if not wanted:
        log.info("zero-shot row skipped: it %s; --zero-shot makes it", why)
        return
    log.info("zero-shot row: the base model on every task before task 1 (%s)", why)
    start = time.perf_counter()
    predictions = evaluate_tasks(
        model, None, encoder, tasks, list(range(len(tasks))), accelerator,
        config.eval_batch_size, config.eval_mode,
    )
    if accelerator.is_main_process:
        record = {"task": "zero-shot", "index": 0, **judge.record(tasks, predictions),
                  "eval_seconds": round(time.perf_counter() - start, 2)}
        _write_record(folder, judge.lines(tasks, predictions), record)
        log.info("zero-shot: %s", ", ".join(
            f"{t.dataset} {record['accuracy'][t.name]:.1f}" for t in tasks))
    accelerator.wait_for_everyone()


def print_results(metrics: dict[str, Any]) -> None:
    print(format_results(metrics))
