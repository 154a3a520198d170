"""GORP, gradient low-rank projection for continual learning (Wang, Lyu, Sun and Jing,
"Continual Gradient Low-Rank Projection Fine-Tuning for LLMs", ACL 2025, arXiv 2507.02503):
LoRA and full-rank parameters trained side by side, the full-rank ones through low-rank
projected gradients, with the directions earlier tasks used kept out of later updates.

Per task t, as nlora reads the method (its repository, Wcxwcxw/GORP, holds no code; the
reading and what is not known are in docs/methods.md, "GORP"):

* a fresh LoRA adapter (the IncLoRA loop: trained at ``--learning-rate``, merged after the
  task) and, trained at ``--gorp-full-lr``, the full weights W (out × in) of the modules
  ``--gorp-modules`` names (T5: the cross-attention ``EncDecAttention`` q and v, the
  paper's full-rank part; a decoder-only model has no cross-attention: its attention output
  projection ``o_proj``, which the default LoRA targets leave alone);
* each step, W's gradient G is first projected off the shared space S (in × k, orthonormal,
  input side): G' = G − G S Sᵀ; then, GaLore-style, onto its own top-``--gorp-rank`` right
  singular vectors P (r × in, recomputed from G' every ``--gorp-refresh`` steps): Adam runs
  on R = G' Pᵀ (out × r) and W moves by the Adam step of R times P. Every update of W lies
  in span(P) ⊂ S⊥, so W x is unchanged for x in S;
* after the task, Adam's first moment read in full space (its exp_avg · P) is decomposed;
  the fewest of its top right singular vectors holding ``--gorp-threshold`` of its squared
  singular values join S.

Adam itself is ``torch.optim.AdamW``: R is a zero "shadow" parameter of that optimiser, set
to the projected gradient before each step and folded into W (then zeroed) after it, so the
moments are exactly Adam's on R. Saved per task: the LoRA adapter (``adapter/``, PEFT format)
and, for the latest finished task only, ``gorp_state.safetensors``: S and the full-rank W of
every trained module (after the LoRA merge), which resume and ``nlora export`` load. A plain
PEFT load of the adapters alone misses the full-rank part.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from nlora.adapters import module_key
from nlora.data import Task
from nlora.errors import ConfigError
from nlora.io import write_file_atomic
from nlora.methods.base import register, remove_superseded
from nlora.methods.inclora import IncLoRA
from nlora.options import option

STATE = "gorp_state.safetensors"
AUTO = "auto"
# the paper's full-rank part on T5 (cross-attention), and nlora's choice for models without one
AUTO_MODULES = (("EncDecAttention.q", "EncDecAttention.v"), ("self_attn.o_proj",))
GROUP = "GORP options"


@dataclass
class GORPOptions:
    gorp_modules: list[str] = option(
        [AUTO], "GORP: modules whose full weights train through projected gradients (name "
        "suffixes); auto: EncDecAttention.q,EncDecAttention.v (T5), else self_attn.o_proj",
        "names", GROUP)
    gorp_full_lr: float = option(1e-5, "GORP: learning rate of the full-rank weights (the "
                                 "paper's T5 setting, as summarised)", "float", GROUP, low=0)
    gorp_rank: int = option(8, "GORP: rank of the projected full-rank gradients", "int", GROUP,
                            low=1)
    gorp_refresh: int = option(10, "GORP: optimiser steps between recomputations of the "
                               "gradient projection", "int", GROUP, low=1)
    gorp_threshold: float = option(0.95, "GORP: share of the first moment's squared singular "
                                   "values whose directions join the shared space after a task",
                                   "float", GROUP, low=0, low_open=True, high=1)


def full_rank_weights(
    model: torch.nn.Module, patterns: list[str]
) -> dict[str, torch.nn.Parameter]:
    """{module key: weight} of the linear modules ``patterns`` name (``auto``: AUTO_MODULES),
    the same with or without a LoRA layer wrapped around them."""
    linears = {module_key(name).removesuffix(".base_layer"): m.weight
               for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    choices = AUTO_MODULES if patterns == [AUTO] else (tuple(patterns),)
    for suffixes in choices:
        found = {key: w for key, w in linears.items()
                 if any(key == s or key.endswith("." + s) for s in suffixes)}
        if found:
            return found
    raise ConfigError(f"--gorp-modules {','.join(patterns)}: no linear module of this model "
                      "matches; name its modules (e.g. --gorp-modules self_attn.o_proj)")


def project_off(grad: torch.Tensor, space: torch.Tensor | None) -> torch.Tensor:
    """G − G S Sᵀ: the gradient with no component along the input directions in S."""
    if space is None or space.shape[1] == 0:
        return grad
    return grad - (grad @ space) @ space.T


def top_right_vectors(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """The top ``rank`` right singular vectors of ``matrix``, as rows (rank × in)."""
    _, _, vh = torch.linalg.svd(matrix.float(), full_matrices=False)
    return vh[:rank].contiguous()


def extend_space(
    space: torch.Tensor | None, moment: torch.Tensor, threshold: float
) -> torch.Tensor:
    """S with the fewest top right singular directions of ``moment`` (out × in) that hold
    ``threshold`` of its squared singular values, made orthogonal to S."""
    _, s, vh = torch.linalg.svd(moment.double(), full_matrices=False)
    energy = s**2
    dim = moment.shape[1]
    if energy.sum() <= 0:
        return space if space is not None else moment.new_zeros(dim, 0)
    share = torch.cumsum(energy, 0) / energy.sum()
    k = min(int((share < threshold).sum()) + 1, energy.shape[0])
    new = vh[:k].T
    if space is not None and space.shape[1]:
        old = space.double()
        new = new - old @ (old.T @ new)  # already outside S up to rounding: make it exact
        new, _ = torch.linalg.qr(new)
        return torch.cat([old, new], dim=1).float()
    return new.float().contiguous()


class GORPAdamW(torch.optim.AdamW):
    """AdamW over the LoRA parameters and, for each full-rank weight W, its projected gradient
    R = (G − G S Sᵀ) Pᵀ held in a zero shadow parameter (see the module docstring).

    Its second group's ``lr_scale`` makes the training loop's learning rate the full-rank one.
    """

    def __init__(
        self, lora: list[torch.nn.Parameter], full: dict[str, torch.nn.Parameter],
        spaces: dict[str, torch.Tensor], learning_rate: float, full_lr: float,
        weight_decay: float, rank: int, refresh: int,
    ) -> None:
        self.full, self.spaces, self.rank, self.refresh = full, spaces, rank, refresh
        self.bases: dict[str, torch.Tensor] = {}  # P (r × in) per weight
        self.shadows = {
            key: torch.nn.Parameter(w.new_zeros(w.shape[0], min(rank, *w.shape)))
            for key, w in full.items()
        }
        self.steps = 0
        groups = [{"params": lora},
                  {"params": list(self.shadows.values()), "weight_decay": 0.0,
                   "lr_scale": full_lr / learning_rate if learning_rate else 0.0}]
        super().__init__([g for g in groups if g["params"]], lr=learning_rate,
                         weight_decay=weight_decay)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        for key, weight in self.full.items():
            grad = project_off(weight.grad.float(), self.spaces.get(key))
            if self.steps % self.refresh == 0:
                self.bases[key] = top_right_vectors(grad, self.shadows[key].shape[1])
            self.shadows[key].grad = grad @ self.bases[key].T
        loss = super().step(closure)
        for key, weight in self.full.items():
            shadow = self.shadows[key]
            weight.add_((shadow @ self.bases[key]).to(weight.dtype))
            shadow.zero_()
        self.steps += 1
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for weight in self.full.values():  # W is no parameter of the optimiser itself
            weight.grad = None

    def first_moment(self, key: str) -> torch.Tensor:
        """Adam's first moment of W's projected gradient, read in full space (out × in)."""
        state = self.state.get(self.shadows[key], {})
        if "exp_avg" not in state:
            return self.full[key].new_zeros(self.full[key].shape)
        return state["exp_avg"] @ self.bases[key]


@register
class GORP(IncLoRA):
    name = "gorp"
    title = "GORP"
    summary = ("LoRA plus full-rank weights trained through low-rank projected gradients kept "
               "off the directions earlier tasks' first moments used")
    options = GORPOptions
    exact_sparsity = False  # the full-rank part is dense by design
    released_scripts = None
    own_schedule = False
    latest_only = (STATE,)

    def __init__(self, config, is_seq2seq: bool) -> None:
        super().__init__(config, is_seq2seq)
        self.spaces: dict[str, torch.Tensor] = {}  # module -> S (in × k)
        self.full: dict[str, torch.nn.Parameter] = {}
        self.optimizer: GORPAdamW | None = None
        self.previous_folder: Path | None = None

    def check(self, model: PreTrainedModel) -> None:
        super().check(model)
        if self.config.precision == "fp16":
            raise ConfigError("--method gorp: --precision fp16 is not supported (its gradient "
                              "scaler does not see the full-rank gradients); use bf16 or fp32")
        full_rank_weights(model, self.config.gorp_modules)

    def begin_task(self, model: PreTrainedModel, index: int, task: Task) -> torch.nn.Module:
        model = super().begin_task(model, index, task)  # fresh adapter; base frozen
        self.full = full_rank_weights(model, self.config.gorp_modules)
        for weight in self.full.values():
            weight.requires_grad_(True)
        return model

    def make_optimizer(self, params, learning_rate: float, weight_decay: float):
        full = {id(w) for w in self.full.values()}
        lora = [p for p in params if id(p) not in full]
        c = self.config
        self.optimizer = GORPAdamW(lora, self.full, self.spaces, learning_rate, c.gorp_full_lr,
                                   weight_decay, c.gorp_rank, c.gorp_refresh)
        return self.optimizer

    def end_task(self, model, index: int, task: Task, folder: Path) -> PreTrainedModel:
        if self.optimizer is not None:
            for key in self.full:
                self.spaces[key] = extend_space(self.spaces.get(key),
                                                self.optimizer.first_moment(key),
                                                self.config.gorp_threshold)
        for weight in self.full.values():
            weight.requires_grad_(False)
        self.optimizer = None
        model = super().end_task(model, index, task, folder)  # saves the adapter, merges it
        if self.is_main_process:
            weights = full_rank_weights(model, self.config.gorp_modules)
            state = {f"space.{k}": v.contiguous() for k, v in self.spaces.items()}
            state |= {f"weight.{k}": w.detach().contiguous() for k, w in weights.items()}
            write_file_atomic(folder / STATE, lambda tmp: save_file(state, tmp))
        return model

    def restore_task(self, model, index: int, task: Task, folder: Path) -> PreTrainedModel:
        model = super().restore_task(model, index, task, folder)
        if (folder / STATE).is_file():  # only the latest finished task keeps it
            state = load_file(folder / STATE)
            self.spaces = {k[len("space."):]: v for k, v in state.items()
                           if k.startswith("space.")}
            with torch.no_grad():
                for key, weight in full_rank_weights(model, self.config.gorp_modules).items():
                    weight.copy_(state[f"weight.{key}"])
        self.previous_folder = folder
        return model

    def task_recorded(self, index: int, folder: Path) -> None:
        self.previous_folder = remove_superseded(self.previous_folder, folder, self.latest_only)
