"""N-LoRA (paper Section 3.3): a fresh LoRA adapter per task with an ℓ1 penalty on ΔW.

loss = task loss + λ_t · Σ_modules ‖scaling · B·A‖₁. After the task its adapter is saved
(PEFT format) and merged into the base weights, which stay frozen for later tasks.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel

from nlora.adapters import add_adapter, load_and_merge, lora_factors, merge, save_adapter
from nlora.data import Task
from nlora.l1 import l1_of_product
from nlora.methods.base import ContinualMethod


def l1_penalty(model: torch.nn.Module) -> torch.Tensor:
    """Σ over adapted modules of ‖scaling · B·A‖₁ for the active adapter."""
    terms = [l1_of_product(f.B, f.A, f.scaling) for f in lora_factors(model)]
    return torch.stack(terms).sum()


class NLoRA(ContinualMethod):
    name = "nlora"

    def begin_task(self, model: PreTrainedModel, index: int, task: Task) -> torch.nn.Module:
        self.l1_lambda = float(self.config.per_task("l1_lambda", index))
        return add_adapter(model, self.config, self.is_seq2seq)

    def penalty(self, model, index, batch, outputs) -> torch.Tensor | None:
        if self.l1_lambda == 0:
            return None
        return self.l1_lambda * l1_penalty(model)

    def end_task(self, model, index: int, task: Task, folder: Path) -> PreTrainedModel:
        if self.is_main_process:
            save_adapter(model, folder / "adapter")
        return merge(model)

    def restore_task(self, model, index: int, task: Task, folder: Path) -> PreTrainedModel:
        return load_and_merge(model, folder / "adapter")
