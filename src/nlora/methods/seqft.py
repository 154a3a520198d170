"""SeqFT (paper Section 4.1): full fine-tuning of every weight, task after task.

Also the base of the other full fine-tuning baselines (replay, ewc, lwf). After each task the
whole model is saved as ``model.safetensors`` in the task folder; once the next task is
recorded the previous copy is deleted, so a run keeps only the latest task's full weights
(one model's worth of disk) and resume loads them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from transformers import PreTrainedModel

from nlora.data import Task
from nlora.io import write_file_atomic
from nlora.methods.base import ContinualMethod, register, remove_superseded

WEIGHTS = "model.safetensors"


@register
class SeqFT(ContinualMethod):
    name = "seqft"
    title = "SeqFT"
    summary = "full fine-tuning on task after task"
    defaults = {"learning_rate": 1e-5}  # a LoRA rate (1e-3) destroys a pretrained model
    released_scripts = "seqft"
    keeps_every_task = False  # one model's worth of disk: the latest task's weights
    # files of a task folder that only the latest task needs (deleted for earlier tasks)
    latest_only: tuple[str, ...] = (WEIGHTS,)

    def __init__(self, config, is_seq2seq: bool) -> None:
        super().__init__(config, is_seq2seq)
        self.previous_folder: Path | None = None

    def begin_task(self, model: PreTrainedModel, index: int, task: Task) -> torch.nn.Module:
        model.requires_grad_(True)
        # Activations, not weights, dominate memory at batch 32; recomputing them in the
        # backward pass keeps full fine-tuning small (docs/methods.md, "Memory").
        # Dropout's random state is replayed, so results are unchanged. Non-reentrant: the
        # default of recent transformers, and the one EWC's Fisher pass (autograd.grad) needs.
        if getattr(model, "supports_gradient_checkpointing", False):
            model.gradient_checkpointing_enable({"use_reentrant": False})
            model.config.use_cache = False
        return model

    def end_task(self, model, index: int, task: Task, folder: Path) -> PreTrainedModel:
        model.requires_grad_(False)
        if getattr(model, "supports_gradient_checkpointing", False):
            model.gradient_checkpointing_disable()
        model.config.use_cache = True  # fast generation at evaluation
        if self.is_main_process:
            # save_model handles tied weights (embeddings shared with the output layer)
            write_file_atomic(folder / WEIGHTS, lambda tmp: save_model(model, tmp))
        return model

    def restore_task(self, model, index: int, task: Task, folder: Path) -> PreTrainedModel:
        if (folder / WEIGHTS).is_file():  # only the latest finished task keeps its weights
            load_model(model, folder / WEIGHTS, device=str(next(model.parameters()).device))
        self.previous_folder = folder
        return model

    def task_recorded(self, index: int, folder: Path) -> None:
        # the new task is safely recorded: the previous task's copy is no longer needed
        self.previous_folder = remove_superseded(self.previous_folder, folder, self.latest_only)
