"""The continual loop: learn tasks one after another, evaluate after each, keep a run folder
(its layout: ``nlora.rundir``).

Rerunning the same command resumes after the last finished task. Every task seeds its own
randomness from (seed, task index), or from the seed alone with ``task_seed="same"`` (the
release), so a resumed run ends exactly where an uninterrupted one does.

Before task 1 the base model answers every task once (the zero-shot row, for FWT) when asked
(``zero_shot=True``) or, by default, when that costs at most ``ZERO_SHOT_MAX_SHARE`` of the
run's estimated work (``zero_shot_plan``).

Curves: every optimiser step's task loss, penalty and learning rate, and every evaluation's
accuracies, go to ``run.log`` as text and, with ``report_to``, to TensorBoard or Weights &
Biases through Accelerate's trackers (``nlora.tracking``). Steps count optimiser steps over the
whole sequence, continuing across tasks and resumes.
"""

from __future__ import annotations

import errno
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from nlora.batching import Encoder
from nlora.config import RunConfig
from nlora.data import INSTRUCTIONS, Task, merged_instructions
from nlora.distributed import (
    evaluate_tasks,
    is_main_process,
    local_main_first,
    make_accelerator,
    on_main,
)
from nlora.errors import ConfigError, NloraError
from nlora.evaluate import Prediction
from nlora.families import load_task
from nlora.io import write_json_atomic
from nlora.methods import get_method
from nlora.methods.base import ContinualMethod
from nlora.model import Backbone, load_backbone
from nlora.precision import resolve_precision
from nlora.presets import describe_presets
from nlora.rundir import (
    check_out_dir,
    collect_metrics,
    finished_tasks,
    open_run_dir,
    read_done,
    record_adapter_base,
    restore_step,
    software_versions,
    step_folders,
    write_record,
    zero_shot_folder,
)
from nlora.scoring import row_score, scored_form
from nlora.tables import format_results
from nlora.tracking import check_report_to, tracker_setup
from nlora.train import Diverged, StepRecord, micro_batch_size, train_task

log = logging.getLogger("nlora")
# Per-step lines go to run.log only (not to the console, where the progress bar shows them).
step_log = logging.getLogger("nlora.steps")
step_log.propagate = False



class RunLogHandler(logging.FileHandler):
    """run.log: a write that fails (a full disk) is remembered once, never a traceback per
    record on the console."""

    failed: OSError | None = None

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        if self.failed is None:
            error = sys.exc_info()[1]
            self.failed = error if isinstance(error, OSError) else OSError(str(error))


