"""The one interface every continual-learning method implements.

The continual loop (``nlora.runner``) calls, for each task in order:
``train_examples`` -> ``begin_task`` -> (training steps, adding ``penalty``) -> ``end_task``,
then evaluates ``eval_model`` on every seen task. On resume, ``restore_task`` replays what
``end_task`` left on disk instead of training again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from transformers import PreTrainedModel

from nlora.config import RunConfig
from nlora.data import Example, Task


class ContinualMethod:
    name: ClassVar[str]

    def __init__(self, config: RunConfig, is_seq2seq: bool) -> None:
        self.config = config
        self.is_seq2seq = is_seq2seq
        self.is_main_process = True  # only the main process writes files (set by the runner)

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
