"""Train one task: AdamW at a constant learning rate on task loss + the method's penalty.

Devices and distribution go through Accelerate (``accelerate launch nlora run ...`` spreads
batches over GPUs); on one CPU process it is a plain loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from nlora.batching import Encoder, LengthGroupedBatchSampler
from nlora.data import Example
from nlora.loss import answer_head_forward, supports_answer_head
from nlora.methods.base import ContinualMethod


@dataclass
class TrainResult:
    steps: int
    seconds: float
    first_loss: float
    last_loss: float
    last_penalty: float


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
) -> tuple[torch.nn.Module, TrainResult]:
    features = [method.train_features(ex) for ex in examples]
    loader = make_train_loader(
        features, encoder, batch_size, seed, group_by_length, collate=method.collate_train
    )
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError(f"method {method.name} left no trainable parameter")
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    # The LM head only at answer positions needs the inner modules; a distributed wrapper
    # (DDP) must see its own forward to synchronise gradients, so it keeps the plain one.
    head_at_answers = (
        not encoder.is_seq2seq
        and accelerator.unwrap_model(model) is model
        and supports_answer_head(model)
    )
    model.train()
    start, losses, penalty_value, steps = time.perf_counter(), [], 0.0, 0
    total = epochs * len(loader)
    bar = tqdm(total=total, desc=desc, unit="step", disable=not accelerator.is_local_main_process)
    for _ in range(epochs):
        for batch in loader:
            outputs = answer_head_forward(model, batch) if head_at_answers else model(**batch)
            loss = outputs.loss
            penalty = method.penalty(accelerator.unwrap_model(model), index, batch, outputs)
            if penalty is not None:
                penalty_value = float(penalty.detach())
                loss = loss + penalty
            if not math.isfinite(float(loss.detach())):
                raise FloatingPointError(f"{desc}: loss became {float(loss)} at step {steps}")
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            method.after_step(accelerator.unwrap_model(model), index)
            losses.append(float(outputs.loss.detach()))
            steps += 1
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", l1=f"{penalty_value:.3g}")
    bar.close()
    model = accelerator.unwrap_model(model)
    accelerator.free_memory()  # drop Accelerate's references before the next task's model
    result = TrainResult(
        steps=steps,
        seconds=time.perf_counter() - start,
        first_loss=losses[0] if losses else float("nan"),
        last_loss=losses[-1] if losses else float("nan"),
        last_penalty=penalty_value,
    )
    return model, result


def make_train_loader(
    features: list[dict[str, list[int]]],
    encoder: Encoder,
    batch_size: int,
    seed: int,
    group_by_length: bool = True,
    collate: Callable[[list[dict[str, list[int]]]], dict[str, torch.Tensor]] | None = None,
) -> DataLoader:
    """Shuffled training batches; grouped by length (less padding) unless told otherwise.

    ``collate`` builds a batch (default: the encoder's); a method may add its own fields.
    """
    collate = collate or encoder.collate_train
    if group_by_length:
        sampler = LengthGroupedBatchSampler(
            [len(f["input_ids"]) for f in features], batch_size, seed
        )
        return DataLoader(features, batch_sampler=sampler, collate_fn=collate)
    return DataLoader(
        features,
        batch_size=batch_size,
        shuffle=True,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(seed),
    )
