"""Train one task: AdamW at a constant learning rate on task loss + the method's penalty.

One optimiser step is one *global* batch of ``batch_size`` rows, whatever the number of
processes. The global batches are formed once per epoch from the seed (the same on 1 or N
processes); process p takes rows p, p + N, p + 2N, ... of each and runs them as micro-batches
of ``batch_size / (grad_accum · N)`` rows, accumulating gradients.

The loss of a step is the mean cross-entropy over every answer token of the global batch
(what one process computes on the whole batch at once): each micro-batch's mean loss is
weighted by its share of the global batch's answer tokens. The method's penalty gets the same
weights; they sum to one, so a penalty on the weights alone counts exactly once and a
per-token one (LwF) is averaged over the global batch. Gradients are summed over processes
by one all-reduce per step (no DDP wrapper, so the LM-head-at-answers forward of
``nlora.loss`` runs on any number of processes), then clipped to ``max_grad_norm`` through
Accelerate and applied. LoRA dropout draws its masks per row (``nlora.dropout``), so the
result does not depend on the process count either.

Two options reproduce the released code (``--protocol release`` sets them; the paper's
behaviour is the default): ``loss_parts`` N > 1 splits each global batch into N parts (the
releases' GPUs x accumulation steps) and takes the mean of the parts' mean losses, so a
token of a short part weighs more (the rows of part k are rows k, k + N, ... of the batch,
whatever the number of processes); ``zero_lr_steps`` runs each task's first optimiser steps
at learning rate 0 (AdamW's moments still take their gradients), as the releases' DeepSpeed
WarmupLR does.

On a causal model the first micro-batch is run both ways (LM head at the answers and the
model's own ``model(**batch).loss``); where the two losses differ beyond float tolerance (an
output transform this module does not know, e.g. Granite's ``logits_scaling``) the task
trains on the plain forward, and run.log says so.

A step whose loss is not finite, or exceeds ``DIVERGENCE_FACTOR`` times the first step's
(and twice the loss of a uniform guess over the vocabulary), raises ``Diverged``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from nlora.batching import IGNORE_INDEX, Encoder, LengthGroupedBatchSampler
from nlora.data import Example
from nlora.dropout import RowKeys, mix, use_row_keyed_dropout
from nlora.errors import ConfigError, NloraError
from nlora.loss import answer_head_forward, supports_answer_head
from nlora.methods.base import ContinualMethod

log = logging.getLogger("nlora")

DIVERGENCE_FACTOR = 10.0
ALL_REDUCE_BUCKET = 1 << 24  # gradient entries summed over processes per all-reduce call


class Diverged(NloraError):
    """The training loss became non-finite or exploded; the task is stopped."""

    def __init__(self, step: int, loss: float, task_loss: float, penalty: float) -> None:
        self.step, self.loss, self.task_loss, self.penalty = step, loss, task_loss, penalty
        super().__init__(
            f"loss {loss:.4g} at step {step} (task loss {task_loss:.4g}, penalty {penalty:.4g})"
        )


@dataclass
class TrainResult:
    steps: int
    seconds: float
    first_loss: float
    last_loss: float
    last_penalty: float


@dataclass
class StepRecord:
    """One optimiser step, for logging: ``step`` counts from 1 within the task."""

    step: int
    loss: float  # the task loss, without the penalty
    penalty: float  # the method's penalty as added to the loss (0 when it has none)
    learning_rate: float


def micro_batch_size(batch_size: int, grad_accum: int, processes: int) -> int:
    """Rows per forward pass; the global batch must split evenly."""
    parts = grad_accum * processes
    if batch_size % parts:
        raise ConfigError(
            f"--batch-size {batch_size} (the global batch) does not split into --grad-accum "
            f"{grad_accum} x {processes} processes; use a multiple of {parts}"
        )
    return batch_size // parts


def global_batches(
    lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool = True
) -> list[list[int]]:
    """The epoch's global batches (row indices), from the seed alone."""
    if group_by_length:
        return LengthGroupedBatchSampler(lengths, batch_size, seed).batches(epoch)
    gen = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(len(lengths), generator=gen).tolist()
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def process_share(
    batch: list[int], rank: int, processes: int, micro: int
) -> list[list[int]]:
    """This process's micro-batches of a global batch (rows rank, rank + N, ...)."""
    mine = batch[rank::processes]
    return [mine[i : i + micro] for i in range(0, len(mine), micro)]


def part_micro_batches(
    batch: list[int], parts: int, micro: int
) -> list[tuple[int, list[int]]]:
    """``loss_parts``: the global batch as ``parts`` parts (rows k, k + parts, ...), each cut
    into micro-batches of at most ``micro`` rows; (part, rows) of every micro-batch, in order.
    A part with no rows (a last batch shorter than ``parts``) has no micro-batch."""
    out = []
    for k in range(parts):
        rows = batch[k::parts]
        out += [(k, rows[i : i + micro]) for i in range(0, len(rows), micro)]
    return out


