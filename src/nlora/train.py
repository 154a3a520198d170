"""Train one task: AdamW at a constant learning rate on task loss + the method's penalty.

Devices and distribution go through Accelerate (``accelerate launch nlora run ...`` spreads
batches over GPUs); on one CPU process it is a plain loop.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from nlora.batching import Encoder
from nlora.data import Example
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
) -> tuple[torch.nn.Module, TrainResult]:
    features = [encoder.train_features(ex) for ex in examples]
    loader = DataLoader(
        features,
        batch_size=batch_size,
        shuffle=True,
        collate_fn=encoder.collate_train,
        generator=torch.Generator().manual_seed(seed),
    )
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError(f"method {method.name} left no trainable parameter")
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    model.train()
    start, losses, penalty_value, steps = time.perf_counter(), [], 0.0, 0
    total = epochs * len(loader)
    bar = tqdm(total=total, desc=desc, unit="step", disable=not accelerator.is_local_main_process)
    for _ in range(epochs):
        for batch in loader:
            outputs = model(**batch)
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
