"""GainLoRA, gated integration of low-rank adaptation (Liang et al., NeurIPS 2025, "Gated
Integration of Low-Rank Adaptation for Continual Learning of Language Models"; code:
github.com/liangyanshuo/gainlora, ``src/t5_large.py`` and ``src/cl_trainer_gainlora_inflora.py``,
T5 only). Each task adds a LoRA branch designed as InfLoRA designs it (A fixed outside the
earlier tasks' input subspace, only B trained) and a gate that says, per input, how much the
branch contributes. Nothing is merged: every adapted layer answers

    y = W x + Σ_i a_i(x̄) · s · B_i A_i x,     s = lora_alpha / r,

with every task's branch and gate, whatever the task (no task identity at test time). The
gate of task i is

    a_i(x̄) = |2 σ(4 cos(g_i(x̄), k_i)) − 1|,   g_i(x̄) = SiLU(U_i SiLU(D_i x̄)),

D_i (h × d) and U_i (d × h) without bias (h = ``--gainlora-gate-hidden``, 100), k_i ∈ R^d a
key, and x̄ the mean of the input's token embeddings (the input embedding table's rows, before
any layer). The same a_i(x̄) scales branch i in every adapted layer (encoder and decoder).

x̄ is the prompt's: for T5 the encoder's input, computed once per input, so generation uses
the prompt's gates for every generated token (the code computes them in the encoder, which
generate runs once). For causal models the gate is likewise the prompt's: in training the
answer tokens (labels set) are left out of the mean, and a forward that continues from a key/
value cache (generation, label ranking) keeps the gates its prompt set. ``--gainlora-pool``
``mean`` divides by the number of prompt tokens; ``padded`` is the code's form
(``(mask · E).mean(dim=1)``: divided by the padded batch width, so x̄ depends on the batch).

Per task t (0-based), as the released code does it (chunk 1):

* begin: the new gate starts as a copy of the previous task's trained gate (D, U; the code
  loads ``trans_input.pt`` into the new one), the first one from PyTorch's Linear init. Its
  key k_t is the top eigenvector of the covariance of the gate's outputs g_t(x̄) over the
  task's training inputs taken outside the span M_g of the earlier tasks' gate outputs, scaled
  to the norm of a U(−1, 1)^d draw (the code's key init, replaced by that direction). The new
  branch's A_t per layer is InfLoRA's design (``nlora.methods.inflora.design_A``: top
  directions of the layer's inputs outside the layer's memory, rows of norm 1/√3); B_t = 0.
* train: B_t, D_t, U_t and k_t; earlier branches and gates frozen (bitwise). After every
  optimiser step of tasks t ≥ 1 the step of D_t, U_t and k_t is projected out of the earlier
  tasks' gate-input subspaces: W ← W_old + ΔW (I − M Mᵀ), with M the memory of D's inputs x̄,
  of U's inputs SiLU(D x̄) and of the key's partner g(x̄); then each row is scaled back to the
  norm the unprojected step gave it (the code's renormalisation; ``--no-gainlora-renorm``
  keeps the plain projection). So g_t on earlier inputs stays g_{t−1}'s and cos(g_t, k_t)
  stays near 0 there: a_t ≈ 0 on earlier tasks.
* end: GPM memories, InfLoRA's ``update_memory``: per adapted layer over its inputs on the
  trained model (threshold ε_t = ε + (1 − ε)·t/T, ε = ``--gainlora-threshold``), and for the
  gate over x̄, SiLU(D x̄) and g(x̄) (ε = ``--gainlora-gate-threshold``), energy measured as the
  code does (``--gainlora-memory released``: singular values of C squared; ``paper``: GPM's).

Deviations (docs/methods.md, "GainLoRA"): T is the run's number of tasks (the code fixes 15,
its orders' length); a layer's input covariance is that layer's own input (the code records
the attention block's input for q and v, also for cross-attention's v, which reads the
encoder output); the key direction is the top eigenvector of the symmetric projection
(I − MMᵀ)C(I − MMᵀ), the code's the top left singular vector of (I − MMᵀ)C. The code's
pseudo-replay (``--data_replay_freq``, off in its scripts but one) is not part.

Saved per task: ``adapter/``, the task's own branch as a PEFT LoRA adapter (ungated: s·B_t A_t,
read by ``nlora report``); ``gainlora_state.safetensors``, its branch and gate (D, U, key), from
which resume rebuilds the layers task by task; ``gainlora_memory.safetensors``, the memories
(latest task only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig, TaskType
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from nlora.adapters import check_adapter, save_lora_factors
from nlora.batching import IGNORE_INDEX
from nlora.data import Example, Task
from nlora.errors import ConfigError
from nlora.io import write_file_atomic
from nlora.methods.base import ContinualMethod, register, remove_superseded
from nlora.methods.inflora import (
    INFLORA_VARIANTS,
    complement_basis,
    design_A,
    input_covariances,
    top_eigenvectors,
    update_memory,
)
from nlora.methods.jumplora import target_linears
from nlora.methods.osf import target_modules
from nlora.options import option

STATE = "gainlora_state.safetensors"
MEMORY = "gainlora_memory.safetensors"
GATE_PARTS = ("down", "up", "key")  # memory of D's inputs, U's inputs, the key's partner
POOLS = ("mean", "padded")
GROUP = "GainLoRA options (Liang et al., 2025)"


# --- gates ------------------------------------------------------------------------------------

def gate_value(features: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """a = |2σ(4·cos(features, key)) − 1| per row of ``features`` (…, d)."""
    cos = F.cosine_similarity(features, key.expand_as(features), dim=-1)
    return (2 * torch.sigmoid(4 * cos) - 1).abs()


class TaskGate(nn.Module):
    """One task's gate: g(x̄) = SiLU(U SiLU(D x̄)) and its key k."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        # uninitialised (no draw from the global random stream): the method fills them
        self.down = nn.utils.skip_init(nn.Linear, dim, hidden, bias=False)
        self.up = nn.utils.skip_init(nn.Linear, hidden, dim, bias=False)
        self.key = nn.Parameter(torch.zeros(dim))

    def hidden(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.silu(self.down(pooled))

    def features(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.silu(self.up(self.hidden(pooled)))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return gate_value(self.features(pooled), self.key)


class GateState:
    """The gates of the forward pass under way, shared by the model's adapted layers."""

    def __init__(self) -> None:
        self.values: torch.Tensor | None = None  # (batch, tasks)
        # a training batch's prompt positions (causal models), set by collate_train
        self.prompt_ids: torch.Tensor | None = None
        self.prompt_mask: torch.Tensor | None = None

    def for_rows(self, rows: int) -> torch.Tensor:
        values = self.values
        if values is None:
            raise RuntimeError("GainLoRA: an adapted layer ran before its gates were computed")
        if values.shape[0] != rows:  # e.g. beams expanded after the prompt was read
            if rows % values.shape[0]:
                raise RuntimeError(f"GainLoRA: gates for {values.shape[0]} rows, layer sees "
                                   f"{rows}")
            values = values.repeat_interleave(rows // values.shape[0], dim=0)
        return values


class GainGates(nn.Module):
    """Every task's gate (a submodule of the model, so its parameters are the model's)."""

    def __init__(self, dim: int, hidden: int, pool: str) -> None:
        super().__init__()
        self.dim, self.hidden, self.pool = dim, hidden, pool
        self.gates = nn.ModuleList()
        self.state = GateState()

    def pooled(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x̄ (batch, d): the embeddings' mean over the positions where ``mask`` is 1."""
        weights = mask.unsqueeze(-1).float()
        total = (embeds.float() * weights).sum(1)
        if self.pool == "padded":  # the code: (mask · E).mean(dim=1), over the padded width
            return total / embeds.shape[1]
        return total / weights.sum(1).clamp(min=1)

    def values(self, pooled: torch.Tensor) -> torch.Tensor:
        return torch.stack([gate(pooled) for gate in self.gates], dim=1)


class GainBranches(nn.Module):
    """The LoRA branches of one adapted linear layer, one (A, B) per task."""

    def __init__(self, base: nn.Linear, scaling: float, dropout: float) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.scaling = scaling
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def add_branch(self, rank: int, device: torch.device) -> None:
        self.lora_A.append(nn.Parameter(torch.zeros(rank, self.in_features, device=device),
                                        requires_grad=False))
        self.lora_B.append(nn.Parameter(torch.zeros(self.out_features, rank, device=device),
                                        requires_grad=False))

    def delta(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """Σ_i a_i · s · B_i A_i x, with ``gates`` (batch, tasks)."""
        h = self.dropout(x).float()
        total = None
        shape = (-1,) + (1,) * (x.dim() - 1)
        for i, (a, b) in enumerate(zip(self.lora_A, self.lora_B, strict=True)):
            term = gates[:, i].view(shape) * ((h @ a.T) @ b.T)
            total = term if total is None else total + term
        return total * self.scaling


def _add_branches(module: nn.Linear, args: tuple, output: torch.Tensor) -> torch.Tensor:
    branches = module.gainlora
    if not len(branches.lora_A):
        return output
    gates = branches.state[0].for_rows(args[0].shape[0])
    return output + branches.delta(args[0], gates).to(output.dtype)


def _continues_cache(kwargs: dict[str, Any]) -> bool:
    """Whether this forward continues from a key/value cache that holds earlier tokens."""
    for value in kwargs.values():
        length = getattr(value, "get_seq_length", None)
        if callable(length) and length() > 0:
            return True
    past = kwargs.get("past_key_values")
    return isinstance(past, tuple | list) and len(past) > 0


def _gate_inputs(gates: GainGates, embedding: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of the stack that reads the prompt (T5 encoder, causal decoder)."""
    state = gates.state
    if not len(gates.gates) or _continues_cache(kwargs):
        return  # generation or ranking continues: the prompt's gates stand
    ids = kwargs.get("input_ids", args[0] if args else None)
    embeds = kwargs.get("inputs_embeds")
    if embeds is None:
        embeds = embedding(ids)
    mask = kwargs.get("attention_mask")
    if mask is None or mask.dim() != 2:
        mask = torch.ones(embeds.shape[:2], device=embeds.device)
    if (ids is not None and state.prompt_ids is not None
            and state.prompt_ids.shape == ids.shape
            and torch.equal(state.prompt_ids.to(ids.device), ids)):
        mask = mask * state.prompt_mask.to(mask.device)  # causal training: the prompt only
    state.values = gates.values(gates.pooled(embeds, mask))


def gate_host(model: nn.Module, is_seq2seq: bool) -> nn.Module:
    """The stack whose input is the prompt: the encoder (seq2seq) or the causal decoder."""
    if is_seq2seq:
        return model.get_encoder()
    inner = getattr(model, "model", None)
    return inner if isinstance(inner, nn.Module) else model


# --- options ----------------------------------------------------------------------------------

@dataclass
class GainLoRAOptions:
    gainlora_gate_hidden: int = option(100, "GainLoRA hidden size h of each gate MLP "
                                       "(--mlp_hidden_dim 100 in the GainLoRA scripts)", "int",
                                       GROUP, low=1, high=65536)
    gainlora_threshold: float = option(0.995, "GainLoRA base energy threshold ε of the "
                                       "branches' input memory (--threshold, GainLoRA "
                                       "scripts)", "float", GROUP, low=0, low_open=True, high=1)
    gainlora_gate_threshold: float = option(0.995, "GainLoRA base energy threshold ε of the "
                                            "gates' input memories (--transthreshold, "
                                            "GainLoRA scripts)", "float", GROUP, low=0,
                                            low_open=True, high=1)
    gainlora_a_design: str = option("paper", "GainLoRA: A of each branch as InfLoRA's "
                                    "'paper' design (the GainLoRA code's) or 'released' "
                                    "(InfLoRA's random projected A)", "str", GROUP,
                                    choices=INFLORA_VARIANTS)
    gainlora_memory: str = option("released", "GainLoRA: GPM energy as the GainLoRA code "
                                  "measures it ('released') or as GPM defines it ('paper')",
                                  "str", GROUP, choices=INFLORA_VARIANTS)
    gainlora_pool: str = option("mean", "GainLoRA gate input x̄: mean over the prompt's "
                                "tokens ('mean') or, as the code, the masked sum over the "
                                "padded batch width ('padded')", "str", GROUP, choices=POOLS)
    gainlora_renorm: bool = option(True, "GainLoRA: after projecting a gate step, scale each "
                                   "row back to its unprojected norm (the code does)", "bool",
                                   GROUP)


# --- the method -------------------------------------------------------------------------------

@register
class GainLoRA(ContinualMethod):
    name = "gainlora"
    title = "GainLoRA"
    summary = ("a gated InfLoRA branch per task, all kept: each input weighs every branch by "
               "its task's gate")
    options = GainLoRAOptions
    # GainLoRA T5 scripts: lr 3e-4 constant, dropout 0; the gates read each prompt whole, so
    # no shared-prefix cache (a prefix alone would get its own gates)
    defaults = {"learning_rate": 3e-4, "lora_dropout": 0.0, "prefix_cache": False}
    released_scripts = "gainlora"  # the GainLoRA release's SuperNI scripts (nlora.release)
    latest_only = (MEMORY,)

    def __init__(self, config, is_seq2seq: bool) -> None:
        super().__init__(config, is_seq2seq)
        self.memory: dict[str, torch.Tensor] = {}  # adapted layer -> d × k basis
        self.gate_memory: dict[str, torch.Tensor] = {}  # GATE_PARTS -> basis
        self.before_step: dict[str, torch.Tensor] = {}  # current gate before the step
        self.step_memory: dict[str, torch.Tensor] = {}  # gate memories on the gate's device
        self.previous_folder: Path | None = None
        # x̄ of the current task's training prompts (float64, CPU): the input embeddings are
        # frozen, so begin_task's values serve end_task too
        self.task_pooled: torch.Tensor | None = None
        self.model_gates: GainGates | None = None  # the gates of the model being trained

    def check(self, model: PreTrainedModel) -> None:
        check_adapter(model, self.config, self.is_seq2seq)
        if target_modules(self.config, model) is None:
            raise ConfigError(f"no default modules to adapt for model type "
                              f"{model.config.model_type}: give --target-modules")

    # --- the model's GainLoRA parts

    def gates(self, model: nn.Module) -> GainGates:
        """The model's gates, with branches on its target layers, attached the first time."""
        found = getattr(model, "gainlora_gates", None)
        if found is not None:
            return found
        c = self.config
        embedding = model.get_input_embeddings()
        device = embedding.weight.device
        gates = GainGates(embedding.weight.shape[1], c.gainlora_gate_hidden, c.gainlora_pool)
        gates.to(device)
        model.gainlora_gates = gates
        model.reads_whole_prompts = True  # no shared-prefix cache (nlora.prefix)
        for _, module in target_linears(c, model):
            branches = GainBranches(module, c.lora_alpha / c.lora_r, c.lora_dropout)
            branches.state = [gates.state]  # a list: not a submodule
            module.gainlora = branches
            module.register_forward_hook(_add_branches)
        host = gate_host(model, self.is_seq2seq)
        host.register_forward_pre_hook(
            lambda module, args, kwargs: _gate_inputs(gates, embedding, args, kwargs),
            with_kwargs=True,
        )
        return gates

    @staticmethod
    def branches(model: nn.Module) -> dict[str, GainBranches]:
        return {name: m.gainlora for name, m in model.named_modules()
                if isinstance(getattr(m, "gainlora", None), GainBranches)}

    def collate_train(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        batch = self.encoder.collate_train(features)
        if not self.is_seq2seq and self.model_gates is not None:
            state = self.model_gates.state
            state.prompt_ids = batch["input_ids"]
            state.prompt_mask = (batch["labels"] == IGNORE_INDEX).long()
        return batch

    @torch.no_grad()
    def pooled_inputs(self, model: nn.Module, examples: list[Example]) -> torch.Tensor:
        """x̄ of each example's prompt (n × d), one example at a time (no padding)."""
        gates, embedding = self.model_gates, model.get_input_embeddings()
        device = embedding.weight.device
        rows = []
        for example in examples:
            batch = self.encoder.collate_train([self.encoder.train_features(example)])
            ids = batch["input_ids"].to(device)
            mask = batch["attention_mask"].to(device)
            if not self.is_seq2seq:
                mask = mask * (batch["labels"] == IGNORE_INDEX).to(device)
            rows.append(gates.pooled(embedding(ids), mask))
        return torch.cat(rows).double()

    # --- the continual loop

    def begin_task(self, model: PreTrainedModel, index: int, task: Task) -> torch.nn.Module:
        c = self.config
        gates = self.model_gates = self.gates(model)
        model.requires_grad_(False)
        device = model.get_input_embeddings().weight.device
        generator = torch.Generator().manual_seed(c.seed * 1000 + index)
        gate = TaskGate(gates.dim, gates.hidden)
        with torch.no_grad():
            if len(gates.gates):  # the code's gate carries on from the previous task's
                gate.load_state_dict(gates.gates[-1].state_dict())
            else:
                for linear in (gate.down, gate.up):  # PyTorch's Linear init, seeded
                    nn.init.kaiming_uniform_(linear.weight, a=math.sqrt(5), generator=generator)
            norm = torch.empty(gates.dim).uniform_(-1, 1, generator=generator).norm()
            # on the CPU, where the new gate is built
            pooled = self.task_pooled = self.pooled_inputs(model, task.train).cpu()
            features = gate.double().features(pooled)
            gate.float()
            covariance = features.T @ features / max(features.shape[0], 1)
            gate.key.copy_(key_direction(covariance, self.gate_memory.get("key")) * norm)
        gates.gates.append(gate.to(device))
        layers = self.branches(model)
        for branches in layers.values():
            branches.add_branch(c.lora_r, device)
        named = dict(model.named_modules())
        covariances = input_covariances(model, {n: named[n] for n in layers}, task.train,
                                        self.encoder)  # B_t = 0: the model answers as before
        for name, branches in layers.items():
            a = design_A(covariances[name], self.memory.get(name), c.lora_r,
                         c.gainlora_a_design, generator)
            with torch.no_grad():
                branches.lora_A[-1].copy_(a.to(device))
            branches.lora_B[-1].requires_grad_(True)  # only B of the new branch trains
        gate.requires_grad_(True)
        self.before_step = {k: v.detach().clone() for k, v in gate_weights(gate).items()}
        self.step_memory = {k: v.to(device) for k, v in self.gate_memory.items()}
        return model

    @torch.no_grad()
    def after_step(self, model: torch.nn.Module, index: int, optimizer: Any) -> None:
        gate = self.model_gates.gates[-1]
        if index > 0 and self.step_memory:
            for part, weight in gate_weights(gate).items():
                projected = project_step(weight, self.before_step[part],
                                         self.step_memory[part].to(weight),
                                         self.config.gainlora_renorm)
                weight.copy_(projected)
        self.before_step = {k: v.detach().clone() for k, v in gate_weights(gate).items()}

    def end_task(self, model, index: int, task: Task, folder: Path) -> PreTrainedModel:
        c = self.config
        gates = self.model_gates
        gate = gates.gates[-1]
        gates.state.prompt_ids = gates.state.prompt_mask = None  # training batches are over
        model.requires_grad_(False)
        layers = self.branches(model)
        named = dict(model.named_modules())
        covariances = input_covariances(model, {n: named[n] for n in layers}, task.train,
                                        self.encoder)
        share = index / len(c.tasks)
        threshold = c.gainlora_threshold + (1 - c.gainlora_threshold) * share
        self.memory = {name: update_memory(covariances[name], self.memory.get(name),
                                           threshold, c.gainlora_memory) for name in layers}
        gate_threshold = c.gainlora_gate_threshold + (1 - c.gainlora_gate_threshold) * share
        with torch.no_grad():
            pooled = self.task_pooled.to(gate.down.weight.device).float()
            inputs = {"down": pooled, "up": gate.hidden(pooled), "key": gate.features(pooled)}
        for part, x in inputs.items():
            x = x.double().cpu()
            self.gate_memory[part] = update_memory(x.T @ x / max(x.shape[0], 1),
                                                   self.gate_memory.get(part), gate_threshold,
                                                   c.gainlora_memory)
        if self.is_main_process:
            self.save(model, layers, gate, folder)
        return model

    def save(self, model, layers: dict[str, GainBranches], gate: TaskGate, folder: Path) -> None:
        state = {f"gate.{k}": v.detach().cpu().contiguous() for k, v in gate_weights(gate).items()}
        for name, branches in layers.items():
            state[f"{name}.A"] = branches.lora_A[-1].detach().cpu().contiguous()
            state[f"{name}.B"] = branches.lora_B[-1].detach().cpu().contiguous()
        write_file_atomic(folder / STATE, lambda tmp: save_file(state, tmp))
        memory = {f"layer.{k}": v.contiguous() for k, v in self.memory.items()}
        memory.update({f"gate.{k}": v.contiguous() for k, v in self.gate_memory.items()})
        write_file_atomic(folder / MEMORY, lambda tmp: save_file(memory, tmp))
        c = self.config  # the task's own branch, ungated, as a PEFT LoRA adapter
        config = LoraConfig(r=c.lora_r, lora_alpha=c.lora_alpha, lora_dropout=0.0,
                            target_modules=list(layers),
                            task_type=TaskType.SEQ_2_SEQ_LM if self.is_seq2seq
                            else TaskType.CAUSAL_LM)
        save_lora_factors(folder / "adapter", config,
                          {name: (state[f"{name}.A"], state[f"{name}.B"]) for name in layers})

    def restore_task(self, model, index: int, task: Task, folder: Path) -> PreTrainedModel:
        gates = self.model_gates = self.gates(model)
        device = model.get_input_embeddings().weight.device
        state = load_file(folder / STATE)
        gate = TaskGate(gates.dim, gates.hidden)
        with torch.no_grad():
            for part, weight in gate_weights(gate).items():
                weight.copy_(state[f"gate.{part}"])
        gates.gates.append(gate.to(device).requires_grad_(False))
        for name, branches in self.branches(model).items():
            branches.add_branch(state[f"{name}.A"].shape[0], device)
            with torch.no_grad():
                branches.lora_A[-1].copy_(state[f"{name}.A"])
                branches.lora_B[-1].copy_(state[f"{name}.B"])
        if (folder / MEMORY).is_file():  # only the latest finished task keeps its memory
            memory = load_file(folder / MEMORY)
            self.memory = {k.removeprefix("layer."): v for k, v in memory.items()
                           if k.startswith("layer.")}
            self.gate_memory = {k.removeprefix("gate."): v for k, v in memory.items()
                                if k.startswith("gate.")}
        self.previous_folder = folder
        return model.requires_grad_(False)

    def task_recorded(self, index: int, folder: Path) -> None:
        self.previous_folder = remove_superseded(self.previous_folder, folder, self.latest_only)


def gate_weights(gate: TaskGate) -> dict[str, torch.Tensor]:
    """The trained tensors of a gate by memory part: D (h × d), U (d × h), k as (1 × d)."""
    return {"down": gate.down.weight, "up": gate.up.weight, "key": gate.key.view(1, -1)}


def project_step(weight: torch.Tensor, before: torch.Tensor, memory: torch.Tensor,
                 renorm: bool) -> torch.Tensor:
    """before + ΔW (I − MMᵀ), rows scaled back to the unprojected rows' norms if ``renorm``."""
    step = weight - before
    projected = weight - (step @ memory) @ memory.T
    if renorm:
        norms = weight.norm(dim=1, keepdim=True)
        projected = projected * norms / projected.norm(dim=1, keepdim=True).clamp(min=1e-30)
    return projected


def key_direction(covariance: torch.Tensor, memory: torch.Tensor | None) -> torch.Tensor:
    """Unit top eigenvector of the gate-output covariance outside span(memory)."""
    dim = covariance.shape[0]
    basis = complement_basis(memory, dim)
    _, vectors = top_eigenvectors(basis.T @ covariance.double() @ basis)
    return (basis @ vectors[:, 0]).float()
