"""SD-LoRA, scalable decoupled LoRA (Wu et al., ICLR 2025, "SD-LoRA: Scalable Decoupled
Low-Rank Adaptation for Class Incremental Learning"; code: github.com/WuYichen-97/SD-Lora-CL,
``backbone/lora.py``, ViT only). Each adapted weight is

    W = W₀ + Σ_{i<t} m_i · B_i A_i / (‖B_i‖_F ‖A_i‖_F) + α_t · scaling · B_t A_t,

the earlier tasks' directions frozen and normalised (by the product of the factors' Frobenius
norms, as the code divides), only their magnitudes m_i and the new task's A_t, B_t and α_t
(initialised to 0.8, the code's value) learned. W₀ never changes and nothing is merged.

When task t ends its update becomes a direction: m_t = α_t·scaling·‖B_t‖‖A_t‖, so the
function is unchanged. Deviation: the magnitudes are one scalar per task **per layer**; the
code shares one scalar per task across all layers, with which a normalised direction cannot
keep the function the task ended with (docs/methods.md, "SD-LoRA").

Saved after each task: ``adapter/``, the whole update Σ m_i D_i as one exact PEFT LoRA adapter
(factors stacked, rank (t+1)·r, scaling 1: plain ``PeftModel`` on the base model answers as
nlora does up to rounding; cumulative, like seqlora's); ``sdlora_state.safetensors``, every
task's own A_t, B_t and every magnitude so far, from which resume (and ``nlora load --task``)
rebuilds the layers task by task.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, TaskType
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import parametrize
from transformers import PreTrainedModel

from nlora.adapters import check_adapter, save_lora_factors
from nlora.data import Task
from nlora.errors import ConfigError
from nlora.io import write_file_atomic
from nlora.methods.base import ContinualMethod, register
from nlora.methods.jumplora import target_linears
from nlora.methods.osf import target_modules
from nlora.options import option

STATE = "sdlora_state.safetensors"
GROUP = "SD-LoRA options"


@dataclass
class SDLoRAOptions:
    sdlora_init_magnitude: float = option(0.8, "SD-LoRA: initial magnitude α_t of each new "
                                          "task's update (the code's 0.8)", "float", GROUP)


class SDLoRALayer(nn.Module):
    """Parametrisation W ↦ W + Σ_i m_i·D_i (+ α·scaling·B·A while a task trains)."""

    def __init__(self, weight: torch.Tensor, rank: int, scaling: float) -> None:
        super().__init__()
        self.rank, self.scaling = rank, scaling
        self.out_features, self.in_features = weight.shape
        self.old_A, self.old_B = nn.ParameterList(), nn.ParameterList()  # frozen
        self.magnitudes = nn.ParameterList()  # learned, one per earlier task
        self.A: nn.Parameter | None = None
        self.B: nn.Parameter | None = None
        self.alpha: nn.Parameter | None = None
        # the update as evaluation uses it (no gradient: nothing learns), computed once
        self.cached: torch.Tensor | None = None

    def start_task(self, alpha: float, device: torch.device) -> None:
        """A fresh update (Kaiming A, B = 0: the function is unchanged) and magnitude α."""
        self.cached = None
        self.A = nn.Parameter(torch.empty(self.rank, self.in_features, device=device))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.B = nn.Parameter(torch.zeros(self.out_features, self.rank, device=device))
        self.alpha = nn.Parameter(torch.tensor(alpha, device=device))

    def directions(self) -> list[torch.Tensor]:
        return [b @ a / (b.norm() * a.norm()) for a, b in zip(self.old_A, self.old_B,
                                                                strict=True)]

    def delta(self) -> torch.Tensor:
        total = None
        for m, d in zip(self.magnitudes, self.directions(), strict=True):
            total = m * d if total is None else total + m * d
        if self.A is not None:
            new = self.alpha * self.scaling * (self.B @ self.A)
            total = new if total is None else total + new
        return total

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            self.cached = None
            delta = self.delta()
        else:  # evaluation: the same update at every forward (generation: every token)
            if self.cached is None:
                self.cached = self.delta()
            delta = self.cached
        return weight if delta is None else weight + delta.to(weight.dtype)

    @torch.no_grad()
    def end_task(self) -> None:
        """The task's update becomes a frozen direction and a learned magnitude."""
        norm = self.B.norm() * self.A.norm()
        if norm > 0:  # an update that never moved has no direction: nothing to keep
            self.add_direction(self.A.detach().clone(), self.B.detach().clone(),
                               self.alpha.detach() * self.scaling * norm)
        self.A = self.B = self.alpha = None
        self.cached = None

    def add_direction(self, a: torch.Tensor, b: torch.Tensor, magnitude: torch.Tensor) -> None:
        self.old_A.append(nn.Parameter(a, requires_grad=False))
        self.old_B.append(nn.Parameter(b, requires_grad=False))
        self.magnitudes.append(nn.Parameter(magnitude.clone().reshape(())))
        self.cached = None


