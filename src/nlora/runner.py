"""The continual loop: learn tasks one after another, evaluate after each, keep a run folder
(its layout: ``nlora.rundir``).

Rerunning the same command resumes after the last finished task. Every task seeds its own
randomness from (seed, task index), so a resumed run ends exactly where an uninterrupted
one does.
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
from nlora.data import Task, load_task
from nlora.evaluate import Prediction, accuracy, predict
from nlora.io import write_json_atomic, write_text_atomic
from nlora.methods import get_method
from nlora.model import load_backbone
from nlora.rundir import collect_metrics, finished_tasks, prepare_run_dir, step_folders
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
    tasks = []
    for name in config.tasks:
        task = load_task(
            Path(config.data_dir), name, config.train_per_task, config.test_per_task, config.seed
        )
        for split, count in task.skipped.items():
            if count:
                log.warning(
                    "%s %s: left out %d rows whose label is not in labels.json",
                    task.name, split, count,
                )
        tasks.append(task)
    return tasks


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
        eval_model = method.eval_model(model, i)
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
    backbone = load_backbone(config.model)
    model = backbone.model.to(accelerator.device)
    encoder = Encoder(backbone.tokenizer, backbone.is_seq2seq, config.max_source_length)
    method = get_method(config.method)(config, backbone.is_seq2seq)
    method.is_main_process = accelerator.is_main_process
    method.encoder = encoder
    joint = method.joint  # multi-task learning: a single step on every task's data
    folders = step_folders(out_dir, tasks, joint)
    done = finished_tasks(out_dir, tasks, joint)
    log.info(
        "run %s: method %s, model %s, %d tasks (%d finished)",
        out_dir, config.method, config.model, len(tasks), done,
    )
    for j in range(done):
        model = method.restore_task(model, j, tasks[j], folders[j])
        log.info("restored task %d/%d %s from %s", j + 1, len(folders), folders[j].name, out_dir)

    for j in range(done, len(folders)):
        task, folder = tasks[j], folders[j]
        set_seed(config.seed + j)  # per-task seed: resume reproduces an uninterrupted run
        label = "joint training" if joint else f"task {j + 1}/{len(tasks)} {task.dataset}"
        model = method.begin_task(model, j, task)
        model, result = train_task(
            model, method, j, method.train_examples(j, tasks), encoder, accelerator,
            learning_rate=float(config.per_task("learning_rate", j)),
            epochs=int(config.per_task("epochs", j)),
            batch_size=config.batch_size,
            weight_decay=config.weight_decay,
            seed=config.seed + j,
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
        chosen = method.task_info(j)  # e.g. an automatic λ, the density a pruning kept
        scalars = {k: v for k, v in chosen.items() if isinstance(v, int | float)}
        if scalars:
            log.info("%s: %s", label, ", ".join(f"{k} {v:.4g}" for k, v in scalars.items()))
        every = joint or config.eval_on == "all"
        seen = list(range(len(tasks))) if every else list(range(j + 1))
        start = time.perf_counter()
        predictions = evaluate_tasks(
            model, method, encoder, tasks, seen, accelerator, config.eval_batch_size,
            config.eval_mode,
        )
        eval_seconds = time.perf_counter() - start
        if accelerator.is_main_process:
            _write_task_record(
                folder, j, tasks, predictions, result, eval_seconds, joint, chosen
            )
            method.task_recorded(j, folder)
            metrics = collect_metrics(out_dir, tasks, joint, config.eval_mode)
            write_json_atomic(out_dir / "metrics.json", metrics)
            accs = ", ".join(
                f"{tasks[i].dataset} {accuracy(p):.1f}" for i, p in predictions.items()
            )
            log.info("%s evaluated in %.0fs: %s", label, eval_seconds, accs)
        accelerator.wait_for_everyone()

    metrics = collect_metrics(out_dir, tasks, joint, config.eval_mode)
    if accelerator.is_main_process:
        write_json_atomic(out_dir / "metrics.json", metrics)
    return metrics


def _write_task_record(
    folder: Path,
    index: int,
    tasks: list[Task],
    predictions: dict[int, list[Prediction]],
    result: Any,
    eval_seconds: float,
    joint: bool = False,
    method_info: dict[str, Any] | None = None,
) -> None:
    lines = [
        json.dumps(
            {"task": tasks[i].name, "index": p.index, "prediction": p.prediction,
             "label": p.label, "correct": p.correct},
            ensure_ascii=False,
        )
        for i, preds in predictions.items()
        for p in preds
    ]
    write_text_atomic(folder / "predictions.jsonl", "\n".join(lines) + "\n")
    write_json_atomic(
        folder / "done.json",
        {
            "task": "joint" if joint else tasks[index].name,
            "index": index + 1,
            "accuracy": {tasks[i].name: accuracy(p) for i, p in predictions.items()},
            "train": {"steps": result.steps, "seconds": round(result.seconds, 2),
                      "first_loss": result.first_loss, "last_loss": result.last_loss,
                      "last_penalty": result.last_penalty},
            "eval_seconds": round(eval_seconds, 2),
            **({"method": method_info} if method_info else {}),
        },
    )


def print_results(metrics: dict[str, Any]) -> None:
    print(format_results(metrics))
