"""O-LoRA + N-LoRA (paper Table 4): O-LoRA's orthogonality (and ℓ2) penalty plus N-LoRA's
ℓ1 sparsity penalty (placed by ``--l1-on``), on the same fresh per-task adapter."""

from __future__ import annotations

import torch

from nlora.methods.base import register
from nlora.methods.nlora import l1_penalty
from nlora.methods.olora import OLoRA


@register
class OLoRANLoRA(OLoRA):
    name = "olora+nlora"
    title = "O-LoRA+N-LoRA"
    summary = ("O-LoRA's orthogonality penalty plus N-LoRA's ℓ1 penalty on the same adapter "
               "(paper Table 4)")
    uses_l1 = True
    released_scripts = "n-lora"
    release_note = (
        "olora+nlora (paper Table 4) has no released script: N-LoRA's schedule and λ, with "
        "O-LoRA's released penalty forms and λ1")
    uses_l1 = True

    def penalty(self, model, index, batch, outputs) -> torch.Tensor | None:
        loss = super().penalty(model, index, batch, outputs)
        if self.l1_lambda:
            loss = loss + self.l1_lambda * l1_penalty(model, self.config.l1_on)
        return loss