def sd_layers(model: nn.Module) -> dict[str, SDLoRALayer]:
    return {name: module.parametrizations.weight[0] for name, module in model.named_modules()
            if parametrize.is_parametrized(module, "weight")
            and isinstance(module.parametrizations.weight[0], SDLoRALayer)}


@register
class SDLoRA(ContinualMethod):
    name = "sdlora"
    title = "SD-LoRA"
    summary = ("earlier tasks' LoRA directions frozen and normalised, only their magnitudes and "
               "the new task's adapter learned")
    options = SDLoRAOptions
    cumulative_adapter = True  # each saved adapter is the whole update so far
    undefined_metrics = ("OO",)  # the saved A stacks every task's

    def __init__(self, config, is_seq2seq: bool) -> None:
        super().__init__(config, is_seq2seq)
        self.directions_before: dict[str, int] = {}  # layer -> directions before this task

    def check(self, model: PreTrainedModel) -> None:
        check_adapter(model, self.config, self.is_seq2seq)
        if target_modules(self.config, model) is None:
            raise ConfigError(f"no default modules to adapt for model type "
                              f"{model.config.model_type}: give --target-modules")

    def _layers(self, model: PreTrainedModel) -> dict[str, SDLoRALayer]:
        """The model's SD-LoRA layers, registered on its target layers the first time."""
        layers = sd_layers(model)
        if not layers:
            scaling = self.config.lora_alpha / self.config.lora_r
            for _, module in target_linears(self.config, model):
                parametrize.register_parametrization(
                    module, "weight", SDLoRALayer(module.weight, self.config.lora_r, scaling))
            layers = sd_layers(model)
        return layers

    def begin_task(self, model: PreTrainedModel, index: int, task: Task) -> torch.nn.Module:
        for param in model.parameters():
            param.requires_grad_(False)
        device = next(model.parameters()).device
        for layer in self._layers(model).values():
            layer.start_task(self.config.sdlora_init_magnitude, device)
            for magnitude in layer.magnitudes:
                magnitude.requires_grad_(True)
        return model

    def end_task(self, model, index: int, task: Task, folder: Path) -> PreTrainedModel:
        layers = self._layers(model)
        self.directions_before = {name: len(layer.old_A) for name, layer in layers.items()}
        for layer in layers.values():
            layer.end_task()
        if self.is_main_process:
            self.save(model, layers, folder)
        return model

    @torch.no_grad()
    def save(self, model: PreTrainedModel, layers: dict[str, SDLoRALayer], folder: Path) -> None:
        state = {}  # this task's own direction (if it moved) and every magnitude so far
        for name, layer in layers.items():
            if len(layer.old_A) > self.directions_before.get(name, 0):
                state[f"{name}.A"] = layer.old_A[-1].detach().cpu().contiguous()
                state[f"{name}.B"] = layer.old_B[-1].detach().cpu().contiguous()
            if len(layer.magnitudes):
                state[f"{name}.magnitudes"] = torch.stack(
                    [m.detach() for m in layer.magnitudes]).cpu().contiguous()
        write_file_atomic(folder / STATE, lambda tmp: save_file(state, tmp))
        # the whole update as one PEFT LoRA adapter: B = [m_i B_i / (‖B_i‖‖A_i‖)], A = [A_i]
        factors = {}
        for name, layer in layers.items():
            if len(layer.old_A):
                scaled = [m * b / (b.norm() * a.norm()) for a, b, m in
                          zip(layer.old_A, layer.old_B, layer.magnitudes, strict=True)]
                factors[name] = (torch.cat(scaled, 1), torch.cat(list(layer.old_A), 0))
        if not factors:
            return
        ranks = {f"^{re.escape(name)}$": b.shape[1] for name, (b, _) in factors.items()}
        config = LoraConfig(r=1, lora_alpha=1, lora_dropout=0.0, target_modules=list(factors),
                            rank_pattern=ranks, alpha_pattern=dict(ranks),  # scaling 1
                            task_type=TaskType.SEQ_2_SEQ_LM if self.is_seq2seq
                            else TaskType.CAUSAL_LM)
        save_lora_factors(folder / "adapter", config,
                          {name: (a, b) for name, (b, a) in factors.items()})

    def restore_task(self, model, index: int, task: Task, folder: Path) -> PreTrainedModel:
        state = load_file(folder / STATE)
        device = next(model.parameters()).device
        for name, layer in self._layers(model).items():
            if f"{name}.A" in state:
                layer.add_direction(state[f"{name}.A"].to(device), state[f"{name}.B"].to(device),
                                    torch.zeros((), device=device))
            if f"{name}.magnitudes" in state:  # every magnitude as this task left it
                with torch.no_grad():
                    for magnitude, value in zip(layer.magnitudes, state[f"{name}.magnitudes"],
                                                strict=True):
                        magnitude.copy_(value)
        return model
