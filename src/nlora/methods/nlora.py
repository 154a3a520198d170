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
from nlora.config import L1_AUTO
from nlora.data import Task
from nlora.errors import ConfigError
from nlora.l1 import l1_of_product
from nlora.methods.base import ContinualMethod
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


class NLoRA(ContinualMethod):
    name = "nlora"
    merges_earlier = True
    uses_l1 = True  # whether --l1-lambda (and its "auto") applies

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
        value = self.config.per_task("l1_lambda", index)
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
        if self.uses_l1 and self.config.per_task("l1_lambda", index) == L1_AUTO:
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

