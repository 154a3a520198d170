"""OSF, Orthogonal Subspace Fine-tuning (Nayak et al., 2025, "Sculpting Subspaces"), through
PEFT's own tuner (``peft.tuners.osf``): each adapted weight is split by SVD into its top-k
singular directions, frozen, and the rest (U_low, S_low, V_low), trained; the update is kept
out of the preserved directions (U_highᵀ ΔW = 0 and ΔW V_highᵀ = 0).

Across tasks, as PEFT's OSF docs recommend: before each task the SVD is recomputed on the
current weights (the earlier tasks merged in) and the preserved share grows; by default task
t of T (0-based) preserves t/T of min(out, in) singular directions ("budget allocation"),
at least one (PEFT needs effective_rank ≥ 1) and at most min(out, in) - 1; ``--osf-preserve``
gives the shares per task instead (PEFT's example script uses 0.3,0.5,0.7 for three tasks).

``--osf-projection``: PEFT's tuner projects each *gradient* out of the preserved subspace.
AdamW rescales gradients entry by entry, so its steps leave that subspace (measured about
5% of ‖ΔW‖, docs/methods.md). ``parameter`` (default, what the paper states)
also projects U_low and V_low back after every optimizer step, so the update is exactly
orthogonal; ``gradient`` is the tuner alone.

The modules are the LoRA methods' (``--target-modules``, default the model type's query and
value) so every method adapts the same weights; PEFT's OSF default is every linear layer.

After the task the update ΔW = U_low·S_low·V_low − U₀·S₀·V₀ (PEFT's OSF forward writes it as
one rank-2r product) is saved as an exact PEFT LoRA adapter (scaling 1, ranks per module in
``rank_pattern``): the rank-2r factors, or ΔW and an identity when that is smaller. It is
merged through PEFT's LoRA merge both here and on resume, so a resumed run's weights are
bit-identical, and ``nlora report`` reads it like any adapter (OO does not apply: its A is
a factorisation, not a learned input subspace).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, OSFConfig, TaskType, get_peft_model
from peft.tuners.osf import OSFLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from transformers import PreTrainedModel

from nlora.adapters import load_and_merge, merge, save_adapter
from nlora.data import Task
from nlora.methods.base import ContinualMethod, register
from nlora.methods.olora import module_key
from nlora.options import option

ADAPTER = "default"


def preserved_share(config, index: int) -> float:
    if config.osf_preserve is not None:
        return float(config.osf_preserve[index])
    return index / len(config.tasks)


def preserved_rank(weight_shape: torch.Size, share: float) -> int:
    """How many top singular directions to keep: at least 1, at least one left to train."""
    smaller = min(weight_shape)
    return min(max(1, int(smaller * share)), smaller - 1)


def target_modules(config, model: PreTrainedModel) -> list[str] | None:
    if config.target_modules:
        return list(config.target_modules)
    mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model.config.model_type)
    return list(mapping) if mapping else None  # None: PEFT's OSF default


def exact_pattern(name: str) -> str:
    """A PEFT pattern key that matches exactly this module name."""
    return re.escape(name)


@torch.no_grad()
def project_out(layer: OSFLayer) -> None:
    """Put U_low and V_low back outside the preserved directions (as PEFT's gradient hook
    does to gradients: through U_high / V_high, or the initial low factors when square)."""
    params = layer.osf_svd_params[ADAPTER]
    u, v = params["U_low"], params["V_low"]
    if ADAPTER in layer._osf_U_high:
        high = layer._osf_U_high[ADAPTER]
        u.sub_(high @ (high.T @ u))
    else:
        low = layer._osf_U_low_init[ADAPTER]
        u.copy_(low @ (low.T @ u))
    if ADAPTER in layer._osf_V_high:
        high = layer._osf_V_high[ADAPTER]
        v.sub_((v @ high.T) @ high)
    else:
        low = layer._osf_V_low_init[ADAPTER]
        v.copy_((v @ low.T) @ low)


def update_factors(layer: OSFLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """ΔW = B @ A exactly, the smaller of: the rank-2r OSF factors, or ΔW with an identity."""
    params = layer.osf_svd_params[ADAPTER]
    B = torch.cat([params["U_low"] * params["S_low"].unsqueeze(0),
                   -(layer._osf_U_low_init[ADAPTER] * layer._osf_S_low_init[ADAPTER].unsqueeze(0))],
                  dim=1).detach()
    A = torch.cat([params["V_low"], layer._osf_V_low_init[ADAPTER]], dim=0).detach()
    out_features, in_features = B.shape[0], A.shape[1]
    if (out_features + in_features) * A.shape[0] <= (
        out_features * in_features + min(out_features, in_features) ** 2
    ):
        return B.contiguous(), A.contiguous()
    delta = B @ A
    if in_features <= out_features:  # ΔW @ I_in
        return delta, torch.eye(in_features, dtype=delta.dtype, device=delta.device)
    return torch.eye(out_features, dtype=delta.dtype, device=delta.device), delta  # I_out @ ΔW


OSF_PROJECTIONS = ("parameter", "gradient")
GROUP = "OSF options (orthogonal subspace fine-tuning)"


@dataclass
class OSFOptions:
    osf_preserve: list[float] | None = option(
        None, "OSF share of each weight's singular directions preserved, one per task "
        "(default: task t of T preserves t/T, at least one direction)", "floats", GROUP, low=0,
        high=1, high_open=True, per_task=True, nullable=True)
    osf_projection: str = option("parameter", "OSF: 'parameter' keeps every update outside the "
                                 "preserved subspace (paper); 'gradient' only projects "
                                 "gradients, as PEFT's tuner alone does", "str", GROUP,
                                 choices=OSF_PROJECTIONS)

@register
class OSF(ContinualMethod):
    name = "osf"
    title = "OSF"
    summary = ("full-rank updates kept outside each weight's preserved singular directions "
               "(PEFT's OSF)")
    options = OSFOptions
    defaults = {"learning_rate": 1e-5}  # PEFT OSF docs: 1e-5 to 1e-4
    undefined_metrics = ("OO",)

    def begin_task(self, model: PreTrainedModel, index: int, task: Task) -> torch.nn.Module:
        targets = target_modules(self.config, model)
        share = preserved_share(self.config, index)
        ranks = {}
        for name, module in model.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if isinstance(module, torch.nn.Linear) and (targets is None or leaf in targets
                                                         or name in targets):
                ranks[f"^{exact_pattern(name)}$"] = preserved_rank(module.weight.shape, share)
        config = OSFConfig(target_modules=targets, effective_rank=1, rank_pattern=ranks,
                           task_type=TaskType.SEQ_2_SEQ_LM if self.is_seq2seq
                           else TaskType.CAUSAL_LM)
        return get_peft_model(model, config)

    def after_step(self, model, index: int, optimizer: Any = None) -> None:
        if self.config.osf_projection == "parameter":
            for module in model.modules():
                if isinstance(module, OSFLayer):
                    project_out(module)

    def end_task(self, model, index: int, task: Task, folder: Path) -> PreTrainedModel:
        factors = {module_key(name): update_factors(module)
                   for name, module in model.named_modules() if isinstance(module, OSFLayer)}
        base = model.unload()  # the OSF layers go, the base weights are untouched
        ranks = {exact_pattern(name): B.shape[1] for name, (B, _) in factors.items()}
        lora = LoraConfig(
            r=1, lora_alpha=1, lora_dropout=0.0, target_modules=list(factors),
            rank_pattern=ranks, alpha_pattern=dict(ranks),  # scaling = alpha / r = 1 exactly
            task_type=TaskType.SEQ_2_SEQ_LM if self.is_seq2seq else TaskType.CAUSAL_LM,
        )
        model = get_peft_model(base, lora)
        with torch.no_grad():
            for name, module in model.named_modules():
                key = module_key(name)
                if key in factors and hasattr(module, "lora_A"):
                    B, A = factors[key]
                    module.lora_A[ADAPTER].weight.copy_(A)
                    module.lora_B[ADAPTER].weight.copy_(B)
        if self.is_main_process:
            save_adapter(model, folder / "adapter")
        return merge(model)

    def restore_task(self, model, index: int, task: Task, folder: Path) -> PreTrainedModel:
        return load_and_merge(model, folder / "adapter")
