"""N-LoRA (paper Section 3.3): a fresh LoRA adapter per task with an ℓ1 penalty on ΔW.

loss = task loss + λ_t · Σ_modules ‖scaling · B·A‖₁. After the task its adapter is saved
(PEFT format) and merged into the base weights, which stay frozen for later tasks.

``--l1-on`` moves the penalty (paper Fig. 6 ablations), with PEFT's A (r, in), B (out, r):
``deltaw`` ‖scaling·B·A‖₁ (N-LoRA), ``a`` ‖A‖₁ (SA), ``b`` ‖B‖₁ (SB), ``a+b`` ‖A‖₁ + ‖B‖₁
(SAB), ``reference`` ‖A·B‖₁, the r x r product the public N-LoRA code penalises
(lora_A.weight @ lora_B.weight, no scaling; defined only for square modules).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from nlora.adapters import (
    LoraFactors,
    add_adapter,
    check_adapter,
    load_and_merge,
    lora_factors,
    merge,
    module_key,
    save_adapter,
)
from nlora.data import Task
from nlora.errors import ConfigError
from nlora.l1 import l1_of_product
from nlora.methods.base import METHODS, ContinualMethod, register
from nlora.options import option
from nlora.param_metrics import SparseUpdate
from nlora.sparse import (
    SPARSE_DELTA_FILE,
    keep_nonzero,
    lora_deltas,
    mask_lora_layers,
    merge_sparse_delta,
    prune_to_density,
    read_sparse_delta,
    save_sparse_delta,
    shrink_factors_,
    support,
)

log = logging.getLogger("nlora")

# Default sparsity weight of the ΔW-form penalty (sum of |entries| of scaling·B·A over all
# adapted modules). Chosen from the sweep recorded in docs/method.md.
DEFAULT_L1_LAMBDA = 1e-4
L1_AUTO = "auto"  # --l1-lambda auto: λ calibrated at the start of each task
# Where the ℓ1 penalty goes (paper Fig. 6 ablations, plus the released code's r x r form).
L1_PLACEMENTS = ("deltaw", "a", "b", "a+b", "reference")
GROUP = "N-LoRA sparsity (nlora, olora+nlora; exact zeros also inclora)"


@dataclass
class NLoRAOptions:
    l1_lambda: float | list[float] | str = option(
        DEFAULT_L1_LAMBDA, "ℓ1 weight, one value or one per task (scaled by the order's paper "
        "λ when not given), or 'auto': calibrated per task so that λ·‖ΔW‖₁ = --l1-auto-ratio "
        "× task loss after --l1-auto-steps steps", "float", GROUP, low=0, per_task=True,
        words=(L1_AUTO,))
    l1_on: str = option("deltaw", "where the ℓ1 penalty goes: ΔW (N-LoRA), A, B, A and B "
                        "separately, or the public code's r x r lora_A @ lora_B (square "
                        "modules)", "str", GROUP, choices=L1_PLACEMENTS)
    # --l1-lambda auto: after l1_auto_steps optimiser steps without penalty, λ is set so that
    # λ·‖ΔW‖₁ = l1_auto_ratio × the mean task loss of those steps (docs/method.md)
    l1_auto_ratio: float = option(1.0, "--l1-lambda auto: penalty / task loss", "float", GROUP,
                                  low=0, low_open=True)
    l1_auto_steps: int = option(5, "--l1-lambda auto: optimiser steps without penalty before "
                                "λ is chosen", "int", GROUP, low=1, high=2**20)
    # Exact sparsity (docs/method.md, "Exact sparsity")
    prox_lambda: float = option(0.0, "exact zeros by a proximal step: after every optimiser "
                                "step shrink each entry of A and B towards 0 by lr × this "
                                "(0: off)", "float", GROUP, low=0)
    prune_density: float | None = option(
        None, "exact zeros by pruning: at the end of each task keep this share of each "
        "module's ΔW entries, the largest; saved as a sparse delta (default: no pruning)",
        "float", GROUP, low=0, low_open=True, high=1, nullable=True)
    collision_free: bool = option(False, "a task never writes a weight an earlier task wrote "
                                  "(mask from their exact supports; needs --prune-density or "
                                  "--prox-lambda)", "bool", GROUP)


def _term(f: LoraFactors, l1_on: str) -> torch.Tensor:
    if l1_on == "deltaw":
        return l1_of_product(f.B, f.A, f.scaling)
    if l1_on == "a":
        return f.A.abs().sum()
    if l1_on == "b":
        return f.B.abs().sum()
    if l1_on == "a+b":  # two independent penalties, one per factor
        return f.A.abs().sum() + f.B.abs().sum()
    if l1_on == "reference":
        return (f.A @ f.B).abs().sum()
    raise ConfigError(f"unknown --l1-on {l1_on!r}")


def l1_penalty(model: torch.nn.Module, l1_on: str = "deltaw") -> torch.Tensor:
    """Σ over adapted modules of the chosen ℓ1 term for the active adapter."""
    return torch.stack([_term(f, l1_on) for f in lora_factors(model)]).sum()


def check_reference_shapes(model: torch.nn.Module) -> None:
    """The released code's A·B is (r, in) @ (out, r): it exists only when in == out."""
    for f in lora_factors(model):
        if f.A.shape[1] != f.B.shape[0]:
            raise ConfigError(
                "--l1-on reference needs square modules (the released N-LoRA term; "
                "--protocol release sets it), but "
                f"{f.name} is {f.B.shape[0]}x{f.A.shape[1]} (out x in); adapt only square "
                "modules with --target-modules or choose another --l1-on"
            )


