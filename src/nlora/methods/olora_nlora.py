"""O-LoRA + N-LoRA (paper Table 4): O-LoRA's orthogonality (and ℓ2) penalty plus N-LoRA's
ℓ1 sparsity penalty (placed by ``--l1-on``), on the same fresh per-task adapter."""

from __future__ import annotations

import torch

from nlora.methods.nlora import l1_penalty
from nlora.methods.olora import OLoRA


class OLoRANLoRA(OLoRA):
    name = "olora+nlora"
    uses_l1 = True

    def penalty(self, model, index, batch, outputs) -> torch.Tensor | None:
        loss = super().penalty(model, index, batch, outputs)
        if self.l1_lambda:
            loss = loss + self.l1_lambda * l1_penalty(model, self.config.l1_on)
        return loss
