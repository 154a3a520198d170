"""The one interface every continual-learning method implements.

The continual loop (``nlora.runner``) calls, for each task in order:
``begin_task`` -> ``train_examples`` -> (training steps: each example becomes features with
``train_features``, batches come from ``collate_train``, the optimiser from
``make_optimizer``, ``penalty`` is added to the loss and
``after_step`` runs after every optimizer step) -> ``end_task``, then evaluates
``eval_model`` on every seen task and, once the task's record is written, calls
``task_recorded``. On resume, ``restore_task`` replays what ``end_task`` left on disk
instead of training again.

A method with ``joint = True`` (multi-task learning) gets one step instead: index 0, trained
on ``train_examples(0, tasks)``, then every task is evaluated once.

A method registers itself with ``@register``: its name, its facts (class attributes below)
and its own options (a dataclass of ``nlora.options.option`` fields, flattened into
``RunConfig`` under the method's prefix) live in its one file; the ``--method`` choices, the
presets, the demo and the docs read them from ``METHODS``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from transformers import PreTrainedModel

from nlora.batching import Encoder
from nlora.data import Example, Task

if TYPE_CHECKING:  # RunConfig is assembled from the registered methods' options
    from nlora.config import RunConfig


class ContinualMethod:
    name: ClassVar[str]
    title: ClassVar[str]  # as tables and docs print it, e.g. "N-LoRA"
    summary: ClassVar[str]  # one line for --help and docs/methods.md
    # the dataclass of this method's own options (nlora.options.option fields named with the
    # method's prefix), or None; a subclass shares its parent's unless it declares its own
    options: ClassVar[type | None] = None
    # values that replace the task order's preset when the user gives none (e.g. full
    # fine-tuning's learning rate); sources in docs/methods.md
    defaults: ClassVar[dict[str, Any]] = {}
    uses_l1: ClassVar[bool] = False  # the loss has N-LoRA's ℓ1 term (--l1-lambda applies)
    # a fresh adapter per task whose ΔW can be made exactly sparse (--prox-lambda,
    # --prune-density, --collision-free: docs/method.md, "Exact sparsity")
    exact_sparsity: ClassVar[bool] = False
    # Release facts, read from the class's own body only (``release_facts``: a subclass is
    # another method, with a release of its own or none): which released scripts bring its
    # schedule (nlora.release.SCRIPT_SETS), whether they do so under either protocol
    # (baselines run as their authors ran them), and a note printed when they are used.
    released_scripts: ClassVar[str | None] = None
    own_schedule: ClassVar[bool] = False
    release_note: ClassVar[str | None] = None
    joint: ClassVar[bool] = False  # True: one training phase on all tasks mixed
    per_task_model: ClassVar[bool] = False  # True: task i is answered by its own model
    # True: each task's saved adapter holds every update so far (one adapter trained on and
    # on), so task t's own update is its adapter minus task t-1's.
    cumulative_adapter: ClassVar[bool] = False
    # True: task t's adapter works on the base with tasks 1..t-1 merged (recorded with it)
    merges_earlier: ClassVar[bool] = False
    # False: only the latest finished task keeps its files (full fine-tuning's weights)
    keeps_every_task: ClassVar[bool] = True
    # parameter-space metrics of `nlora report` that do not apply to this method's saved
    # adapters (e.g. OO, when the saved factors are not a learned A but a factorisation of ΔW)
    undefined_metrics: ClassVar[tuple[str, ...]] = ()
    # the task families (nlora.families) it can learn; None: every one
    task_families: ClassVar[tuple[str, ...] | None] = None

    def __init__(self, config: RunConfig, is_seq2seq: bool) -> None:
        self.config = config
        self.is_seq2seq = is_seq2seq
        self.is_main_process = True  # only the main process writes files (set by the runner)
        self.encoder: Encoder | None = None  # set by the runner; for methods that batch data

    @classmethod
    def check_options(cls, config: RunConfig) -> None:
        """Refuse combinations of this method's options that cannot run (ConfigError), before
        anything runs; called for every registered method that defines it, whatever the
        run's method (its options exist in every config)."""

    def check(self, model: PreTrainedModel) -> None:
        """Refuse options that do not fit ``model`` (e.g. no module to adapt), leaving the
        model unchanged; called before the run folder is made."""

    def train_examples(self, index: int, tasks: list[Task]) -> list[Example]:
        """What task ``index`` trains on (replay mixes in earlier tasks here)."""
        return tasks[index].train

    def begin_task(self, model: PreTrainedModel, index: int, task: Task) -> torch.nn.Module:
        """Return the model to train on this task, with exactly its trainable parameters."""
        raise NotImplementedError

    def train_features(self, example: Example) -> dict[str, list[int]]:
        """One training example's token ids (a method may add its own fields)."""
        return self.encoder.train_features(example)

    def collate_train(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        """A padded training batch from ``train_features`` outputs."""
        return self.encoder.collate_train(features)

    def make_optimizer(
        self, params: list[torch.nn.Parameter], learning_rate: float, weight_decay: float
    ) -> torch.optim.Optimizer:
        """The task's optimiser over ``params`` (the trainable ones). A param group may carry
        ``lr_scale``: the loop sets its rate to that multiple of the step's learning rate."""
        return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)

    def penalty(
        self, model: torch.nn.Module, index: int, batch: dict[str, torch.Tensor], outputs: Any
    ) -> torch.Tensor | None:
        """An extra loss term added to the task loss at every step (None: nothing)."""
        return None

    def observe_step(self, index: int, task_loss: float) -> None:
        """The task loss of the optimiser step about to be applied: the training loss itself
        (the global batch's, weighted as the loop weighs it; the same on every process)."""

    def after_step(self, model: torch.nn.Module, index: int, optimizer: Any) -> None:
        """Called once after every optimiser step (not per micro-batch under gradient
        accumulation), e.g. for a proximal update of the trainable parameters."""

    def task_info(self, index: int) -> dict[str, Any]:
        """What the method chose or measured for task ``index`` (e.g. an automatic λ, the
        density it kept): recorded in that task's done.json under "method"."""
        return {}

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


def remove_superseded(previous: Path | None, current: Path, names: tuple[str, ...]) -> Path:
    """Once ``current`` is recorded, delete ``names`` (files only the latest finished task
    keeps) from the previous task's folder; returns ``current``, the next call's previous."""
    if previous is not None and previous != current:
        for name in names:
            (previous / name).unlink(missing_ok=True)
    return current


def release_facts(method: type[ContinualMethod]) -> tuple[str | None, bool, str | None]:
    """(released_scripts, own_schedule, release_note) as the method's own class sets them."""
    own = vars(method)
    return (own.get("released_scripts"), own.get("own_schedule", False),
            own.get("release_note"))


METHODS: dict[str, type[ContinualMethod]] = {}


def register(cls: type[ContinualMethod]) -> type[ContinualMethod]:
    """Class decorator: make a method selectable by its ``name``."""
    if cls.name in METHODS:
        raise ValueError(f"two methods are named {cls.name!r}")
    METHODS[cls.name] = cls
    return cls
