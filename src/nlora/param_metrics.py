"""Parameter-space metrics of task updates ΔW (paper Section 4.1, metrics III-VI).

Orientation. PEFT stores ``lora_A.weight`` as (r, in) and ``lora_B.weight`` as (out, r), and
ΔW = scaling · B @ A has the layer's (out, in) shape. The paper writes ΔW = A·B with
A ∈ R^{d×r}, B ∈ R^{r×k} in the row-vector convention h = x·W, where d is the *input* width
(O-LoRA's code computes its OO loss as ``lora_A_old @ lora_A_new.T``, contracting over the
input). Hence

    paper A_i  = lora_A.weight_iᵀ       (in × r; its columns span task i's input subspace)
    paper ΔW_i = (scaling · B_i @ A_i)ᵀ  (in × out)
    paper ΔW_1ᵀ ΔW_2 = ΔW1 @ ΔW2ᵀ in PEFT orientation (out × out; contracts over the input)

Every function below takes PEFT-oriented tensors. docs/metrics.md gives each definition,
the paper's equation number and the choices made where the paper is ambiguous.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

ThresholdMode = Literal["relative", "absolute"]
MatrixNorm = Literal["fro", "spectral"]

DEFAULT_THRESHOLD = 1e-2
DEFAULT_MODE: ThresholdMode = "relative"
DEFAULT_AWOM_NORM: MatrixNorm = "fro"
# ACR curve grids: relative thresholds are fractions of each matrix's max |entry|;
# absolute ones are raw magnitudes.
RELATIVE_GRID = [10.0**e for e in torch.linspace(-4, 0, 17).tolist()]
ABSOLUTE_GRID = [10.0**e for e in torch.linspace(-8, 0, 17).tolist()]


# --------------------------------------------------------------------------------------------
# Elementwise metrics: non-zero masks, collision rate (eqs. 10-11), GSR (eq. 9)
# --------------------------------------------------------------------------------------------


def cutoff(dw: torch.Tensor, threshold: float, mode: ThresholdMode = DEFAULT_MODE) -> float:
    """The magnitude above which an entry of ``dw`` counts as non-zero."""
    if threshold < 0:
        raise ValueError("threshold must be >= 0")
    if mode == "absolute":
        return float(threshold)
    if mode == "relative":
        return float(threshold) * (float(dw.abs().max()) if dw.numel() else 0.0)
    raise ValueError(f"unknown threshold mode {mode!r}")


def nonzero_mask(
    dw: torch.Tensor, threshold: float = DEFAULT_THRESHOLD, mode: ThresholdMode = DEFAULT_MODE
) -> torch.Tensor:
    """Entries with |x| > τ (strict, so τ = 0 means exactly non-zero)."""
    return dw.abs() > cutoff(dw, threshold, mode)


def density(
    dw: torch.Tensor, threshold: float = DEFAULT_THRESHOLD, mode: ThresholdMode = DEFAULT_MODE
) -> float:
    """Fraction of non-zero entries: the "sparsity rate" s_i of Theorem 2 (eq. 12)."""
    return float(nonzero_mask(dw, threshold, mode).float().mean())


def collision_count(
    dw_i: torch.Tensor,
    dw_j: torch.Tensor,
    threshold: float = DEFAULT_THRESHOLD,
    mode: ThresholdMode = DEFAULT_MODE,
) -> int:
    """Number of positions where both updates are non-zero (numerator of eq. 11)."""
    if dw_i.shape != dw_j.shape:
        raise ValueError(f"shape mismatch {tuple(dw_i.shape)} vs {tuple(dw_j.shape)}")
    both = nonzero_mask(dw_i, threshold, mode) & nonzero_mask(dw_j, threshold, mode)
    return int(both.sum())


def collision_rate(
    dw_i: torch.Tensor,
    dw_j: torch.Tensor,
    threshold: float = DEFAULT_THRESHOLD,
    mode: ThresholdMode = DEFAULT_MODE,
) -> float:
    """CR_ij, eq. 11: fraction of positions where both ΔW_i and ΔW_j are non-zero."""
    return collision_count(dw_i, dw_j, threshold, mode) / dw_i.numel()


def collision_counts_over_thresholds(
    dw_i: torch.Tensor,
    dw_j: torch.Tensor,
    thresholds: Sequence[float],
    mode: ThresholdMode = DEFAULT_MODE,
) -> list[int]:
    """Collision counts at every threshold in one pass over the entries.

    A position collides at τ iff min(|x_i|/c_i, |x_j|/c_j) > τ, where c is the matrix's max
    |entry| (relative mode) or 1 (absolute mode); so bucket that minimum once.
    """
    if dw_i.shape != dw_j.shape:
        raise ValueError(f"shape mismatch {tuple(dw_i.shape)} vs {tuple(dw_j.shape)}")
    taus = torch.tensor(sorted(thresholds), dtype=torch.float64)
    if mode == "relative":
        scale_i = float(dw_i.abs().max()) or math.inf  # all-zero matrix: nothing is non-zero
        scale_j = float(dw_j.abs().max()) or math.inf
        m = torch.minimum(dw_i.abs() / scale_i, dw_j.abs() / scale_j)
    elif mode == "absolute":
        m = torch.minimum(dw_i.abs(), dw_j.abs())
    else:
        raise ValueError(f"unknown threshold mode {mode!r}")
    # bucket b = number of thresholds strictly below m, so m > τ_k  <=>  b > k
    buckets = torch.bucketize(m.flatten().double(), taus, right=False)
    hist = torch.bincount(buckets, minlength=len(taus) + 1)
    above = hist.flip(0).cumsum(0).flip(0)  # above[k] = #entries with bucket >= k
    by_sorted = [int(above[k + 1]) for k in range(len(taus))]
    order = sorted(range(len(thresholds)), key=lambda k: thresholds[k])
    out = [0] * len(thresholds)
    for rank, k in enumerate(order):
        out[k] = by_sorted[rank]
    return out


def average_collision_rate(cr: Sequence[Sequence[float]]) -> float:
    """ACR, eq. 10: mean of CR_ij over the T(T-1)/2 pairs i < j (NaN for a single task)."""
    t = len(cr)
    pairs = [cr[i][j] for i in range(t) for j in range(i + 1, t)]
    return sum(pairs) / len(pairs) if pairs else math.nan


def gsr(dw: torch.Tensor) -> float:
    """Generalized Sparsity Rate, eq. 9 with p = 2, q = 1: ℓ1(ΔW) / (√(mn)·ℓ2(ΔW)).

    In [1/√(mn), 1]: 1 for a matrix whose entries all have equal magnitude, 1/√(mn) for a
    single non-zero entry, so *lower means sparser*. ℓ2 is the Frobenius norm. NaN for 0.
    eq. 17's √(mn)·ℓ1/ℓ2 is rejected: it breaks cloning invariance (D4) and the direction of
    P2 (see docs/metrics.md and tests/test_analysis.py).
    """
    mags = dw.double().abs()
    top = float(mags.max()) if mags.numel() else 0.0
    if top == 0.0:
        return math.nan
    mags = mags / top  # dilation invariance (D2) lets us avoid under/overflow of ℓ2²
    return gsr_from_norms(float(mags.sum()), float(mags.pow(2).sum()), dw.numel())


def gsr_from_norms(l1: float, l2_squared: float, numel: int) -> float:
    """GSR from ℓ1, ℓ2² and the entry count: how several modules pool into one vector."""
    if l2_squared <= 0.0 or numel == 0:
        return math.nan
    return l1 / (math.sqrt(numel) * math.sqrt(l2_squared))


def gsr_eq17(dw: torch.Tensor) -> float:
    """eq. 17 as printed, √(mn)·ℓ1/ℓ2: kept only to show in tests why it is not used."""
    return math.sqrt(dw.numel()) * float(dw.abs().sum()) / float(dw.double().norm())


# --------------------------------------------------------------------------------------------
# Subspace metrics: OO (eq. 7), AWOM (eq. 8), subspace use (Section 3.3)
# --------------------------------------------------------------------------------------------


def orthogonality_product(dw_1: torch.Tensor, dw_2: torch.Tensor) -> torch.Tensor:
    """The paper's ΔW_1ᵀΔW_2 (Definition 2) for PEFT-oriented updates: ΔW1 @ ΔW2ᵀ."""
    return dw_1 @ dw_2.T


