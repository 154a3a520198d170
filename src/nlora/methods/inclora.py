"""IncLoRA (paper Section 4.1; ablation NS of Fig. 6): a fresh LoRA adapter per task, merged
after the task, with no penalty at all. Exactly the N-LoRA loop at λ = 0."""

from __future__ import annotations

import torch

from nlora.methods.nlora import NLoRA


class IncLoRA(NLoRA):
    name = "inclora"
    uses_l1 = False

    def penalty(self, model, index, batch, outputs) -> torch.Tensor | None:
        return None  # no sparsity, no orthogonality: plain incremental adapters
