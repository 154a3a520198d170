"""Parameter-space metrics of a continual-learning run (paper Section 4.1, metrics III-VI).

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

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from safetensors import safe_open
from tqdm.auto import tqdm

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


# --------------------------------------------------------------------------------------------
# Accuracy-matrix metrics: FWT, unseen-task generalisation, forgetting (for figure labels)
# --------------------------------------------------------------------------------------------

Matrix = Sequence[Sequence[float | None]]


def forward_transfer(accuracy: Matrix, zero_shot: Sequence[float | None]) -> float | None:
    """FWT (Lopez-Paz & Ranzato 2017): mean over i ≥ 2 of a[i][i-1] − b_i (1-based tasks).

    a[i][i-1] is the accuracy on task i just *before* it is trained; b_i the zero-shot accuracy
    of the untrained model. None when either was not measured (runs that evaluate only seen
    tasks have no a[i][i-1]).
    """
    t = len(accuracy)
    if t < 2 or len(zero_shot) < t:
        return None
    gains = []
    for i in range(1, t):
        before, base = accuracy[i][i - 1], zero_shot[i]
        if before is None or base is None:
            return None
        gains.append(before - base)
    return sum(gains) / len(gains)


def unseen_generalisation(unseen: dict[str, Sequence[float | None]]) -> dict[str, Any]:
    """Fig. 4: accuracy on tasks never trained on; "final" is after the last trained task."""
    out = {}
    for task, curve in unseen.items():
        measured = [v for v in curve if v is not None]
        out[task] = {"final": measured[-1] if measured else None, "curve": list(curve)}
    return out


def forgetting(accuracy: Matrix) -> float | None:
    """F.Ra (eq. 6, Chaudhry et al.): mean over t < T of max_{k∈[t,T)} a[t][k] − a[t][T]."""
    t = len(accuracy)
    if t < 2:
        return None
    drops = []
    for task in range(t - 1):
        seen = [accuracy[task][k] for k in range(task, t - 1)]
        final = accuracy[task][t - 1]
        if final is None or any(v is None for v in seen):
            return None
        drops.append(max(seen) - final)
    return sum(drops) / len(drops)


# --------------------------------------------------------------------------------------------
# Loading a run
# --------------------------------------------------------------------------------------------

_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.[^.]+)?\.weight$"
)


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    # PEFT matches rank_pattern/alpha_pattern keys as suffixes of the module name
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def load_adapter(adapter_dir: Path | str) -> dict[str, LoraUpdate]:
    """A PEFT adapter folder as {module name: LoraUpdate}; safetensors only (never pickle)."""
    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    factors: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            match = _KEY.match(key)
            if match:
                factors.setdefault(match["module"], {})[match["factor"]] = f.get_tensor(key)
    updates = {}
    for module, pair in factors.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"{adapter_dir}: module {module} lacks lora_A or lora_B")
        a, b = pair["A"].float(), pair["B"].float()
        r = a.shape[0]  # the tensor's own rank already reflects any rank_pattern
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module,
                                     config.get("lora_alpha", r)))
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        updates[module] = LoraUpdate(A=a, B=b, scaling=scaling)
    return updates


def task_dirs(run_dir: Path | str) -> list[Path]:
    """tasks/NN-name folders in training order."""
    root = Path(run_dir) / "tasks"
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and re.match(r"^\d+-", p.name)]
    return sorted(dirs, key=lambda p: int(p.name.split("-", 1)[0]))


def load_task_updates(run_dir: Path | str) -> list[dict[str, LoraUpdate]]:
    """Every task's adapter, in training order, up to the first task without one."""
    updates = []
    for folder in task_dirs(run_dir):
        adapter = folder / "adapter"
        if not (adapter / "adapter_model.safetensors").is_file():
            break
        updates.append(load_adapter(adapter))
    return updates


def load_run_info(run_dir: Path | str) -> dict[str, Any]:
    run_dir = Path(run_dir)
    config: dict[str, Any] = {}
    if (run_dir / "config.yaml").is_file():
        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    metrics: dict[str, Any] = {}
    if (run_dir / "metrics.json").is_file():
        metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"config": config, "metrics": metrics}


