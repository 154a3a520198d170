"""InfLoRA, interference-free low-rank adaptation (Liang and Li, CVPR 2024): a fresh LoRA
adapter per task whose A is designed before training and frozen; only B trains. Every row of
A lies outside the input subspace M of the earlier tasks, so ΔW_t = s·B_t·A_t maps every
input in M to zero: the new task cannot change the adapted layers' outputs on earlier tasks'
inputs (within the captured energy), whatever B learns. Adapters are merged after each task.

Per adapted module, with H_t the inputs the module sees on task t's training tokens and
C_t = H_t H_tᵀ / n (d × d, accumulated over every non-padding token, one example at a time):

* design (before task t, ``paper``): A_t's rows are the top-r eigenvectors of
  (I − MMᵀ) C_t (I − MMᵀ), i.e. the top left singular vectors of Ĥ_t = (I − MMᵀ) H_t (the
  paper's Ĥ_t), taken inside the orthogonal complement of M, scaled by 1/√3 (the released
  code's scale). ``released`` is the public T5 code instead: a random (Kaiming) A with its
  M-component removed, rows scaled to norm 1/√3.
* memory (after task t, GPM as InfLoRA's T5 code runs it; DualGPM stores whichever of the
  basis or its complement is smaller, the same projection): with C_t recomputed on the
  trained model and threshold ε_t = ε + (1 − ε)·t/T (t 0-based, T tasks), add to M the top
  directions of Ĉ = (I − MMᵀ) C_t (I − MMᵀ) until the share of task t's input energy that
  M captures reaches ε_t (first task: the fewest top directions of C_t whose share reaches
  ε_t). ``paper`` measures energy as GPM defines it for the representation matrix H
  (eigenvalues of C); ``released`` as the InfLoRA code does: on the singular values of the
  d × d matrix C itself (squared), projecting C on one side only, and keeping one direction
  fewer at the first task (the GPM code's off-by-one).

Only B is trained, so the update stays outside M for any optimizer. M is saved per task as
``inflora_memory.safetensors`` (latest task only, like full weights); adapters in ``adapter/``
(PEFT format, so ``nlora report`` reads them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from nlora.adapters import lora_factors, save_adapter
from nlora.data import Example, Task
from nlora.io import write_file_atomic
from nlora.methods.base import register, remove_superseded
from nlora.methods.inclora import IncLoRA
from nlora.methods.olora import module_key
from nlora.options import option

MEMORY = "inflora_memory.safetensors"
SCALE = 1 / math.sqrt(3)  # row norm of A in both released codes


def complement_basis(memory: torch.Tensor | None, dim: int) -> torch.Tensor:
    """An orthonormal basis (dim × (dim − k)) of the orthogonal complement of ``memory``."""
    if memory is None or memory.shape[1] == 0:
        return torch.eye(dim, dtype=torch.float64)
    q, _ = torch.linalg.qr(memory.double(), mode="complete")
    return q[:, memory.shape[1]:]


def top_eigenvectors(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending) and eigenvectors of a symmetric matrix."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return values.flip(0).clamp(min=0), vectors.flip(1)


def design_A(
    covariance: torch.Tensor, memory: torch.Tensor | None, rank: int, variant: str = "paper",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A (rank × d): rows outside span(memory), scaled to norm 1/√3."""
    dim = covariance.shape[0]
    basis = complement_basis(memory, dim)  # d × (d − k)
    if variant == "released":  # random A with its component in M removed
        a = torch.empty(rank, dim, dtype=torch.float64)
        torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        a = (a @ basis) @ basis.T
    else:  # top directions of the new task's inputs inside the complement of M
        _, vectors = top_eigenvectors(basis.T @ covariance.double() @ basis)
        a = (basis @ vectors[:, :rank]).T
        if a.shape[0] < rank:  # the complement is smaller than r: no capacity left there
            a = torch.cat([a, a.new_zeros(rank - a.shape[0], dim)])
    norms = a.norm(dim=1, keepdim=True)
    return torch.where(norms > 0, a / norms.clamp(min=1e-30) * SCALE, a).float()


def update_memory(
    covariance: torch.Tensor, memory: torch.Tensor | None, threshold: float,
    variant: str = "paper",
) -> torch.Tensor:
    """GPM: extend ``memory`` with new directions of ``covariance`` until it captures
    ``threshold`` of the task's input energy (see the module docstring)."""
    c = covariance.double()
    dim = c.shape[0]
    power = 2 if variant == "released" else 1  # energy: S² of C (code) or λ of C (= S² of H)
    if memory is None or memory.shape[1] == 0:
        values, vectors = top_eigenvectors(c)
        energy = values**power
        share = torch.cumsum(energy, 0) / energy.sum().clamp(min=1e-300)
        below = int((share < threshold).sum())
        # GPM (Saha et al., eq. 5): the fewest directions holding >= ε of the energy; the
        # GPM and InfLoRA code keep one fewer (their "+1" is commented out)
        r = max(below if variant == "released" else below + 1, 1)
        return vectors[:, : min(r, dim)].float()
    m = memory.double()
    room = dim - m.shape[1]  # directions left outside M
    if variant == "released":
        total = (torch.linalg.svdvals(c) ** 2).sum()
        projector = torch.eye(dim, dtype=torch.float64) - m @ m.T
        u, s, _ = torch.linalg.svd(projector @ c)
        energy, u = s[:room] ** 2, u[:, :room]
    else:
        total = torch.linalg.eigvalsh((c + c.T) / 2).clamp(min=0).sum()
        basis = complement_basis(m, dim)
        energy, vectors = top_eigenvectors(basis.T @ c @ basis)
        u = basis @ vectors  # eigenvectors of (I - MMᵀ) C (I - MMᵀ) outside M
    if total <= 0 or room == 0:
        return memory
    captured = 1 - energy.sum() / total  # share of the task's input energy M already holds
    r = 0
    while captured < threshold and r < energy.shape[0]:
        captured += energy[r] / total
        r += 1
    if r == 0:
        return memory
    new = u[:, :r]
    new = new - m @ (m.T @ new)  # exactly outside M (orthonormal up to rounding)
    new, _ = torch.linalg.qr(new)
    return torch.cat([m, new], dim=1).float()


