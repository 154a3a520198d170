"""N-LoRA (paper Section 3.3): a fresh LoRA adapter per task with an ℓ1 penalty on ΔW.

loss = task loss + λ_t · Σ_modules ‖scaling · B·A‖₁. After the task its adapter is saved
(PEFT format) and merged into the base weights, which stay frozen for later tasks.

``--l1-on`` moves the penalty (paper Fig. 6 ablations), with PEFT's A (r, in), B (out, r):
``deltaw`` ‖scaling·B·A‖₁ (N-LoRA), ``a`` ‖A‖₁ (SA), ``b`` ‖B‖₁ (SB), ``a+b`` ‖A‖₁ + ‖B‖₁
(SAB), ``reference`` ‖A·B‖₁, the r x r product the public N-LoRA code penalises
(lora_A.weight @ lora_B.weight, no scaling; defined only for square modules).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel

from nlora.adapters import (
    LoraFactors,
    add_adapter,
    check_adapter,
    load_and_merge,
    lora_factors,
    merge,
    save_adapter,
)
from nlora.data import Task
from nlora.errors import ConfigError
from nlora.l1 import l1_of_product
from nlora.methods.base import ContinualMethod


def _term(f: LoraFactors, l1_on: str) -> torch.Tensor:
    if l1_on == "deltaw":
        return l1_of_product(f.B, f.A, f.scaling)
    if l1_on == "a":
        return f.A.abs().sum()
    if l1_on == "b":
        return f.B.abs().sum()
    if l1_on == "a+b":  # two independent penalties, one per factor
        return f.A.abs().sum() + f.B.abs().sum()
    if l1_on == "reference":
        return (f.A @ f.B).abs().sum()
    raise ConfigError(f"unknown --l1-on {l1_on!r}")


def l1_penalty(model: torch.nn.Module, l1_on: str = "deltaw") -> torch.Tensor:
    """Σ over adapted modules of the chosen ℓ1 term for the active adapter."""
    return torch.stack([_term(f, l1_on) for f in lora_factors(model)]).sum()


def check_reference_shapes(model: torch.nn.Module) -> None:
    """The released code's A·B is (r, in) @ (out, r): it exists only when in == out."""
    for f in lora_factors(model):
        if f.A.shape[1] != f.B.shape[0]:
            raise ConfigError(
                "--l1-on reference (the released N-LoRA term; --protocol release sets it) needs "
                f"square modules (in_features == out_features), but "
                f"{f.name} is {f.B.shape[0]}x{f.A.shape[1]} (out x in); adapt only square "
                "modules with --target-modules or choose another --l1-on"
            )


class NLoRA(ContinualMethod):
    name = "nlora"
    merges_earlier = True

    def check(self, model: PreTrainedModel) -> None:
        reference = self.config.l1_on == "reference"
        check_adapter(model, self.config, self.is_seq2seq,
                      check_reference_shapes if reference else None)

    def begin_task(self, model: PreTrainedModel, index: int, task: Task) -> torch.nn.Module:
        self.l1_lambda = float(self.config.per_task("l1_lambda", index))
        model = add_adapter(model, self.config, self.is_seq2seq)
        if self.config.l1_on == "reference":
            check_reference_shapes(model)  # refuse before any training
        return model

    def penalty(self, model, index, batch, outputs) -> torch.Tensor | None:
        if self.l1_lambda == 0:
            return None
        return self.l1_lambda * l1_penalty(model, self.config.l1_on)

    def end_task(self, model, index: int, task: Task, folder: Path) -> PreTrainedModel:
        if self.is_main_process:
            save_adapter(model, folder / "adapter")
        return merge(model)

    def restore_task(self, model, index: int, task: Task, folder: Path) -> PreTrainedModel:
        return load_and_merge(model, folder / "adapter")