def layer_index(module: str) -> int | None:
    """The transformer block a module sits in (``...layers.12.self_attn...`` → 12)."""
    match = re.search(r"\.(?:layers|layer|block|blocks|h)\.(\d+)\.", f".{module}.")
    if match is None:
        match = re.search(r"\.(\d+)\.", f".{module}.")
    return int(match[1]) if match else None


# --------------------------------------------------------------------------------------------
# Whole-run analysis
# --------------------------------------------------------------------------------------------


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return x


def _square(t: int, fill: float | None = None) -> list[list[float | None]]:
    return [[fill] * t for _ in range(t)]


def analyse_updates(
    tasks: list[dict[str, LoraUpdate]],
    threshold: float = DEFAULT_THRESHOLD,
    mode: ThresholdMode = DEFAULT_MODE,
    awom_norm: MatrixNorm = DEFAULT_AWOM_NORM,
    curve_thresholds: Sequence[float] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """All parameter-space metrics of a sequence of task adapters (see analyse_run)."""
    t = len(tasks)
    grid = list(curve_thresholds or (RELATIVE_GRID if mode == "relative" else ABSOLUTE_GRID))
    all_thresholds = grid + [threshold]
    modules = [m for m in tasks[0] if all(m in task for task in tasks)] if tasks else []
    per_module: dict[str, Any] = {}
    # pooled accumulators: the whole adapter seen as one long vector
    l1 = [0.0] * t
    l2sq = [0.0] * t
    numel = [0] * t
    nonzero = [0] * t
    oo_sum = _square(t, 0.0)
    awom_sum = _square(t, 0.0)
    collisions = [[[0] * len(all_thresholds) for _ in range(t)] for _ in range(t)]
    for module in tqdm(modules, desc="modules", disable=not progress, leave=False):
        ups = [task[module] for task in tasks]
        dws = [u.delta() for u in ups]
        svs = [singular_values_lowrank(u) for u in ups]
        entry: dict[str, Any] = {
            "shape": list(ups[0].shape),
            "layer": layer_index(module),
            "gsr": [gsr(dw) for dw in dws],
            "density": [density(dw, threshold, mode) for dw in dws],
            "nuclear_norm": [nuclear_norm(sv) for sv in svs],
            "spectral_norm": [float(sv.max()) for sv in svs],
            "subspace_use": [subspace_use(sv) for sv in svs],
            "rank": [u.A.shape[0] for u in ups],
        }
        oo, aw, cr = _square(t), _square(t), _square(t)
        for i in range(t):
            l1[i] += float(dws[i].abs().sum())
            l2sq[i] += float(dws[i].double().pow(2).sum())
            numel[i] += dws[i].numel()
            nonzero[i] += int(nonzero_mask(dws[i], threshold, mode).sum())
            for j in range(i + 1, t):
                oo[i][j] = oo[j][i] = oo_pair(ups[i].A, ups[j].A)
                aw[i][j] = aw[j][i] = awom_pair_lowrank(ups[j], ups[i], awom_norm)
                counts = collision_counts_over_thresholds(dws[i], dws[j], all_thresholds, mode)
                cr[i][j] = cr[j][i] = counts[-1] / dws[i].numel()
                oo_sum[i][j] += oo[i][j]
                awom_sum[i][j] += aw[i][j]
                for k, c in enumerate(counts):
                    collisions[i][j][k] += c
        entry.update({"oo": oo, "awom": aw, "cr": cr, "acr": average_collision_rate(cr)})
        per_module[module] = entry
    for i in range(t):
        oo_sum[i][i] = awom_sum[i][i] = None  # a task against itself is not a pair
        for j in range(i + 1, t):
            oo_sum[j][i], awom_sum[j][i] = oo_sum[i][j], awom_sum[i][j]
    total = numel[0] if t else 0

    def cr_at(k: int) -> list[list[float | None]]:
        cr = _square(t)
        for i in range(t):
            for j in range(i + 1, t):
                cr[i][j] = cr[j][i] = collisions[i][j][k] / total
        return cr

    pooled_cr = cr_at(len(all_thresholds) - 1)
    task_gsr = [gsr_from_norms(l1[i], l2sq[i], numel[i]) for i in range(t)]
    task_use = [
        _mean([per_module[m]["subspace_use"][i] for m in modules]) for i in range(t)
    ]
    task_nuclear = [
        _mean([per_module[m]["nuclear_norm"][i] for m in modules]) for i in range(t)
    ]
    return _nan_to_none({
        "threshold": {"value": threshold, "mode": mode},
        "awom_norm": awom_norm,
        "modules": modules,
        "per_module": per_module,
        "per_task": {
            "gsr": task_gsr,
            "density": [nonzero[i] / numel[i] if numel[i] else math.nan for i in range(t)],
            "subspace_use": task_use,
            "nuclear_norm": task_nuclear,
            # OO_t / AWOM_t: task t against every earlier task, summed over modules
            "oo": [sum(oo_sum[i][j] for i in range(j)) if j else None for j in range(t)],
            "awom": [sum(awom_sum[i][j] for i in range(j)) if j else None for j in range(t)],
        },
        "pairs": {"oo": oo_sum, "awom": awom_sum, "cr": pooled_cr},
        "acr_curve": {
            "thresholds": grid,
            "acr": [average_collision_rate(cr_at(k)) for k in range(len(grid))],
        },
        "summary": {
            "OO": sum(oo_sum[i][t - 1] for i in range(t - 1)) if t > 1 else math.nan,
            "AWOM": sum(awom_sum[i][t - 1] for i in range(t - 1)) if t > 1 else math.nan,
            "GSR": _mean(task_gsr),
            "ACR": average_collision_rate(pooled_cr),
            "subspace_use": _mean(task_use),
            "nuclear_norm": _mean(task_nuclear),
            "rank": max((per_module[m]["rank"][0] for m in modules), default=None),
        },
    })


def _mean(values: Sequence[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def undefined_metrics(method: str | None) -> list[str]:
    """Parameter-space metrics that do not apply to a method's saved adapters (e.g. OO for
    OSF, whose saved A is a factorisation of ΔW, not a learned input subspace)."""
    from nlora.methods import METHODS  # the method classes say it; imported only when asked

    cls = METHODS.get(method or "")
    return list(cls.undefined_metrics) if cls is not None else []


def analyse_run(
    run_dir: Path | str,
    threshold: float = DEFAULT_THRESHOLD,
    mode: ThresholdMode = DEFAULT_MODE,
    awom_norm: MatrixNorm = DEFAULT_AWOM_NORM,
    curve_thresholds: Sequence[float] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Every metric of one run directory: accuracy-based ones and, when the run saved LoRA
    adapters, the parameter-space ones per module, per task, per pair and summed.

    ``parameter`` is None (with ``notes`` saying why) for runs without adapters, e.g. full
    fine-tuning baselines.
    """
    run_dir = Path(run_dir)
    info = load_run_info(run_dir)
    config, metrics = info["config"], info["metrics"]
    tasks = metrics.get("tasks") or config.get("tasks") or [p.name for p in task_dirs(run_dir)]
    accuracy = metrics.get("accuracy")
    summary = dict(metrics.get("summary") or {})
    notes: list[str] = []
    scores: dict[str, Any] = {
        "AA": summary.get("AA"),
        "F.Ra": summary.get("F.Ra"),
        "BWT": summary.get("BWT"),
        "FWT": None,
    }
    if accuracy:
        if scores["F.Ra"] is None:
            scores["F.Ra"] = forgetting(accuracy)
        if metrics.get("zero_shot") is not None:
            scores["FWT"] = forward_transfer(accuracy, metrics["zero_shot"])
            if scores["FWT"] is None:
                notes.append("FWT needs a[i][i-1] (tasks evaluated before training); not measured")
    result: dict[str, Any] = {
        "name": run_dir.name,
        "dir": str(run_dir),
        "method": config.get("method"),
        "model": config.get("model"),
        "tasks": tasks,
        "accuracy": accuracy,
        "zero_shot": metrics.get("zero_shot"),
        "scores": scores,
        "unseen": unseen_generalisation(metrics.get("unseen") or {}),
        "parameter": None,
        "notes": notes,
    }
    result["undefined"] = undefined_metrics(result["method"])
    updates = load_task_updates(run_dir)
    if not updates:
        notes.append(
            "no LoRA adapters saved (full fine-tuning, or prompts with no weight update): "
            "parameter-space metrics n/a"
        )
        return result
    if len(updates) < len(tasks):
        notes.append(f"adapters found for the first {len(updates)} of {len(tasks)} tasks only")
    result["parameter"] = analyse_updates(
        updates, threshold, mode, awom_norm, curve_thresholds, progress
    )
    return result
