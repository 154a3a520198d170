"""Exactly sparse task updates, their files, and the masks of collision-free mode.

An ℓ1 penalty minimised by (sub)gradient steps under AdamW never lands on zero: entries
oscillate around it with an amplitude set by the learning rate. Exact zeros need an
operation that sets them, and nlora offers two (docs/method.md, "Exact sparsity"):

* **proximal shrinkage** of the LoRA factors after every optimiser step,
  ``p ← sign(p)·max(|p| − lr·λ_prox, 0)`` for every entry of A and B (PyTorch's
  ``softshrink``). Entries whose gradient does not keep pushing them away from zero end at
  exactly 0; ΔW = scaling·B·A is exactly zero wherever row i of B and column j of A share
  no non-zero rank index. The update stays low-rank: a plain PEFT adapter.
* **magnitude pruning** of ΔW at the end of the task: the largest ``density`` share of each
  module's entries (by |ΔW|) is kept, the rest set to 0. The result is no longer low-rank,
  so it is saved as a *sparse delta*: safetensors with ``<module>.indices`` (int64 flat
  row-major positions in the (out, in) matrix, ascending) and ``<module>.values`` per
  module, the shapes in the file's metadata; merging adds the values at their positions.

**Collision-free mode** keeps the union of the positions earlier tasks wrote (their exact
supports) and multiplies the new task's ΔW by the complement during training
(``mask_lora_layers``), so no two tasks ever write the same weight.
"""

from __future__ import annotations

import json
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.pytorch_utils import Conv1D

from nlora.adapters import lora_factors, module_key
from nlora.errors import ModelError
from nlora.io import write_file_atomic
from nlora.param_metrics import SparseUpdate

SPARSE_DELTA_FILE = "sparse_delta.safetensors"
# The file's one metadata key (safetensors writes several keys in no fixed order, and a
# resumed run must write the same bytes): JSON {"version": 1, "shapes": {module: [out, in]}}.
METADATA_KEY = "nlora_sparse_delta"


# --------------------------------------------------------------------------------------------
# Proximal step and pruning
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def shrink_factors_(model: torch.nn.Module, amount: float) -> None:
    """Soft-threshold every entry of the active adapter's A and B by ``amount`` (in place)."""
    if amount <= 0:
        return
    for f in lora_factors(model):
        f.A.copy_(F.softshrink(f.A, amount))
        f.B.copy_(F.softshrink(f.B, amount))


