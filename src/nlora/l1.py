"""The ℓ1 norm of a LoRA update ΔW = scaling · B·A.

PEFT stores ``lora_A.weight`` as (r, in_features) and ``lora_B.weight`` as
(out_features, r), so ΔW = scaling · B @ A has the layer's own (out, in) shape.
"""

from __future__ import annotations

import torch


def l1_of_product_naive(B: torch.Tensor, A: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """‖scaling · B @ A‖₁, materialising the full product (reference form)."""
    return (B @ A).abs().sum() * abs(scaling)


def l1_of_product(B: torch.Tensor, A: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """‖scaling · B @ A‖₁ with autograd; the form the training loss uses."""
    return l1_of_product_naive(B, A, scaling)
