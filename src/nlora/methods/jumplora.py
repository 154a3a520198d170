"""JumpLoRA (Dragomir, Pintilie, Barbalau et al., arXiv 2604.16171): a fresh low-rank
update per task passed entry by entry through a JumpReLU with one learnable threshold τ,

    ΔW_t = scaling · JumpReLU_τ(B·A),  JumpReLU_τ(x) = x · [|x| > τ],

so the merged update is exactly sparse. Rules from the public code
(github.com/alexandra-dragomir/JumpLoRA, ``ella/jump_lora.py``, ``scripts/train_ella.py``):

* τ = exp(log τ), one log-threshold shared by every adapted module (``global``), learned
  through the straight-through estimator of JumpReLU SAEs: ∂/∂τ of x·[x > τ] is
  −(τ/ε)·K((x − τ)/ε), K the rectangle on (−½, ½), ε the bandwidth, averaged (not summed)
  over the module's entries as the code does; the two-sided form is the one-sided one on x
  minus the one on −x. x itself gets the gradient [|x| > τ].
* schedule over the task's T optimiser steps: the forward uses
  f·JumpReLU_τ(B·A) + (1 − f)·B·A, f = 0 until step t₀ = ⌊0.2·T⌋, rising linearly to 1 at
  t₁ = ⌊0.8·T⌋; at step t₀, τ is set to the (n − p + 1)-th smallest |B·A| over all modules
  (n entries, p LoRA parameters), so that about as many entries pass as LoRA has parameters.
  nlora takes t₀ ≥ 1 and f = 1 from t₁ = t₀ on (the code never initialises τ when t₀ = 0
  and divides by zero when t₁ = t₀, both on runs of fewer than 5 steps).
* on top of ELLA (the code's only mode: ``--ella-lambda``, the penalty on the blended ΔW)
  or of IncLoRA (``--ella-lambda 0``). After the task the sparse ΔW (the mask on |B·A| > τ,
  scaled) is merged and added to W_past.

Each layer's weight is parametrised (``torch.nn.utils.parametrize``) as W + ΔW_t during the
task; the update is saved as a sparse delta (``sparse_delta.safetensors``, nlora's format,
read by ``nlora report``/``load``): not a PEFT adapter, because a thresholded B·A is not
low-rank. The threshold, its step-t₀ value and the density are recorded in done.json.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from transformers import PreTrainedModel

from nlora.adapters import check_adapter
from nlora.data import Task
from nlora.errors import ConfigError
from nlora.methods.base import register
from nlora.methods.ella import ELLA
from nlora.methods.osf import target_modules
from nlora.options import option
from nlora.sparse import (
    SPARSE_DELTA_FILE,
    keep_nonzero,
    merge_sparse_delta,
    read_sparse_delta,
    save_sparse_delta,
)

LOG_THRESHOLD_INIT = -4.7  # the code's initial log τ (τ ≈ 0.009), used until step t₀
GROUP = "JumpLoRA options"


def _rectangle(x: torch.Tensor) -> torch.Tensor:
    return ((x > -0.5) & (x < 0.5)).to(x.dtype)


class _JumpReLU(torch.autograd.Function):
    """x·[x > τ] with the straight-through pseudo-gradient for τ (mean over entries)."""

    @staticmethod
    def forward(ctx, x, threshold, bandwidth):
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth = bandwidth
        return x * (x > threshold).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, threshold = ctx.saved_tensors
        grad_x = (x > threshold).to(grad.dtype) * grad
        grad_threshold = -(threshold / ctx.bandwidth) * (
            _rectangle((x - threshold) / ctx.bandwidth) * grad).mean()
        return grad_x, grad_threshold, None


def jump_relu(x: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """Two-sided JumpReLU: x where |x| > τ, 0 elsewhere."""
    return _JumpReLU.apply(x, threshold, bandwidth) - _JumpReLU.apply(-x, threshold, bandwidth)


class JumpDelta(nn.Module):
    """Parametrisation W ↦ W + scaling·(f·JumpReLU_τ(B·A) + (1 − f)·B·A) of one layer."""

    def __init__(self, weight: torch.Tensor, rank: int, scaling: float,
                 log_threshold: nn.Parameter, bandwidth: float) -> None:
        super().__init__()
        out_features, in_features = weight.shape
        self.A = nn.Parameter(torch.empty(rank, in_features, device=weight.device))
        self.B = nn.Parameter(torch.zeros(out_features, rank, device=weight.device))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as PEFT and the code
        self.log_threshold = log_threshold  # shared by every layer
        self.scaling, self.bandwidth, self.blend = scaling, bandwidth, 0.0

    def delta(self) -> torch.Tensor:
        raw = self.B @ self.A
        jump = jump_relu(raw, self.log_threshold.exp(), self.bandwidth)
        return self.scaling * (self.blend * jump + (1.0 - self.blend) * raw)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta().to(weight.dtype)

    @torch.no_grad()
    def sparse_delta(self) -> torch.Tensor:
        """The merged update: scaling·B·A where |B·A| > τ, exactly 0 elsewhere."""
        raw = self.B @ self.A
        return self.scaling * raw * (raw.abs() > self.log_threshold.exp()).to(raw.dtype)


def target_linears(config, model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The linear layers a LoRA adapter of ``config`` would adapt (``--target-modules``, else
    PEFT's default for the model type), matched as PEFT matches a list of names."""
    targets = target_modules(config, model) or []
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, nn.Linear)
            and any(name == t or name.endswith("." + t) for t in targets)]


def jump_layers(model: nn.Module) -> dict[str, JumpDelta]:
    """Module name -> its JumpDelta, for every parametrised layer of ``model``."""
    return {name: module.parametrizations.weight[0] for name, module in model.named_modules()
            if parametrize.is_parametrized(module, "weight")
            and isinstance(module.parametrizations.weight[0], JumpDelta)}