def oo_pair(a_i: torch.Tensor, a_t: torch.Tensor) -> float:
    """‖A_iᵀ A_t‖_F² of eq. 7, with a = lora_A.weight (r, in): the paper's A_iᵀA_t is a_i @ a_tᵀ.

    Uses A as stored (no LoRA scaling), as O-LoRA's loss does; note it is not invariant to the
    A→cA, B→B/c rescaling that leaves ΔW unchanged.
    """
    return float((a_i.double() @ a_t.double().T).pow(2).sum())


def orthogonal_overlap(a_previous: Sequence[torch.Tensor], a_t: torch.Tensor) -> float:
    """OO_T, eq. 7: Σ_{i<T} ‖A_iᵀ A_T‖_F² over the earlier tasks' lora_A weights."""
    return sum(oo_pair(a_i, a_t) for a_i in a_previous)


def matrix_norm(m: torch.Tensor, norm: MatrixNorm = DEFAULT_AWOM_NORM) -> float:
    if norm == "fro":
        return float(torch.linalg.matrix_norm(m.double(), ord="fro"))
    if norm == "spectral":
        return float(torch.linalg.matrix_norm(m.double(), ord=2)) if m.numel() else 0.0
    raise ValueError(f"unknown norm {norm!r}")


def awom_pair(
    dw_t: torch.Tensor, dw_i: torch.Tensor, norm: MatrixNorm = DEFAULT_AWOM_NORM
) -> float:
    """‖ΔW_Tᵀ ΔW_i‖ of eq. 8 (paper orientation), i.e. ‖ΔW_T @ ΔW_iᵀ‖ here. Dense reference."""
    return matrix_norm(orthogonality_product(dw_t, dw_i), norm)


