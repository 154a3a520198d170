"""O-LoRA (Wang et al., 2023; paper eq. 1): a fresh adapter per task kept orthogonal to the
earlier tasks' adapters.

loss = task loss + λ₁ · Σ_{i<t} Σ_modules ‖A_iᵀ A_t‖²_F + λ₂ · ‖θ_t‖²

The paper writes ΔW = A B with A ∈ R^{d_in x r}; PEFT stores lora_A.weight as (r, d_in), so
the paper's A is lora_A.weightᵀ and A_iᵀ A_t = lora_A_i.weight @ lora_A_t.weightᵀ (r x r),
as in the O-LoRA code. θ_t is every parameter of the new adapter (its A and B).

Earlier updates are merged into the base after each task, but their A factors are kept
(frozen, detached) for the penalty; each task's saved adapter holds them, so resume reloads
them from the safetensors file.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import PreTrainedModel

from nlora.adapters import lora_factors
from nlora.data import Task
from nlora.methods.nlora import NLoRA


def module_key(name: str) -> str:
    """A module's name without PEFT's wrapper prefix, the same before and after merging."""
    return name.removeprefix("base_model.model.")


def orthogonality_penalty(
    model: torch.nn.Module, previous: dict[str, list[torch.Tensor]]
) -> torch.Tensor:
    """Σ_i Σ_modules ‖A_iᵀ A_t‖²_F with A = lora_A.weightᵀ (paper orientation)."""
    terms = []
    for f in lora_factors(model):
        for old in previous.get(module_key(f.name), []):
            terms.append((old.to(f.A.device) @ f.A.T).pow(2).sum())
    if not terms:
        return torch.zeros((), device=next(model.parameters()).device)
    return torch.stack(terms).sum()


def l2_penalty(model: torch.nn.Module) -> torch.Tensor:
    """‖θ_t‖²: squared ℓ2 norm of the active adapter's A and B."""
    return torch.stack([f.A.pow(2).sum() + f.B.pow(2).sum() for f in lora_factors(model)]).sum()


class OLoRA(NLoRA):
    name = "olora"
    uses_l1 = False

    def __init__(self, config, is_seq2seq: bool) -> None:
        super().__init__(config, is_seq2seq)
        self.previous_A: dict[str, list[torch.Tensor]] = {}  # module -> earlier tasks' A

    def penalty(self, model, index, batch, outputs) -> torch.Tensor | None:
        loss = self.config.olora_lambda1 * orthogonality_penalty(model, self.previous_A)
        if self.config.olora_lambda2:
            loss = loss + self.config.olora_lambda2 * l2_penalty(model)
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
