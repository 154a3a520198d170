"""O-LoRA (Wang et al., 2023; paper eq. 1): a fresh adapter per task kept orthogonal to the
earlier tasks' adapters.

loss = task loss + λ₁ · orth(A_1..A_{t-1}, A_t) + λ₂ · l2(θ_t), with, per ``--olora-orth``:

- ``abs`` (default, the released code): Σ_{i<t} Σ_modules Σ |entries of A_iᵀ A_t|, the form
  λ₁ = 0.5 was tuned for (O-LoRA's src/uie_trainer_lora.py);
- ``fro`` (the paper's eq. 1): Σ_{i<t} Σ_modules ‖A_iᵀ A_t‖²_F;

and per ``--olora-l2``: ``norm`` (default, the release) Σ over the new adapter's tensors of
their ℓ2 (Frobenius) norm, or ``squared`` ‖θ_t‖², the sum of their squared entries.

The paper writes ΔW = A B with A ∈ R^{d_in x r}; PEFT stores lora_A.weight as (r, d_in), so
the paper's A is lora_A.weightᵀ and A_iᵀ A_t = lora_A_i.weight @ lora_A_t.weightᵀ (r x r),
as in the O-LoRA code. θ_t is every parameter of the new adapter (its A and B). λ₁ and λ₂
may be one value per task (the released long-sequence script varies them).

Earlier updates are merged into the base after each task, but their A factors are kept
(frozen, detached) for the penalty; each task's saved adapter holds them, so resume reloads
them from the safetensors file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import PreTrainedModel

from nlora.adapters import lora_factors
from nlora.data import Task
from nlora.errors import ConfigError
from nlora.methods.base import register
from nlora.methods.nlora import NLoRA
from nlora.options import option


def module_key(name: str) -> str:
    """A module's name without PEFT's wrapper prefix, the same before and after merging."""
    return name.removeprefix("base_model.model.")


def orthogonality_penalty(
    model: torch.nn.Module, previous: dict[str, list[torch.Tensor]], form: str = "abs"
) -> torch.Tensor:
    """Σ_i Σ_modules of |A_iᵀ A_t| summed (``abs``) or ‖A_iᵀ A_t‖²_F (``fro``), A = lora_Aᵀ."""
    if form not in ("abs", "fro"):
        raise ConfigError(f"--olora-orth must be abs or fro, got {form!r}")
    terms = []
    for f in lora_factors(model):
        for old in previous.get(module_key(f.name), []):
            product = old.to(f.A.device) @ f.A.T  # (r_i, r): lora_A_i @ lora_A_tᵀ
            terms.append(product.abs().sum() if form == "abs" else product.pow(2).sum())
    if not terms:
        return torch.zeros((), device=next(model.parameters()).device)
    return torch.stack(terms).sum()


def l2_penalty(model: torch.nn.Module, form: str = "norm") -> torch.Tensor:
    """Σ over the new adapter's A and B of ‖·‖₂ (``norm``), or of their squares (``squared``)."""
    if form not in ("norm", "squared"):
        raise ConfigError(f"--olora-l2 must be norm or squared, got {form!r}")
    tensors = [t for f in lora_factors(model) for t in (f.A, f.B)]
    if form == "norm":
        return torch.stack([t.norm() for t in tensors]).sum()
    return torch.stack([t.pow(2).sum() for t in tensors]).sum()


OLORA_ORTH_FORMS = ("abs", "fro")  # O-LoRA's Σ|A_i A_tᵀ| as released, or eq. 1's ‖A_iᵀA_t‖²_F
OLORA_L2_FORMS = ("norm", "squared")  # Σ‖θ‖₂ per tensor as released, or ‖θ‖²
GROUP = "O-LoRA options (olora, olora+nlora)"


@dataclass
class OLoRAOptions:
    olora_lambda1: float | list[float] = option(
        0.5, "O-LoRA orthogonality weight λ₁, one or one per task (O-LoRA's scripts set it per "
        "order)", "float", GROUP, low=0, per_task=True)
    olora_lambda2: float | list[float] = option(
        0.0, "O-LoRA ℓ2 weight λ₂ on the new adapter, one or one per task (O-LoRA's scripts)",
        "float", GROUP, low=0, per_task=True)
    olora_orth: str = option("abs", "O-LoRA orthogonality term: sum of |entries| of A_i A_tᵀ as "
                             "released (abs) or the paper's squared Frobenius norm (fro)", "str",
                             GROUP, choices=OLORA_ORTH_FORMS)
    olora_l2: str = option("norm", "O-LoRA ℓ2 term: sum of each new tensor's ℓ2 norm as "
                           "released (norm) or of its squared entries (squared)", "str", GROUP,
                           choices=OLORA_L2_FORMS)

@register
class OLoRA(NLoRA):
    name = "olora"
    title = "O-LoRA"
    summary = ("a fresh adapter per task kept orthogonal to the earlier tasks' adapters (O-LoRA "
               "as released)")
    options = OLoRAOptions
    uses_l1 = False
    exact_sparsity = False
    released_scripts = "o-lora"
    own_schedule = True
    uses_l1 = False

    def __init__(self, config, is_seq2seq: bool) -> None:
        super().__init__(config, is_seq2seq)
        self.previous_A: dict[str, list[torch.Tensor]] = {}  # module -> earlier tasks' A

    def penalty(self, model, index, batch, outputs) -> torch.Tensor | None:
        settings = self.config.for_task(index)
        lambda1, lambda2 = float(settings.olora_lambda1), float(settings.olora_lambda2)
        loss = lambda1 * orthogonality_penalty(model, self.previous_A, self.config.olora_orth)
        if lambda2:
            loss = loss + lambda2 * l2_penalty(model, self.config.olora_l2)
        return loss

    def end_task(self, model, index: int, task: Task, folder: Path) -> PreTrainedModel:
        for f in lora_factors(model):
            self.previous_A.setdefault(module_key(f.name), []).append(f.A.detach().clone())
        return super().end_task(model, index, task, folder)

    def restore_task(self, model, index: int, task: Task, folder: Path) -> PreTrainedModel:
        state = load_file(folder / "adapter" / "adapter_model.safetensors")
        for key, tensor in state.items():
            if key.endswith(".lora_A.weight"):
                name = module_key(key.removesuffix(".lora_A.weight"))
                self.previous_A.setdefault(name, []).append(tensor)
        return super().restore_task(model, index, task, folder)