def is_disk_full(err: BaseException) -> bool:
    """No space (or quota) left: an OSError, or a writer library's error that wraps one."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    return "No space left on device" in text or "StorageFull" in text or (
        "Disk quota exceeded" in text)


def _attach_log_file(out_dir: Path) -> logging.Handler:
    handler = RunLogHandler(out_dir / "run.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    for logger in (logging.getLogger("nlora"), step_log):
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)  # the run log keeps progress whatever the console shows
    return handler


def load_tasks(config: RunConfig) -> list[Task]:
    """Read and validate every task before any training, so bad data fails up front."""
    instructions = merged_instructions(config.instructions)
    tasks = [
        load_task(
            Path(config.data_dir), name, config.train_per_task, config.test_per_task,
            config.seed, instructions=instructions, count_unlabelled=config.count_unlabelled,
            eval_split=config.eval_split, validation_per_task=config.validation_per_task,
            references=config.references,
        )
        for name in config.tasks
    ]
    families = get_method(config.method).task_families
    for task in tasks:
        if families is not None and task.family not in families:
            raise ConfigError(f"method {config.method} learns {', '.join(families)} tasks "
                              f"only; {task.name} is a {task.family} task")
    if config.eval_mode == "rank":
        for task in tasks:
            if not task.labels:
                raise ConfigError(f"--eval-mode rank ranks a task's labels; {task.name} "
                                  f"({task.family}, {task.metric}) has none: use "
                                  "--eval-mode generate")
    return tasks


def _log_data_notes(config: RunConfig, tasks: list[Task]) -> None:
    instructions = merged_instructions(config.instructions)
    for task in tasks:
        if task.validation:
            how = task.validation
            if "seed" in how:
                drawn = ("stratified, " if how["stratified"] else "at random, ") + \
                    f"seed {how['seed']}"
                log.info("%s: evaluated on %d validation rows carved from %s (%s), not on the "
                         "test split", task.name, how["rows"], how["source"], drawn)
            else:  # a user task folder's own validation.jsonl
                log.info("%s: evaluated on its %d rows of %s, not on the test split", task.name,
                         how["rows"], how["source"])
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
        for split, (asked, there) in task.capped.items():
            flag = "--train-per-task" if split == "train" else "--test-per-task"
            log.warning("%s %s: %s %d is more than its %d rows; using all %d",
                        task.name, split, flag, asked, there, there)
        if task.family == "classification" and task.category not in instructions:
            log.info(
                "note: category %s has no instruction (paper Table 6 has %s); %s gets the "
                "released code's bare prompt (Task/Dataset header, the sentence, Answer:); "
                "--instructions FILE gives it one",
                task.category, ", ".join(INSTRUCTIONS), task.name,
            )


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
        off = "zero_shot is false (--no-zero-shot or the config)"
        return config.zero_shot, "asked for" if config.zero_shot else off
    n = len(tasks)
    tests = [len(t.test) for t in tasks]
    zero = sum(tests)
    if joint:
        epochs = int(config.for_task(0).epochs)
        work = TRAIN_ROW_COST * epochs * sum(len(t.train) for t in tasks) + zero
    else:
        train = sum(
            TRAIN_ROW_COST * int(config.for_task(j).epochs) * len(t.train)
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


def run(config: RunConfig, out_dir: Path | str, report_to: str | None = None) -> dict[str, Any]:
    """Run (or resume) the continual sequence in ``out_dir``; return metrics.json's content.

    ``report_to`` ("tensorboard" or "wandb", ``nlora.tracking``) also logs the curves to that
    tracker (an optional extra). It is not part of the config: a run resumes with or without
    it.

    Everything is checked (options, processes, data, model, adapter, the folder) before the
    folder is created; the folder is locked while the run uses it.
    """
    try:
        out_dir = Path(out_dir).resolve()
    except (OSError, RuntimeError) as err:  # a symlink loop
        raise ConfigError(f"--out {out_dir}: {err}") from None
    logger = logging.getLogger("nlora")
    level = logger.level
    if not is_main_process():  # the console shows one process's progress
        logger.setLevel(logging.ERROR)
    lock, handler, accelerator = None, None, None
    try:
        config.validate()
        check_report_to(report_to)
        accelerator = make_accelerator(config.precision, report_to,
                                       out_dir if report_to else None)
        micro_batch_size(config.batch_size, config.grad_accum, accelerator.num_processes)
        on_main(accelerator, lambda: check_out_dir(config, out_dir))
        tasks = load_tasks(config)
        backbone = local_main_first(accelerator, lambda: load_backbone(config.model))
        encoder = Encoder(backbone.tokenizer, backbone.is_seq2seq, config.max_source_length,
                          config.truncation)
        method = get_method(config.method)(config, backbone.is_seq2seq)
        method.check(backbone.model)
        lock = on_main(accelerator, lambda: open_run_dir(config, out_dir))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            handler = _attach_log_file(out_dir)
            if lock.taken_over_from:
                log.info("took over the lock of PID %s, which no longer runs",
                         lock.taken_over_from)
            for leftover in lock.removed:
                log.info("removed %s, left by an interrupted run", leftover)
        _log_data_notes(config, tasks)
        if report_to and accelerator.is_main_process:  # trackers log from the main process
            project, hyper, init_kwargs = tracker_setup(report_to, config, out_dir)
            accelerator.init_trackers(project, config=hyper, init_kwargs=init_kwargs)
        return _run(config, out_dir, tasks, accelerator, backbone, encoder, method)
    except NloraError as err:
        err.shared = True  # raised alike on every process: the CLI prints it once
        raise
    except Exception as err:
        if not is_disk_full(err):
            raise
        raise ConfigError(  # finished tasks are on disk; the task in progress starts again
            f"no space left on the device holding {out_dir}; free some and rerun the same "
            "command to resume (finished tasks are kept)"
        ) from None
    finally:
        if report_to and accelerator is not None:
            accelerator.end_training()
        if handler is not None:
            for each in (logger, step_log):
                each.removeHandler(handler)
            try:
                handler.close()
            except OSError:  # flushing onto a full disk
                handler.failed = handler.failed or OSError("flush failed")
            if handler.failed is not None and sys.exc_info()[0] is None:
                log.warning("run.log in %s is incomplete: %s", out_dir, handler.failed)
        if lock is not None:
            lock.release()
        logger.setLevel(level)


def _run(
    config: RunConfig,
    out_dir: Path,
    tasks: list[Task],
    accelerator: Accelerator,
    backbone: Backbone,
    encoder: Encoder,
    method: ContinualMethod,
) -> dict[str, Any]:
    for line in describe_presets(config):  # what the protocol and presets set, with sources
        log.info(line)
    log.info("software: %s", ", ".join(f"{k} {v}" for k, v in software_versions().items()))
    precision, why = resolve_precision(config.precision, accelerator.device)
    (log.warning if why.startswith("asked for, but") else log.info)(
        "precision: %s (%s)", precision, why)
    model = backbone.model.to(accelerator.device)
    method.is_main_process = accelerator.is_main_process
    method.encoder = encoder
    joint = method.joint  # multi-task learning: a single step on every task's data
    folders = step_folders(out_dir, tasks, joint)
    done = finished_tasks(out_dir, tasks, joint)
    processes = accelerator.num_processes
    log.info(
        "run %s: method %s, model %s, %d tasks (%d finished); global batch %d = %d process(es)"
        " x %d micro-batch(es) x %d rows", out_dir, config.method, config.model, len(tasks),
        done, config.batch_size, processes, config.grad_accum,
        micro_batch_size(config.batch_size, config.grad_accum, processes),
    )
    global_step = 0  # optimiser steps over the whole sequence, continued on resume
    judge = Judge(config, causal=not backbone.is_seq2seq)
    _zero_shot_step(config, out_dir, tasks, model, encoder, accelerator, judge, joint)
    for j in range(done):
        model = restore_step(out_dir, method, model, j, tasks[j], folders[j])
        log.info("restored task %d/%d %s from %s", j + 1, len(folders), folders[j].name, out_dir)
        global_step += int(read_done(folders[j])["train"]["steps"])

    for j in range(done, len(folders)):
        task, folder = tasks[j], folders[j]
        seed = config.seed_for_task(j)  # per task: resume reproduces an uninterrupted run
        set_seed(seed)
        label = "joint training" if joint else f"task {j + 1}/{len(tasks)} {task.dataset}"
        settings = config.for_task(j)  # per-task options at this task's values
        learning_rate = float(settings.learning_rate)
        model = method.begin_task(model, j, task)

        def log_step(record: StepRecord, offset: int = global_step,
                     name: str = "joint" if joint else task.dataset) -> None:
            step = offset + record.step
            step_log.info(
                "step %d (%s): loss %.6g, penalty %.6g, lr %.6g",
                step, name, record.loss, record.penalty, record.learning_rate,
            )
            accelerator.log({"train/loss": record.loss, "train/penalty": record.penalty,
                             "train/learning_rate": record.learning_rate}, step=step)

        try:
            model, result = train_task(
                model, method, j, method.train_examples(j, tasks), encoder, accelerator,
                learning_rate=learning_rate,
                epochs=int(config.for_task(j).epochs),
                batch_size=config.batch_size,
                weight_decay=config.weight_decay,
                seed=seed,
                desc=f"train {label}",
                group_by_length=config.group_by_length,
                grad_accum=config.grad_accum,
                max_grad_norm=config.max_grad_norm or None,
                precision=precision,
                on_step=log_step,
                loss_parts=config.loss_parts,
                zero_lr_steps=config.zero_lr_steps,
            )
        except Diverged as err:
            l1 = method.task_info(j).get("l1_lambda", settings.l1_lambda)
            l1 = f"{l1:g}" if isinstance(l1, int | float) else l1  # or "auto", uncalibrated
            message = (
                f"{label} diverged: {err}, with --lr {learning_rate:g} and --l1-lambda "
                f"{l1} (method {config.method}); lower "
                f"them and rerun with another --out; the {j} finished task(s) in {out_dir} "
                "are intact"
            )
            log.error("%s", message)
            raise TrainingDiverged(message) from None
        global_step += result.steps
        log.info(
            "%s: %d steps in %.0fs, loss %.4f -> %.4f, penalty %.4g",
            label, result.steps, result.seconds, result.first_loss, result.last_loss,
            result.last_penalty,
        )
        if accelerator.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
        model = method.end_task(model, j, task, folder)
        if accelerator.is_main_process:
            record_adapter_base(out_dir, folder, j, tasks, config, method)
        chosen = method.task_info(j)  # e.g. an automatic λ, the density a pruning kept
        scalars = {k: v for k, v in chosen.items() if isinstance(v, int | float)}
        if scalars:
            log.info("%s: %s", label, ", ".join(f"{k} {v:.4g}" for k, v in scalars.items()))
        every = joint or config.eval_on == "all"
        seen = list(range(len(tasks))) if every else list(range(j + 1))
        start = time.perf_counter()
        predictions = evaluate_tasks(
            model, method, encoder, tasks, seen, accelerator, config.eval_batch_size,
            config.eval_mode, config.prefix_cache,
        )
        eval_seconds = time.perf_counter() - start
        if accelerator.is_main_process:
            scores, lines = judge.score(tasks, predictions)
            record = {
                "task": "joint" if joint else task.name,
                "index": j + 1,
                **scores,
                "train": {"steps": result.steps, "seconds": round(result.seconds, 2),
                          "first_loss": result.first_loss, "last_loss": result.last_loss,
                          "last_penalty": result.last_penalty, "precision": precision},
                "eval_seconds": round(eval_seconds, 2),
                **({"method": chosen} if chosen else {}),
            }
            write_record(folder, lines, record)
            method.task_recorded(j, folder)
            metrics = collect_metrics(out_dir, tasks, joint, config.eval_mode, config.scorer)
            write_json_atomic(out_dir / "metrics.json", metrics)
            accs = ", ".join(f"{tasks[i].dataset} {record['accuracy'][tasks[i].name]:.1f}"
                             for i in predictions)
            log.info("%s evaluated in %.0fs (step %d): %s", label, eval_seconds, global_step, accs)
            accelerator.log(
                {f"accuracy/{tasks[i].dataset}": record["accuracy"][tasks[i].name]
                 for i in predictions},
                step=global_step,
            )
        accelerator.wait_for_everyone()

    metrics = collect_metrics(out_dir, tasks, joint, config.eval_mode, config.scorer)
    if accelerator.is_main_process:
        write_json_atomic(out_dir / "metrics.json", metrics)
    return metrics


class TrainingDiverged(NloraError):
    """A task's loss diverged; the message names the run's λ and learning rate."""


class Judge:
    """Scores predictions by each task's metric (``nlora.scoring``) with the run's scorer, for
    records and logs."""

    def __init__(self, config: RunConfig, causal: bool) -> None:
        self.scorer = config.scorer
        self.causal = causal
        self.references = config.references

    def row_scores(self, task: Task, preds: list[Prediction]) -> list[tuple[float, bool]]:
        """(score, exact match) per row."""
        if task.metric == "accuracy":
            labels = set(task.labels)  # a row labelled outside them (kept "-" rows) is wrong
            return [row_score("accuracy", p.prediction, [p.label], self.scorer, self.causal,
                              labels) for p in preds]
        return [row_score(task.metric, p.prediction, self._references(task, p), self.scorer,
                          self.causal) for p in preds]

    def _references(self, task: Task, pred: Prediction) -> list[str]:
        """All of the row's references, or the one drawn at load (its label)."""
        if self.references == "drawn":
            return [pred.label]
        return list(task.test[pred.index].references) or [pred.label]

    def score(
        self, tasks: list[Task], predictions: dict[int, list[Prediction]]
    ) -> tuple[dict[str, Any], list[str]]:
        """done.json's scores per task (``accuracy``: the score under the task's metric, named
        in ``metric``; the key keeps its name so earlier runs read alike), counts ([correct,
        rows]) of exact-match tasks, exact match (%) beside ROUGE-L, and the lines of
        predictions.jsonl, from one pass of row scores."""
        scored = {i: self.row_scores(tasks[i], p) for i, p in predictions.items()}
        record: dict[str, Any] = {
            "scorer": self.scorer,
            "accuracy": {tasks[i].name: sum(s for s, _ in v) / len(v) for i, v in scored.items()},
            "counts": {tasks[i].name: [sum(e for _, e in v), len(v)] for i, v in scored.items()
                       if tasks[i].metric != "rougeL"},
            "metric": {tasks[i].name: tasks[i].metric for i in scored},
        }
        if any(t.metric == "rougeL" for t in tasks):
            record["references"] = self.references
            record["exact_match"] = {tasks[i].name: 100.0 * sum(e for _, e in v) / len(v)
                                     for i, v in scored.items()}
        lines = []
        for i, preds in predictions.items():
            task = tasks[i]
            for p, (value, exact) in zip(preds, scored[i], strict=True):
                line = {"task": task.name, "index": p.index, "prediction": p.prediction,
                        "normalised": scored_form(p.prediction, "normalised", self.causal),
                        "label": p.label, "correct": exact}
                if task.metric != "accuracy":
                    line["references"] = self._references(task, p)
                    line[task.metric] = value
                lines.append(json.dumps(line, ensure_ascii=False))
        return record, lines


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
        log.info("zero-shot row skipped: %s; --zero-shot makes it", why)
        return
    log.info("zero-shot row: the base model on every task before task 1 (%s)", why)
    start = time.perf_counter()
    predictions = evaluate_tasks(
        model, None, encoder, tasks, list(range(len(tasks))), accelerator,
        config.eval_batch_size, config.eval_mode, config.prefix_cache,
    )
    if accelerator.is_main_process:
        scores, lines = judge.score(tasks, predictions)
        record = {"task": "zero-shot", "index": 0, **scores,
                  "eval_seconds": round(time.perf_counter() - start, 2)}
        write_record(folder, lines, record)
        log.info("zero-shot: %s", ", ".join(
            f"{t.dataset} {record['accuracy'][t.name]:.1f}" for t in tasks))
    accelerator.wait_for_everyone()


def print_results(metrics: dict[str, Any]) -> None:
    print(format_results(metrics))