@dataclass
class JumpLoRAOptions:
    jumplora_bandwidth: float = option(1e-3, "JumpLoRA bandwidth ε of the threshold's "
                                       "straight-through gradient (the code's default)",
                                       "float", GROUP, low=0, low_open=True)
    jumplora_blend_start: float = option(0.2, "JumpLoRA: share of the task's steps after which "
                                         "τ is initialised and the dense → sparse blend "
                                         "starts (the code's first_interpolation_step)",
                                         "float", GROUP, low=0, high=1)
    jumplora_blend_end: float = option(0.8, "JumpLoRA: share of the task's steps at which the "
                                       "forward is fully sparse (final_interpolation_step)",
                                       "float", GROUP, low=0, high=1)


@register
class JumpLoRA(ELLA):
    name = "jumplora"
    title = "JumpLoRA"
    summary = ("ELLA (or IncLoRA: --ella-lambda 0) with ΔW = JumpReLU_τ(BA), a learned "
               "threshold: an exactly sparse update merged per task")
    options = JumpLoRAOptions
    undefined_metrics = ("OO",)  # the saved update is a sparse ΔW, it has no A

    @classmethod
    def check_options(cls, config) -> None:
        if config.jumplora_blend_end < config.jumplora_blend_start:
            raise ConfigError(f"--jumplora-blend-end {config.jumplora_blend_end:g} is before "
                              f"--jumplora-blend-start {config.jumplora_blend_start:g}")

    def __init__(self, config, is_seq2seq: bool) -> None:
        super().__init__(config, is_seq2seq)
        self.step, self.first, self.final = 0, 1, 1
        self.log_threshold: nn.Parameter | None = None

    def check(self, model: PreTrainedModel) -> None:
        check_adapter(model, self.config, self.is_seq2seq)  # the same modules and rank checks
        if target_modules(self.config, model) is None:
            raise ConfigError(f"no default modules to adapt for model type "
                              f"{model.config.model_type}: give --target-modules")

    def begin_task(self, model: PreTrainedModel, index: int, task: Task) -> torch.nn.Module:
        settings = self.config.for_task(index)
        self.lambda_ = float(settings.ella_lambda)
        steps = int(settings.epochs) * -(-len(task.train) // self.config.batch_size)
        self.first = max(1, int(self.config.jumplora_blend_start * steps))
        self.final = max(self.first, int(self.config.jumplora_blend_end * steps))
        self.step = 0
        for param in model.parameters():
            param.requires_grad_(False)
        device = next(model.parameters()).device
        self.log_threshold = nn.Parameter(torch.tensor(LOG_THRESHOLD_INIT, device=device))
        scaling = self.config.lora_alpha / self.config.lora_r
        for _, module in target_linears(self.config, model):
            layer = JumpDelta(module.weight, self.config.lora_r, scaling, self.log_threshold,
                              self.config.jumplora_bandwidth)
            parametrize.register_parametrization(module, "weight", layer)
        return model

    def deltas(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {name: layer.delta() for name, layer in jump_layers(model).items()}

    @torch.no_grad()
    def init_threshold(self, layers: dict[str, JumpDelta], index: int) -> None:
        """τ such that about as many |B·A| entries pass as the layers have LoRA parameters."""
        magnitudes = torch.cat([(layer.B @ layer.A).abs().flatten() for layer in layers.values()])
        lora = sum(layer.A.numel() + layer.B.numel() for layer in layers.values())
        kept_below = max(magnitudes.numel() - lora, 0)
        value = torch.kthvalue(magnitudes.cpu(), kept_below + 1).values
        self.log_threshold.copy_(value.clamp_min(1e-12).log().to(self.log_threshold))
        self.info.setdefault(index, {})["initial_threshold"] = float(value)

    def after_step(self, model: torch.nn.Module, index: int, optimizer: Any) -> None:
        self.step += 1
        layers = jump_layers(model)
        if self.step == self.first:
            self.init_threshold(layers, index)
        if self.step <= self.final:
            blend = 1.0 if self.final == self.first else min(
                1.0, max(0.0, (self.step - self.first) / (self.final - self.first)))
            for layer in layers.values():
                layer.blend = blend

    def end_task(self, model, index: int, task: Task, folder: Path) -> PreTrainedModel:
        layers = jump_layers(model)
        updates = {name: keep_nonzero(layer.sparse_delta()) for name, layer in layers.items()}
        for name in layers:  # back to the plain weights, as they were before the task
            parametrize.remove_parametrizations(model.get_submodule(name), "weight",
                                                leave_parametrized=False)
        if self.is_main_process:
            save_sparse_delta(updates, folder / SPARSE_DELTA_FILE)
        kept = sum(u.indices.numel() for u in updates.values())
        total = sum(u.shape[0] * u.shape[1] for u in updates.values())
        info = self.info.setdefault(index, {})
        info["threshold"] = float(self.log_threshold.detach().exp())
        info["density"] = kept / total if total else 0.0
        self.log_threshold = None
        return self._merge(model, updates, str(folder / SPARSE_DELTA_FILE))

    def _merge(self, model: PreTrainedModel, updates: dict, source: str) -> PreTrainedModel:
        merge_sparse_delta(model, updates, source)
        self.add_to_past({name: u.delta().to(next(model.parameters()).device)
                          for name, u in updates.items()})
        return model

    def restore_task(self, model, index: int, task: Task, folder: Path) -> PreTrainedModel:
        path = folder / SPARSE_DELTA_FILE
        return self._merge(model, read_sparse_delta(path), str(path))