@torch.no_grad()
def lora_deltas(
    model: torch.nn.Module, allowed: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """{module: scaling·B·A} of the active adapter (float32, detached), with positions
    outside ``allowed[module]`` set to exactly 0."""
    deltas = {}
    for f in lora_factors(model):
        key = module_key(f.name)
        dw = f.scaling * (f.B.float() @ f.A.float())
        if allowed is not None and key in allowed:
            dw = dw.masked_fill(~allowed[key].to(dw.device), 0.0)
        deltas[key] = dw
    return deltas


def keep_nonzero(dw: torch.Tensor) -> SparseUpdate:
    """Every exactly non-zero entry of ``dw``."""
    flat = dw.detach().reshape(-1).float().cpu()
    indices = torch.nonzero(flat, as_tuple=True)[0]
    return SparseUpdate(tuple(dw.shape), indices, flat[indices].clone())


def prune_to_density(dw: torch.Tensor, density: float) -> SparseUpdate:
    """The ``round(density · numel)`` entries of ``dw`` largest in magnitude (fewer when
    ``dw`` has fewer non-zero entries), every other entry zero."""
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    flat = dw.detach().reshape(-1).float().cpu()
    mags = flat.abs()
    k = min(round(density * flat.numel()), int((mags > 0).sum()))
    if k == 0:
        indices = torch.zeros(0, dtype=torch.int64)
    else:
        indices = torch.topk(mags, k, sorted=False).indices.sort().values
    return SparseUpdate(tuple(dw.shape), indices, flat[indices].clone())


def support(update: SparseUpdate, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean (out, in) mask of the positions ``update`` writes (its exact non-zeros)."""
    mask = torch.zeros(update.shape[0] * update.shape[1], dtype=torch.bool, device=device)
    mask[update.indices[update.values != 0].to(device)] = True
    return mask.view(update.shape)


# --------------------------------------------------------------------------------------------
# Sparse-delta files and merging
# --------------------------------------------------------------------------------------------


def save_sparse_delta(updates: Mapping[str, SparseUpdate], path: Path) -> None:
    """Write ``updates`` as one safetensors file (atomically)."""
    tensors: dict[str, torch.Tensor] = {}
    for module, u in updates.items():
        tensors[f"{module}.indices"] = u.indices.to(torch.int64).contiguous()
        tensors[f"{module}.values"] = u.values.float().contiguous()
    shapes = {module: list(u.shape) for module, u in updates.items()}
    metadata = {METADATA_KEY: json.dumps({"version": 1, "shapes": shapes}, sort_keys=True)}
    write_file_atomic(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_sparse_delta(path: Path | str) -> dict[str, SparseUpdate]:
    """A sparse-delta file as {module: SparseUpdate} (safetensors only, never pickle)."""
    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if METADATA_KEY not in metadata:
            raise ModelError(f"{path}: not an nlora sparse delta (no {METADATA_KEY} metadata)")
        shapes: dict[str, Any] = json.loads(metadata[METADATA_KEY])["shapes"]
        updates = {}
        for module, shape in shapes.items():
            indices = f.get_tensor(f"{module}.indices")
            values = f.get_tensor(f"{module}.values")
            if indices.shape != values.shape or (
                indices.numel() and int(indices.max()) >= shape[0] * shape[1]
            ):
                raise ModelError(f"{path}: module {module} has inconsistent indices and values")
            updates[module] = SparseUpdate((int(shape[0]), int(shape[1])), indices, values)
    return updates


@torch.no_grad()
def merge_sparse_delta(
    model: torch.nn.Module, updates: Mapping[str, SparseUpdate], source: str = "sparse delta"
) -> torch.nn.Module:
    """Add each update's values to its module's weight, in place; return ``model``."""
    modules = {module_key(name): m for name, m in model.named_modules()}
    for key, u in updates.items():
        module = modules.get(key)
        weight = getattr(module, "weight", None)
        if weight is None:
            raise ModelError(f"{source}: the model has no module {key} with a weight")
        out_features, in_features = u.shape
        indices = u.indices.to(weight.device)
        if isinstance(module, Conv1D):  # GPT-2 style: weight stored (in, out)
            indices = (indices % in_features) * out_features + indices // in_features
            expected = (in_features, out_features)
        else:
            expected = (out_features, in_features)
        if tuple(weight.shape) != expected:
            raise ModelError(f"{source}: {key} is {tuple(weight.shape)} in the model but "
                             f"{tuple(u.shape)} (out, in) in the delta")
        flat = weight.data.view(-1)
        flat[indices] += u.values.to(device=weight.device, dtype=weight.dtype)
    return model


# --------------------------------------------------------------------------------------------
# Collision-free mode: the new task's ΔW is multiplied by a mask during training
# --------------------------------------------------------------------------------------------


def _masked_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    # PEFT's LoRA forward computes B(A(dropout(x)))·scaling, a low-rank path that cannot be
    # masked entrywise; this forms (allowed ⊙ scaling·B·A) and applies it to dropout(x).
    result = self.base_layer(x, *args, **kwargs)
    for name in self.active_adapters:
        if name not in self.lora_A:
            continue
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        delta = (B @ A) * self.scaling[name] * self.nlora_allowed
        dropped = self.lora_dropout[name](x.to(A.dtype))
        result = result + F.linear(dropped, delta).to(result.dtype)
    return result


def mask_lora_layers(model: torch.nn.Module, allowed: Mapping[str, torch.Tensor]) -> int:
    """Restrict each adapted module of ``model`` named in ``allowed`` to the positions where
    its mask is True; return how many modules were masked."""
    count = 0
    for name, module in model.named_modules():
        key = module_key(name)
        if key not in allowed or not hasattr(module, "lora_A"):
            continue
        weight = next(iter(module.lora_A.values())).weight
        module.nlora_allowed = allowed[key].to(device=weight.device, dtype=weight.dtype)
        module.forward = types.MethodType(_masked_forward, module)
        count += 1
    return count