@register
class NLoRA(ContinualMethod):
    name = "nlora"
    title = "N-LoRA"
    summary = "a fresh LoRA adapter per task with an ℓ1 penalty on ΔW, merged after the task"
    options = NLoRAOptions
    merges_earlier = True
    uses_l1 = True
    exact_sparsity = True
    released_scripts = "n-lora"

    @classmethod
    def check_options(cls, config) -> None:
        given = [flag for flag, on in (("--prox-lambda", config.prox_lambda),
                                       ("--prune-density", config.prune_density is not None),
                                       ("--collision-free", config.collision_free)) if on]
        sparse = [name for name, method in METHODS.items() if method.exact_sparsity]
        if given and not METHODS[config.method].exact_sparsity:
            raise ConfigError(f"{', '.join(given)} apply to --method {' or '.join(sparse)}"
                              f", not {config.method}")
        if config.collision_free and config.prune_density is None and not config.prox_lambda:
            raise ConfigError("--collision-free needs exact zeros, or the first task fills every "
                              "position: add --prune-density or --prox-lambda")

    def __init__(self, config, is_seq2seq: bool) -> None:
        super().__init__(config, is_seq2seq)
        # collision-free mode: module -> positions some earlier task wrote (exact support)
        self.used: dict[str, torch.Tensor] = {}
        self.allowed: dict[str, torch.Tensor] | None = None  # this task's writable positions
        self.info: dict[int, dict[str, Any]] = {}
        self.l1_lambda, self.l1_auto = 0.0, False
        self.steps, self.auto_losses = 0, []  # optimiser steps and losses of this task

    @property
    def sparse_output(self) -> bool:
        """Whether a task's update is saved and merged as a sparse delta (not low-rank)."""
        return self.config.prune_density is not None or self.config.collision_free

    def check(self, model: PreTrainedModel) -> None:
        reference = self.config.l1_on == "reference"
        check_adapter(model, self.config, self.is_seq2seq,
                      check_reference_shapes if reference else None)

    def begin_task(self, model: PreTrainedModel, index: int, task: Task) -> torch.nn.Module:
        value = self.config.for_task(index).l1_lambda
        self.l1_auto = value == L1_AUTO and self.uses_l1
        self.l1_lambda = 0.0 if value == L1_AUTO else float(value)
        self.steps, self.auto_losses = 0, []
        model = add_adapter(model, self.config, self.is_seq2seq)
        if self.config.l1_on == "reference":
            check_reference_shapes(model)  # refuse before any training
        self.allowed = None
        if self.config.collision_free and self.used:
            device = next(model.parameters()).device
            self.allowed = {key: (~used).to(device) for key, used in self.used.items()}
            mask_lora_layers(model, self.allowed)
        return model

    def l1_term(self, model: torch.nn.Module) -> torch.Tensor:
        if self.allowed is not None and self.config.l1_on == "deltaw":
            # only the positions this task may write count
            deltas = [
                (f.scaling * (f.B @ f.A)).masked_fill(~self.allowed[module_key(f.name)], 0.0)
                for f in lora_factors(model)
            ]
            return torch.stack([d.abs().sum() for d in deltas]).sum()
        return l1_penalty(model, self.config.l1_on)

    def observe_step(self, index: int, task_loss: float) -> None:
        """Keep the task loss of the calibration steps of --l1-lambda auto: each step's
        training loss as the loop weighs it, so λ does not depend on how the global batch is
        split into micro-batches or processes."""
        if self.l1_auto:
            self.auto_losses.append(task_loss)

    def penalty(self, model, index, batch, outputs) -> torch.Tensor | None:
        if self.l1_lambda == 0:
            return None
        return self.l1_lambda * self.l1_term(model)

    def after_step(self, model: torch.nn.Module, index: int, optimizer: Any) -> None:
        if getattr(optimizer, "step_was_skipped", False):  # fp16 overflow: nothing moved
            return
        self.steps += 1
        if self.l1_auto and self.steps == self.config.l1_auto_steps:
            self.calibrate_l1(model, index)
        if self.config.prox_lambda:
            lr = optimizer.param_groups[0]["lr"]
            shrink_factors_(model, lr * self.config.prox_lambda)

    @torch.no_grad()
    def calibrate_l1(self, model: torch.nn.Module, index: int) -> None:
        """λ such that λ·‖ΔW‖₁ = ratio × the mean task loss of the steps so far."""
        loss = sum(self.auto_losses) / len(self.auto_losses)
        norm = float(self.l1_term(model))
        self.l1_lambda = self.config.l1_auto_ratio * loss / norm if norm > 0 else 0.0
        self.l1_auto = False
        self.info.setdefault(index, {})["l1_lambda"] = self.l1_lambda
        self.info[index]["l1_auto"] = {
            "steps": self.steps, "task_loss": loss, "l1_norm": norm,
            "ratio": self.config.l1_auto_ratio,
        }
        log.info("task %d: --l1-lambda auto chose λ = %.4g (task loss %.4g, ‖ΔW‖₁ %.4g after "
                 "%d steps, ratio %g)", index + 1, self.l1_lambda, loss, norm, self.steps,
                 self.config.l1_auto_ratio)

    def task_info(self, index: int) -> dict[str, Any]:
        info = dict(self.info.get(index, {}))
        if self.uses_l1 and self.config.for_task(index).l1_lambda == L1_AUTO:
            if "l1_lambda" not in info:  # the task ended before calibration
                info["l1_lambda"] = 0.0
                info["l1_auto"] = f"not calibrated: the task had only {self.steps} steps"
                log.warning("task %d: --l1-lambda auto needs %d steps before it chooses λ, the "
                            "task had %d: trained without ℓ1 penalty", index + 1,
                            self.config.l1_auto_steps, self.steps)
        return info

    def end_task(self, model, index: int, task: Task, folder: Path) -> PreTrainedModel:
        if not self.sparse_output:
            if self.config.prox_lambda:  # the exact density the proximal steps left
                deltas = lora_deltas(model).values()
                nonzero = sum(int(torch.count_nonzero(d)) for d in deltas)
                self.info.setdefault(index, {})["density"] = nonzero / sum(
                    d.numel() for d in deltas)
            if self.is_main_process:
                save_adapter(model, folder / "adapter")
            return merge(model)
        deltas = lora_deltas(model, self.allowed)
        density = self.config.prune_density
        updates = {
            key: prune_to_density(dw, density) if density is not None else keep_nonzero(dw)
            for key, dw in deltas.items()
        }
        if self.is_main_process:
            save_sparse_delta(updates, folder / SPARSE_DELTA_FILE)
        kept = sum(u.indices.numel() for u in updates.values())
        total = sum(u.shape[0] * u.shape[1] for u in updates.values())
        self.info.setdefault(index, {})["density"] = kept / total if total else 0.0
        return self._merge_sparse(model.unload(), updates, index, str(folder))

    def _merge_sparse(
        self, model: PreTrainedModel, updates: dict[str, SparseUpdate], index: int, source: str
    ) -> PreTrainedModel:
        merge_sparse_delta(model, updates, source)
        if self.config.collision_free:
            for key, u in updates.items():
                mask = support(u)
                self.used[key] = self.used[key] | mask if key in self.used else mask
            used = sum(int(m.sum()) for m in self.used.values())
            total = sum(m.numel() for m in self.used.values())
            self.info.setdefault(index, {})["capacity_used"] = used / total if total else 0.0
        return model

    def restore_task(self, model, index: int, task: Task, folder: Path) -> PreTrainedModel:
        if (folder / SPARSE_DELTA_FILE).is_file():
            path = folder / SPARSE_DELTA_FILE
            return self._merge_sparse(model, read_sparse_delta(path), index, str(path))
        return load_and_merge(model, folder / "adapter")