def answer_tokens(feature: dict[str, list[int]], is_seq2seq: bool) -> int:
    """Tokens the loss is computed on (a causal model's first label predicts nothing)."""
    labels = feature["labels"] if is_seq2seq else feature["labels"][1:]
    return sum(1 for t in labels if t != IGNORE_INDEX)


class DivergenceGuard:
    """Stops a task whose loss is non-finite or far above where it started."""

    def __init__(self, vocab_size: int | None) -> None:
        self.floor = 2 * math.log(vocab_size) if vocab_size else 0.0
        self.first: float | None = None

    def check(self, step: int, task_loss: float, penalty: float) -> None:
        loss = task_loss + penalty
        if not math.isfinite(loss):
            raise Diverged(step, loss, task_loss, penalty)
        if self.first is None:
            self.first = loss
        elif loss > max(DIVERGENCE_FACTOR * self.first, self.floor):
            raise Diverged(step, loss, task_loss, penalty)


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class MixedPrecision:
    """``--precision`` with torch's own AMP, as Accelerate's mixed precision does it: the
    forward under autocast (weights and optimiser state stay fp32) and, for fp16, a gradient
    scaler. Kept out of Accelerate's process-wide state, so runs at different precisions
    can follow each other in one process."""

    def __init__(self, precision: str, device: torch.device) -> None:
        self.dtype = AUTOCAST_DTYPES.get(precision)
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype is not None)

    def backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """True gradients before clipping (fp16's are scaled)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
        else:  # skips a step whose gradients overflowed, and adapts the scale
            self.scaler.step(optimizer)
            self.scaler.update()


def train_task(
    model: torch.nn.Module,
    method: ContinualMethod,
    index: int,
    examples: list[Example],
    encoder: Encoder,
    accelerator: Accelerator,
    learning_rate: float,
    epochs: int,
    batch_size: int,
    weight_decay: float,
    seed: int,
    desc: str = "train",
    group_by_length: bool = True,
    *,
    grad_accum: int = 1,
    max_grad_norm: float | None = None,
    precision: str = "fp32",
    on_step: Callable[[StepRecord], None] | None = None,
    loss_parts: int = 1,
    zero_lr_steps: int = 0,
) -> tuple[torch.nn.Module, TrainResult]:
    world, rank = accelerator.num_processes, accelerator.process_index
    micro = micro_batch_size(batch_size, grad_accum, world)
    if method.encoder is None:  # the runner sets it; a method used on its own gets this one
        method.encoder = encoder
    features = [method.train_features(ex) for ex in examples]
    tokens = [answer_tokens(f, encoder.is_seq2seq) for f in features]
    lengths = [len(f["input_ids"]) for f in features]
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError(f"method {method.name} left no trainable parameter")
    if world > 1:  # every process starts from the same weights
        for p in params:
            torch.distributed.broadcast(p.data, src=0)
    optimizer = accelerator.prepare(method.make_optimizer(params, learning_rate, weight_decay))
    amp = MixedPrecision(precision, accelerator.device)
    head_at_answers = not encoder.is_seq2seq and supports_answer_head(model)
    if head_at_answers:  # the fast loss must be the model's own loss, or it is not used
        first = global_batches(lengths, batch_size, seed, 0, group_by_length)[0][:micro]
        sample = method.collate_train([features[i] for i in first])
        head_at_answers = fast_loss_matches(
            model, {k: v.to(accelerator.device) for k, v in sample.items()}, amp
        )
    rows = RowKeys(max(lengths))
    undo_dropout = use_row_keyed_dropout(model, rows)
    guard = DivergenceGuard(getattr(getattr(model, "config", None), "vocab_size", None))
    device = accelerator.device
    model.train()
    start, losses, penalty_value, steps = time.perf_counter(), [], 0.0, 0
    total = epochs * -(-len(features) // batch_size)
    bar = tqdm(total=total, desc=desc, unit="step", disable=not accelerator.is_main_process)
    try:
        for epoch in range(epochs):
            for batch_rows in global_batches(lengths, batch_size, seed, epoch, group_by_length):
                sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss, penalty
                for part, weight in _weighted_micro_batches(batch_rows, tokens, rank, world,
                                                           micro, loss_parts):
                    rows.keys = [mix(seed, epoch, i) for i in part]
                    batch = method.collate_train([features[i] for i in part])
                    batch = {k: v.to(device) for k, v in batch.items()}
                    with amp.autocast():
                        outputs = (
                            answer_head_forward(model, batch) if head_at_answers
                            else model(**batch)
                        )
                    loss = outputs.loss.float() * weight
                    sums[0] += loss.detach().double()
                    penalty = method.penalty(model, index, batch, outputs)
                    if penalty is not None:
                        loss = loss + penalty * weight
                        sums[1] += (penalty.detach() * weight).double()
                    amp.backward(loss)
                rows.keys = None
                if world > 1:
                    _sum_over_processes(params, sums)
                task_loss, penalty_value = sums.tolist()
                guard.check(steps + 1, task_loss, penalty_value)
                method.observe_step(index, task_loss)
                if max_grad_norm:
                    amp.unscale(optimizer)
                    accelerator.clip_grad_norm_(params, max_grad_norm)
                lr = 0.0 if steps < zero_lr_steps else learning_rate
                for group in optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)
                amp.step(optimizer)
                method.after_step(model, index, optimizer)  # sees the step's own rate
                optimizer.zero_grad(set_to_none=True)
                losses.append(task_loss)
                steps += 1
                bar.update(1)
                bar.set_postfix(loss=f"{task_loss:.3f}", penalty=f"{penalty_value:.3g}")
                if on_step is not None:
                    on_step(StepRecord(steps, task_loss, penalty_value, lr))
    finally:
        bar.close()
        rows.keys = None
        undo_dropout()
        accelerator.free_memory()  # drop Accelerate's references before the next task's model
    result = TrainResult(
        steps=steps,
        seconds=time.perf_counter() - start,
        first_loss=losses[0],
        last_loss=losses[-1],
        last_penalty=penalty_value,
    )
    return model, result


def _weighted_micro_batches(
    batch: list[int], tokens: list[int], rank: int, world: int, micro: int, loss_parts: int
) -> list[tuple[list[int], float]]:
    """This process's micro-batches of a global batch, each with its weight in the step's loss.

    ``loss_parts`` 1: a micro-batch's share of the global batch's answer tokens, so the step's
    loss is the mean over every answer token, on any number of processes. N > 1: the mean of
    N parts' token means (the releases' per-GPU, per-micro-batch means), a micro-batch
    weighing 1/N times its share of its part's tokens. The weights of all processes sum to 1.
    """
    if loss_parts == 1:
        total = sum(tokens[i] for i in batch)
        return [(rows, sum(tokens[i] for i in rows) / total)
                for rows in process_share(batch, rank, world, micro)]
    pieces = part_micro_batches(batch, loss_parts, micro)
    parts = {k for k, _ in pieces}
    part_tokens = {k: sum(tokens[i] for i in batch[k::loss_parts]) for k in parts}
    return [(rows, sum(tokens[i] for i in rows) / part_tokens[k] / len(parts))
            for k, rows in pieces[rank::world]]


def fast_loss_matches(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], amp: MixedPrecision
) -> bool:
    """Whether the LM-head-at-answers loss equals the model's own ``model(**batch).loss`` on
    ``batch`` (dropout off); if not, one line in the log names the model and both losses."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), amp.autocast():
            fast = float(answer_head_forward(model, batch).loss)
            plain = float(model(**batch).loss)
    finally:
        model.train(was_training)
    # float32 losses agree to ~1e-6 (summation order); mixed precision rounds logits
    tolerance = 1e-4 if amp.dtype is None else 2e-2
    if math.isclose(fast, plain, rel_tol=tolerance, abs_tol=tolerance):
        return True
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    log.warning(
        "%s: the LM-head-at-answers loss (%.6g) differs from the model's own loss (%.6g) on the "
        "first batch (an output transform nlora does not apply?); training on the plain "
        "forward", type(inner).__name__, fast, plain,
    )
    return False


def _sum_over_processes(params: list[torch.nn.Parameter], sums: torch.Tensor) -> None:
    """Sum every gradient and the step's loss sums over processes (in place)."""
    for p in params:
        if p.grad is None:  # unused on this process (e.g. no rows here): a zero gradient
            p.grad = torch.zeros_like(p)
    for bucket in _buckets(params):
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])
        torch.distributed.all_reduce(flat)
        offset = 0
        for p in bucket:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
    torch.distributed.all_reduce(sums)


def _buckets(params: list[torch.nn.Parameter]) -> Iterator[list[torch.nn.Parameter]]:
    bucket, size = [], 0
    for p in params:
        full = size + p.numel() > ALL_REDUCE_BUCKET
        if bucket and (full or p.grad.dtype != bucket[0].grad.dtype):
            yield bucket
            bucket, size = [], 0
        bucket.append(p)
        size += p.numel()
    if bucket:
        yield bucket

