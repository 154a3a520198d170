"""The processes of a run: Accelerate's setup, actions on the main process only, and how
test rows are dealt out so that every row is evaluated the same way on any process count.

Precision is not set here: ``nlora.train.MixedPrecision`` applies it with torch's own AMP, so
runs at different precisions can follow each other in one process (Accelerate's mixed
precision is process-wide state that only a private API resets).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

from nlora.batching import Encoder
from nlora.data import Task
from nlora.errors import ConfigError, NloraError
from nlora.evaluate import Prediction, predict


def is_main_process() -> bool:
    """True in the process that prints and writes (rank 0; always true without a launcher)."""
    return int(os.environ.get("RANK", "0")) == 0


def make_accelerator(
    precision: str = "fp32", report_to: str | None = None, project_dir: Path | None = None
) -> Accelerator:
    """Accelerate for this run: its processes and device, checked against ``precision``.

    Several processes on a machine without a GPU run on CPU (gloo). A launch whose
    processes did not form one group, ``accelerate launch --cpu --num_processes N`` (which
    starts a single process) and fp16 on CPU (which Accelerate silently runs in fp32) are
    refused.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.cuda.is_available():
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    accelerator = Accelerator(log_with=report_to, project_dir=project_dir)
    if accelerator.num_processes != world:
        raise ConfigError(
            f"{world} processes were launched but Accelerate sees {accelerator.num_processes}; "
            "on CPU set ACCELERATE_USE_CPU=true (docs: README, several processes)"
        )
    single_cpu_launch = (
        world == 1 and "MASTER_ADDR" in os.environ
        and os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
        and not any(v in os.environ for v in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE"))
    )
    if single_cpu_launch:
        raise ConfigError(
            "accelerate launch --cpu starts a single process whatever --num_processes says "
            "(Accelerate runs several CPU processes only through MPI); start N processes with "
            "torchrun --nproc_per_node N -m nlora.cli run ..."
        )
    if precision == "fp16" and accelerator.device.type == "cpu":
        raise ConfigError(
            "--precision fp16 needs a GPU (on CPU Accelerate would silently train in fp32); "
            "use --precision bf16 or fp32"
        )
    return accelerator


def eval_share(
    encoder: Encoder, examples: list[Any], batch_size: int, rank: int, processes: int
) -> list[int]:
    """This process's test rows: whole length-sorted batches, dealt out in turn, so every row
    is evaluated in the same batch (same padding, same neighbours) on any process count."""
    lengths = [len(encoder.example_ids(ex)) for ex in examples]
    order = sorted(range(len(examples)), key=lambda i: lengths[i], reverse=True)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return [i for batch in batches[rank::processes] for i in batch]


def evaluate_tasks(
    model: torch.nn.Module,
    method: Any,
    encoder: Encoder,
    tasks: list[Task],
    indices: list[int],
    accelerator: Accelerator,
    batch_size: int,
    mode: str = "generate",
    prefix_cache: bool = True,
) -> dict[int, list[Prediction]]:
    """Predictions for each task in ``indices``; examples are split across processes."""
    results = {}
    for i in indices:
        task = tasks[i]
        eval_model = model if method is None else method.eval_model(model, i)  # None: as is
        mine = eval_share(encoder, task.test, batch_size, accelerator.process_index,
                           accelerator.num_processes)
        preds = predict(
            eval_model, encoder, [task.test[k] for k in mine], task.labels, batch_size,
            mode, desc=f"eval {task.dataset}", prefix_cache=prefix_cache,
            max_new_tokens=task.max_new_tokens,
        )
        preds = [Prediction(mine[p.index], p.prediction, p.label) for p in preds]
        if accelerator.num_processes > 1:
            preds = gather_object(preds)
        results[i] = sorted(preds, key=lambda p: p.index)
    return results


def on_main(accelerator: Accelerator, action: Callable[[], Any]) -> Any:
    """Run ``action`` on the main process only; an error there stops every process."""
    result, message = None, None
    if accelerator.is_main_process:
        try:
            result = action()
        except NloraError as err:
            message = str(err)
            if accelerator.num_processes == 1:
                raise
    if accelerator.num_processes > 1:
        box = [message]
        broadcast_object_list(box, from_process=0)
        if box[0] is not None:
            raise ConfigError(box[0])
    return result


def local_main_first(accelerator: Accelerator, action: Callable[[], Any]) -> Any:
    """``action`` on each machine's main process first (it may fill a cache), then on the
    others; an error in any first one stops every process (none waits forever)."""
    result, message = None, None
    if accelerator.is_local_main_process:
        try:
            result = action()
        except NloraError as err:
            if accelerator.num_processes == 1:
                raise
            message = str(err)
    if accelerator.num_processes > 1:
        messages = [m for m in gather_object([message]) if m]
        if messages:
            raise ConfigError(messages[0])
    if not accelerator.is_local_main_process:
        result = action()
    return result