@torch.no_grad()
def input_covariances(
    model: torch.nn.Module, modules: dict[str, torch.nn.Module], examples: list[Example],
    encoder,
) -> dict[str, torch.Tensor]:
    """C = mean of x xᵀ over every token each module reads, one example at a time (so no
    padding is ever counted), with dropout off."""
    sums = {name: None for name in modules}
    counts = dict.fromkeys(modules, 0)

    def hook(name):
        def record(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            outer = x.T @ x
            sums[name] = outer if sums[name] is None else sums[name] + outer
            counts[name] += x.shape[0]
        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in modules.items()]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for example in examples:
            batch = encoder.collate_train([encoder.train_features(example)])
            model(**{k: v.to(device) for k, v in batch.items()})
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {name: (sums[name] / max(counts[name], 1)).cpu() for name in modules}


INFLORA_VARIANTS = ("paper", "released")
GROUP = "InfLoRA options"


@dataclass
class InfLoRAOptions:
    inflora_threshold: float = option(0.995, "InfLoRA base energy threshold ε of the "
                                      "input-subspace memory (InfLoRA T5 scripts)", "float",
                                      GROUP, low=0, low_open=True, high=1)
    inflora_variant: str = option("paper", "InfLoRA: 'paper' designs A from the projected "
                                  "new-task inputs; 'released' is the public T5 code (random A "
                                  "projected)", "str", GROUP, choices=INFLORA_VARIANTS)

@register
class InfLoRA(IncLoRA):
    name = "inflora"
    title = "InfLoRA"
    summary = ("interference-free LoRA: each task's A designed outside the earlier tasks' input "
               "subspace")
    options = InfLoRAOptions
    exact_sparsity = False
    defaults = {"learning_rate": 3e-4}  # InfLoRA T5 scripts (GainLoRA release)
    released_scripts = "inflora"  # the GainLoRA release's SuperNI scripts (nlora.release)
    latest_only = (MEMORY,)

    def __init__(self, config, is_seq2seq: bool) -> None:
        super().__init__(config, is_seq2seq)
        self.memory: dict[str, torch.Tensor] = {}  # module -> d × k basis of earlier inputs
        self.previous_folder: Path | None = None

    def begin_task(self, model: PreTrainedModel, index: int, task: Task) -> torch.nn.Module:
        model = super().begin_task(model, index, task)  # fresh adapter, B = 0: same outputs
        layers = {module_key(f.name): f for f in lora_factors(model)}
        named = dict(model.named_modules())
        modules = {name: named[f.name] for name, f in layers.items()}
        covariances = input_covariances(model, modules, task.train, self.encoder)
        generator = torch.Generator().manual_seed(self.config.seed * 1000 + index)
        for name, f in layers.items():
            a = design_A(covariances[name], self.memory.get(name), f.A.shape[0],
                         self.config.inflora_variant, generator)
            with torch.no_grad():
                f.A.copy_(a.to(f.A))
                f.B.zero_()
            f.A.requires_grad_(False)  # A is designed and fixed: only B trains
        return model

    def end_task(self, model, index: int, task: Task, folder: Path) -> PreTrainedModel:
        if self.is_main_process:
            save_adapter(model, folder / "adapter")
        names = [module_key(f.name) for f in lora_factors(model)]
        model = model.merge_and_unload()
        modules = {name: model.get_submodule(name) for name in names}
        covariances = input_covariances(model, modules, task.train, self.encoder)
        c = self.config
        threshold = c.inflora_threshold + (1 - c.inflora_threshold) * index / len(c.tasks)
        self.memory = {
            name: update_memory(covariances[name], self.memory.get(name), threshold,
                                c.inflora_variant)
            for name in names
        }
        if self.is_main_process:
            state = {k: v.contiguous() for k, v in self.memory.items()}
            write_file_atomic(folder / MEMORY, lambda tmp: save_file(state, tmp))
        return model

    def restore_task(self, model, index: int, task: Task, folder: Path) -> PreTrainedModel:
        model = super().restore_task(model, index, task, folder)
        if (folder / MEMORY).is_file():  # only the latest finished task keeps its memory
            self.memory = load_file(folder / MEMORY)
        self.previous_folder = folder
        return model

    def task_recorded(self, index: int, folder: Path) -> None:
        # the previous task's memory is superseded once this task is recorded
        self.previous_folder = remove_superseded(self.previous_folder, folder, self.latest_only)
