"""ELLA, efficient lifelong learning for adapters (Das Biswas et al., EACL 2026,
arXiv 2601.02232): a fresh LoRA adapter per task, merged after it, trained with

    loss = task loss + λ · Σ_modules ‖ΔW_t ⊙ W_past‖²_F,

ΔW_t = scaling·B_t·A_t the new adapter's update and W_past = Σ_{i<t} ΔW_i the sum of the
earlier tasks' updates (element-wise product: the new update is pushed away from the
positions earlier tasks changed most, and is free where they changed little).

``--ella-reduce``: ``mean`` (default) divides the sum by the number of modules, as the
public re-implementation does (alexandra-dragomir/JumpLoRA, ``ella/core.py``,
``compute_ella_penalty_from_model(normalize_by_num_layers=True)``) and as its λ = 3e4 was
chosen for; ``sum`` is the sum over modules as the method is written. No official code
exists (docs/methods.md, "ELLA").

W_past lives in memory as one dense (out, in) matrix per module: the penalty multiplies it
entry by entry at every step, so a factored copy would be expanded at every step. On disk it
is stored factored: it is the sum of the earlier tasks' saved updates (their PEFT adapters,
t·r·(out + in) numbers after t tasks, fewer than the dense out·in while t < out·in / (r·(out +
in)), 64 tasks for T5-large's 1024 x 1024 modules at r = 8), and resume rebuilds it from them
with the same operations, bit for bit; no file of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from transformers import PreTrainedModel

from nlora.adapters import lora_factors, merge, module_key
from nlora.data import Task
from nlora.methods.base import register
from nlora.methods.inclora import IncLoRA
from nlora.options import option

ELLA_REDUCTIONS = ("mean", "sum")
GROUP = "ELLA options (ella, jumplora)"


@dataclass
class ELLAOptions:
    ella_lambda: float | list[float] = option(
        3e4, "ELLA weight λ of Σ‖ΔW_t ⊙ W_past‖²_F, one or one per task (the "
        "re-implementation's default, chosen for --ella-reduce mean); 0: IncLoRA", "float",
        GROUP, low=0, per_task=True)
    ella_reduce: str = option("mean", "ELLA: average the penalty over modules (mean, the "
                              "re-implementation) or sum it (sum, the method as written)",
                              "str", GROUP, choices=ELLA_REDUCTIONS)


def ella_penalty(
    deltas: dict[str, torch.Tensor], past: dict[str, torch.Tensor], reduce: str = "mean"
) -> torch.Tensor | None:
    """Σ (or mean) over the modules with a past of ‖ΔW ⊙ W_past‖²_F; None without a past."""
    terms = [(delta * past[key]).pow(2).sum() for key, delta in deltas.items() if key in past]
    if not terms:
        return None
    total = torch.stack(terms).sum()
    return total / len(terms) if reduce == "mean" else total


def peft_deltas(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{module: scaling·B·A} of the active PEFT adapter, differentiable."""
    return {module_key(f.name): f.scaling * (f.B @ f.A) for f in lora_factors(model)}


@register
class ELLA(IncLoRA):
    name = "ella"
    title = "ELLA"
    summary = ("a fresh adapter per task, penalised by ‖ΔW_t ⊙ W_past‖²_F (the earlier updates' "
               "sum), merged after it")
    options = ELLAOptions
    exact_sparsity = False  # W_past is rebuilt from the saved adapters, never pruned ones
    # the re-implementation's T5-large schedule (its README; lr and batch are the order's)
    defaults = {"epochs": 1}

    def __init__(self, config, is_seq2seq: bool) -> None:
        super().__init__(config, is_seq2seq)
        self.past: dict[str, torch.Tensor] = {}  # module -> Σ of earlier ΔW, dense (out, in)
        self.lambda_ = 0.0

    def begin_task(self, model: PreTrainedModel, index: int, task: Task) -> torch.nn.Module:
        self.lambda_ = float(self.config.for_task(index).ella_lambda)
        return super().begin_task(model, index, task)

    def deltas(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """This task's current update per module (what the penalty sees)."""
        return peft_deltas(model)

    def penalty(self, model, index, batch, outputs) -> torch.Tensor | None:
        if self.lambda_ == 0 or not self.past:
            return None
        value = ella_penalty(self.deltas(model), self.past, self.config.ella_reduce)
        return None if value is None else self.lambda_ * value

    @torch.no_grad()
    def add_to_past(self, deltas: dict[str, torch.Tensor]) -> None:
        """W_past ← W_past + ΔW_t, module by module."""
        for key, delta in deltas.items():
            delta = delta.detach().float()
            self.past[key] = self.past[key] + delta if key in self.past else delta.clone()

    def end_task(self, model, index: int, task: Task, folder: Path) -> PreTrainedModel:
        self.add_to_past(peft_deltas(model))
        return super().end_task(model, index, task, folder)

    def restore_task(self, model, index: int, task: Task, folder: Path) -> PreTrainedModel:
        # the saved adapter, loaded as PEFT does, gives the same ΔW as end_task computed
        model = PeftModel.from_pretrained(model, folder / "adapter")
        self.add_to_past(peft_deltas(model))
        return merge(model)
