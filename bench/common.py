"""Shared helpers of the benchmark scripts: timing, medians, tables and the JSON record."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from nlora.batching import Encoder
from nlora.train import global_batches

RESULTS = Path(__file__).resolve().parent / "results"


def timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """fn(*args) and its wall time in seconds."""
    start = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - start


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table (pasted as is into docs/performance.md)."""
    cells = [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def write_result(name: str, record: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    record = {**record, "machine": machine()}
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return path


class GlobalBatchSampler:
    """``global_batches`` as a DataLoader batch sampler: epoch e on the e-th pass."""

    def __init__(
        self, lengths: list[int], batch_size: int, seed: int, group_by_length: bool = True
    ) -> None:
        self.lengths, self.batch_size, self.seed = lengths, batch_size, seed
        self.group_by_length = group_by_length
        self.drop_last = False  # read by Accelerate if it prepares the loader
        self.epoch = 0

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        batches = global_batches(
            self.lengths, self.batch_size, self.seed, self.epoch, self.group_by_length
        )
        self.epoch += 1
        yield from batches


def make_train_loader(
    features: list[dict[str, list[int]]],
    encoder: Encoder,
    batch_size: int,
    seed: int,
    group_by_length: bool = True,
    collate: Callable[[list[dict[str, list[int]]]], dict[str, torch.Tensor]] | None = None,
) -> DataLoader:
    """One process's view of the training batches, as ``train_task`` forms them (benches,
    and a test)."""
    sampler = GlobalBatchSampler([len(f["input_ids"]) for f in features], batch_size, seed,
                                 group_by_length)
    return DataLoader(features, batch_sampler=sampler, collate_fn=collate or encoder.collate_train)
