"""The one interface every continual-learning method implements.

The continual loop (``nlora.runner``) calls, for each task in order:
``train_examples`` -> ``begin_task`` -> (training steps, adding ``penalty``) -> ``end_task``,
then evaluates ``eval_model`` on every seen task and, once the task's record is written,
calls ``task_recorded``. On resume, ``restore_task`` replays what ``end_task`` left on disk
instead of training again.

A method with ``joint = True`` (multi-task learning) gets one step instead: index 0, trained
on ``train_examples(0, tasks)``, then every task is evaluated once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from transformers import PreTrainedModel

from nlora.batching import Encoder
from nlora.config import RunConfig
from nlora.data import Example, Task


class ContinualMethod:
    name: ClassVar[str]
    joint: ClassVar[bool] = False  # True: one training phase on all tasks mixed

    def __init__(self, config: RunConfig, is_seq2seq: bool) -> None:
        self.config = config
        self.is_seq2seq = is_seq2seq
        self.is_main_process = True  # only the main process writes files (set by the runner)
        self.encoder: Encoder | None = None  # set by the runner; for methods that batch data

    def check_model(self, model: PreTrainedModel) -> None:
        """Refuse, with a ConfigError, a base model this method cannot train (before any work)."""

    def train_examples(self, index: int, tasks: list[Task]) -> list[Example]:
        """What task ``index`` trains on (replay mixes in earlier tasks here)."""
        return tasks[index].train

    def begin_task(self, model: PreTrainedModel, index: int, task: Task) -> torch.nn.Module:
        """Return the model to train on this task, with exactly its trainable parameters."""
        raise NotImplementedError

    def penalty(
        self, model: torch.nn.Module, index: int, batch: dict[str, torch.Tensor], outputs: Any
    ) -> torch.Tensor | None:
        """An extra loss term added to the task loss at every step (None: nothing)."""
        return None

    def end_task(
        self, model: torch.nn.Module, index: int, task: Task, folder: Path
    ) -> PreTrainedModel:
        """Save what this task learned under ``folder``; return the model for what follows."""
        raise NotImplementedError

    def restore_task(
        self, model: PreTrainedModel, index: int, task: Task, folder: Path
    ) -> PreTrainedModel:
        """Rebuild the state ``end_task`` left, from its files (resume)."""
        raise NotImplementedError

    def eval_model(self, model: PreTrainedModel, task_index: int) -> PreTrainedModel:
        """The model that answers for task ``task_index`` (a per-task method swaps here)."""
        return model

    def task_recorded(self, index: int, folder: Path) -> None:
        """Task ``index`` is recorded as finished (its done.json exists): tidy up old files."""