def awom(
    dw_previous: Sequence[torch.Tensor], dw_t: torch.Tensor, norm: MatrixNorm = DEFAULT_AWOM_NORM
) -> float:
    """AWOM_T, eq. 8: Σ_{i<T} ‖ΔW_Tᵀ ΔW_i‖ (Frobenius by default, "spectral" on request)."""
    return sum(awom_pair(dw_t, dw_i, norm) for dw_i in dw_previous)


@dataclass(frozen=True)
class LoraUpdate:
    """One module's task update ΔW = scaling · B @ A, kept factored."""

    A: torch.Tensor  # (r, in), PEFT lora_A.weight
    B: torch.Tensor  # (out, r), PEFT lora_B.weight
    scaling: float

    @property
    def shape(self) -> tuple[int, int]:
        return (self.B.shape[0], self.A.shape[1])

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.scaling * (self.B.to(dtype) @ self.A.to(dtype))


def update_difference(new: LoraUpdate, old: LoraUpdate) -> LoraUpdate:
    """new − old, still factored (rank r_new + r_old): s·[B_n, −B_o] @ [A_n; A_o].

    Both must share the scaling (the same adapter at two times, as SeqLoRA saves it).
    """
    if new.scaling != old.scaling:
        raise ValueError(f"scalings differ ({new.scaling} vs {old.scaling})")
    return LoraUpdate(
        A=torch.cat([new.A, old.A.to(new.A.dtype)], dim=0),
        B=torch.cat([new.B, -old.B.to(new.B.dtype)], dim=1),
        scaling=new.scaling,
    )


@dataclass(frozen=True)
class SparseUpdate:
    """One module's task update stored as its non-zero entries (a pruned or masked ΔW).

    ``indices`` are flat row-major positions in the (out, in) matrix, sorted ascending;
    ``values`` the entries there. Every other entry is exactly zero.
    """

    shape: tuple[int, int]  # (out, in), PEFT orientation
    indices: torch.Tensor  # (nnz,) int64
    values: torch.Tensor  # (nnz,)

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        dense = torch.zeros(self.shape[0] * self.shape[1], dtype=dtype)
        dense[self.indices] = self.values.to(dtype)
        return dense.view(self.shape)


TaskUpdate = LoraUpdate | SparseUpdate


def awom_pair_lowrank(
    u_t: LoraUpdate, u_i: LoraUpdate, norm: MatrixNorm = DEFAULT_AWOM_NORM
) -> float:
    """awom_pair without forming ΔW: ΔW_T ΔW_iᵀ = s_T s_i B_T (A_T A_iᵀ) B_iᵀ.

    With B = Q R (orthonormal Q), this is Q_T (s_T s_i R_T A_T A_iᵀ R_iᵀ) Q_iᵀ, and both the
    Frobenius and the spectral norm are those of the small core.
    """
    q_t, r_t = torch.linalg.qr(u_t.B.double())
    q_i, r_i = torch.linalg.qr(u_i.B.double())
    core = r_t @ (u_t.A.double() @ u_i.A.double().T) @ r_i.T
    return abs(u_t.scaling * u_i.scaling) * matrix_norm(core, norm)


def singular_values(dw: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(dw.double())


def singular_values_lowrank(u: LoraUpdate) -> torch.Tensor:
    """Singular values of s·B@A from r×r factors: B = Q_B R_B, Aᵀ = Q_A R_A ⇒ σ(s R_B R_Aᵀ)."""
    _, r_b = torch.linalg.qr(u.B.double())
    _, r_a = torch.linalg.qr(u.A.double().T)
    return abs(u.scaling) * torch.linalg.svdvals(r_b @ r_a.T)


def nuclear_norm(sv: torch.Tensor) -> float:
    """Raw nuclear norm ‖ΔW‖_* = Σσ (what Fig. 3 plots; scale-dependent, not bounded by r)."""
    return float(sv.sum())


def subspace_use(sv: torch.Tensor) -> float:
    """Subspaces used: ‖ΔW‖_* / ‖ΔW‖_2 = Σσ/σ_max, in [1, rank(ΔW)] ⊆ [1, r]; 0 for ΔW = 0.

    The nuclear norm is the convex envelope of rank only on the unit spectral-norm ball
    (Fazel 2002), so it is a rank surrogate once ΔW is scaled to spectral norm 1.
    """
    top = float(sv.max()) if sv.numel() else 0.0
    return float(sv.sum()) / top if top > 0 else 0.0


def layer_index(module: str) -> int | None:
    """The transformer block a module sits in (``...layers.12.self_attn...`` → 12)."""
    match = re.search(r"\.(?:layers|layer|block|blocks|h)\.(\d+)\.", f".{module}.")
    if match is None:
        match = re.search(r"\.(\d+)\.", f".{module}.")
    return int(match[1]) if match else None
