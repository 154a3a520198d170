"""IncLoRA (paper Section 4.1): a fresh LoRA adapter per task, merged after the task, with no
penalty at all: the N-LoRA loop at λ = 0. Its schedule is O-LoRA's (the released IncLoRA runs
are O-LoRA's code at λ = 0); the paper's ablation NS is ``--method nlora --l1-lambda 0``."""

from __future__ import annotations

import torch

from nlora.methods.base import register
from nlora.methods.nlora import NLoRA


@register
class IncLoRA(NLoRA):
    name = "inclora"
    title = "IncLoRA"
    summary = ("a fresh LoRA adapter per task, merged after it, no penalty (the N-LoRA loop at "
               "λ = 0)")
    uses_l1 = False
    released_scripts = "o-lora-baseline"
    own_schedule = True
    uses_l1 = False

    def penalty(self, model, index, batch, outputs) -> torch.Tensor | None:
        return None  # no sparsity, no orthogonality: plain incremental adapters
