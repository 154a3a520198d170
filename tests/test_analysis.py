"""Parameter-space metrics (nlora.param_metrics) on hand-made matrices, and the paper's
theorems as property tests.

Hand-computed values are worked out in the comments. Matrices in PEFT orientation (out, in)
unless a test says it uses the paper's orientation.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, find, given, settings
from hypothesis import strategies as st

from nlora.metrics import forgetting, forward_transfer, unseen_generalisation
from nlora.param_metrics import (
    LoraUpdate,
    average_collision_rate,
    awom,
    awom_pair,
    awom_pair_lowrank,
    collision_count,
    collision_counts_over_thresholds,
    collision_rate,
    density,
    gsr,
    gsr_eq17,
    layer_index,
    nonzero_mask,
    nuclear_norm,
    oo_pair,
    orthogonal_overlap,
    orthogonality_product,
    singular_values,
    singular_values_lowrank,
    subspace_use,
)

T = torch.tensor
# derandomize: CI sees the same examples every run (no flaky property tests)
PROPS = settings(
    max_examples=60, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)


def t64(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# --------------------------------------------------------------------------------------------
# Hand-made values
# --------------------------------------------------------------------------------------------


def test_gsr_by_hand() -> None:
    # [[3, 4], [0, 0]]: ℓ1 = 7, ℓ2 = 5, mn = 4 → 7 / (2·5) = 0.7
    assert gsr(t64([[3, 4], [0, 0]])) == pytest.approx(0.7)
    # equal magnitudes (signs ignored): 4 / (2·2) = 1, the densest value
    assert gsr(t64([[1, -1], [1, 1]])) == pytest.approx(1.0)
    # one non-zero of 4: 1 / (2·1) = 1/√4, the sparsest value
    assert gsr(t64([[0, 0], [0, -5]])) == pytest.approx(0.5)
    assert math.isnan(gsr(torch.zeros(2, 3)))


W1 = t64([[1.0, 0.001], [0.5, 0.0]])
W2 = t64([[0.2, 0.3], [0.0, 2.0]])


def test_nonzero_threshold_relative_and_absolute() -> None:
    # relative 0.01: W1 cut-off 0.01·1 → (0,0), (1,0); W2 cut-off 0.01·2 → (0,0), (0,1), (1,1)
    assert nonzero_mask(W1, 0.01, "relative").tolist() == [[True, False], [True, False]]
    assert nonzero_mask(W2, 0.01, "relative").tolist() == [[True, True], [False, True]]
    # absolute 1e-4: W1 gains (0,1)
    assert nonzero_mask(W1, 1e-4, "absolute").tolist() == [[True, True], [True, False]]
    # threshold 0 is "exactly non-zero" in both modes (strict inequality)
    assert nonzero_mask(W1, 0.0, "relative").tolist() == [[True, True], [True, False]]
    assert density(W1, 0.01, "relative") == 0.5
    assert density(W1, 0.0, "absolute") == 0.75
    with pytest.raises(ValueError):
        nonzero_mask(W1, -1.0)


def test_collision_rate_by_hand() -> None:
    # relative 0.01: both non-zero only at (0,0) → 1/4
    assert collision_count(W1, W2, 0.01, "relative") == 1
    assert collision_rate(W1, W2, 0.01, "relative") == 0.25
    # absolute 1e-4: both at (0,0), (0,1) → 2/4
    assert collision_rate(W1, W2, 1e-4, "absolute") == 0.5
    # relative 0.2: W1 > 0.2 at (0,0), (1,0); W2 > 0.4 at (1,1) only → no collision
    assert collision_rate(W1, W2, 0.2, "relative") == 0.0
    with pytest.raises(ValueError):
        collision_rate(W1, torch.zeros(3, 2))


def test_acr_by_hand() -> None:
    # eq. 10 with T = 3: mean of CR_12 = .2, CR_13 = .4, CR_23 = .6 → 0.4 (diagonal ignored)
    cr = [[None, 0.2, 0.4], [0.2, None, 0.6], [0.4, 0.6, None]]
    assert average_collision_rate(cr) == pytest.approx(0.4)
    assert math.isnan(average_collision_rate([[None]]))


@given(seed=st.integers(0, 2**31 - 1), mode=st.sampled_from(["relative", "absolute"]))
@PROPS
def test_collision_curve_matches_pointwise(seed: int, mode: str) -> None:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(7, 9, generator=g, dtype=torch.float64) ** 3  # heavy-tailed, many ~0
    b = torch.randn(7, 9, generator=g, dtype=torch.float64) ** 3
    taus = [0.3, 0.0, 1e-3, 0.05, 1.0, 2.0]  # unsorted on purpose
    expected = [collision_count(a, b, tau, mode) for tau in taus]
    assert collision_counts_over_thresholds(a, b, taus, mode) == expected


def test_oo_by_hand() -> None:
    # lora_A weights (r, in). a1 @ a2ᵀ = [[1, 0], [1, 0]] → ‖·‖²_F = 2
    a1 = t64([[1, 0, 0], [0, 1, 0]])
    a2 = t64([[1, 1, 0], [0, 0, 2]])
    assert oo_pair(a1, a2) == pytest.approx(2.0)
    # rank 1 task: a3 = [[0, 0, 3]]; a1 @ a3ᵀ = 0, a2 @ a3ᵀ = [[0], [6]] → 36
    a3 = t64([[0, 0, 3]])
    assert orthogonal_overlap([a1, a2], a3) == pytest.approx(36.0)
    # eq. 7 in the paper's orientation (A = lora_Aᵀ): ‖A_1ᵀ A_2‖² is the same number
    assert float(((a1.T).T @ a2.T).pow(2).sum()) == pytest.approx(2.0)


def test_awom_by_hand_and_orientation() -> None:
    # ΔW_T = [[1, 0], [0, 2]], ΔW_i = [[0, 1], [1, 0]]: ΔW_T ΔW_iᵀ = [[0, 1], [2, 0]]
    # Frobenius √5, spectral 2
    dt, di = t64([[1, 0], [0, 2]]), t64([[0, 1], [1, 0]])
    assert awom_pair(dt, di, "fro") == pytest.approx(math.sqrt(5))
    assert awom_pair(dt, di, "spectral") == pytest.approx(2.0)
    assert awom([di, 2 * di], dt, "fro") == pytest.approx(3 * math.sqrt(5))
    # orientation: the paper's ΔWᵀΔW contracts over the input. Updates reading disjoint input
    # features (columns here) are orthogonal; ones writing disjoint outputs need not be.
    reads_0, reads_1 = t64([[1, 0], [1, 0]]), t64([[0, 1], [0, 3]])
    assert awom_pair(reads_0, reads_1) == 0.0
    writes_0, writes_1 = t64([[1, 1], [0, 0]]), t64([[0, 0], [1, 1]])
    assert awom_pair(writes_0, writes_1) == pytest.approx(2.0)  # [[0, 2], [0, 0]]
    # and orthogonality_product is the paper's ΔW_1ᵀΔW_2 with paper ΔW = PEFT ΔWᵀ
    p1, p2 = writes_0.T, writes_1.T
    assert torch.equal(orthogonality_product(writes_0, writes_1), p1.T @ p2)


def test_subspace_use_by_hand() -> None:
    # diag(3, 1, 0): σ = (3, 1, 0) → nuclear 4, spectral 3, use 4/3 of rank 2
    sv = singular_values(torch.diag(t64([3, 1, 0])))
    assert nuclear_norm(sv) == pytest.approx(4.0)
    assert subspace_use(sv) == pytest.approx(4 / 3)
    # r equal singular values use all r subspaces, whatever the scale
    assert subspace_use(singular_values(5 * torch.eye(4, dtype=torch.float64))) == pytest.approx(4)
    assert subspace_use(singular_values(torch.zeros(3, 3))) == 0.0


@given(seed=st.integers(0, 2**31 - 1), r=st.integers(1, 6), out=st.integers(1, 9),
       inp=st.integers(1, 9), scale=st.floats(1e-3, 1e3))
@PROPS
def test_subspace_use_bounded_by_rank(seed: int, r: int, out: int, inp: int, scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    u = LoraUpdate(A=torch.randn(r, inp, generator=g, dtype=torch.float64),
                   B=torch.randn(out, r, generator=g, dtype=torch.float64), scaling=scale)
    sv = singular_values(u.delta(torch.float64))
    rank = int(torch.linalg.matrix_rank(u.delta(torch.float64)))
    assert 1 - 1e-9 <= subspace_use(sv) <= rank + 1e-9
    assert rank <= r
    # the raw nuclear norm is not bounded by r: it scales with ΔW
    assert nuclear_norm(sv) == pytest.approx(scale * nuclear_norm(sv / scale))


@given(seed=st.integers(0, 2**31 - 1), r=st.integers(1, 5), out=st.integers(1, 8),
       inp=st.integers(1, 8), norm=st.sampled_from(["fro", "spectral"]))
@PROPS
def test_lowrank_forms_match_dense(seed: int, r: int, out: int, inp: int, norm: str) -> None:
    g = torch.Generator().manual_seed(seed)

    def update() -> LoraUpdate:
        return LoraUpdate(A=torch.randn(r, inp, generator=g, dtype=torch.float64),
                          B=torch.randn(out, r, generator=g, dtype=torch.float64),
                          scaling=float(torch.rand(1, generator=g)) + 0.5)

    u, v = update(), update()
    dense = awom_pair(u.delta(torch.float64), v.delta(torch.float64), norm)
    assert awom_pair_lowrank(u, v, norm) == pytest.approx(dense, rel=1e-7, abs=1e-9)
    sv_dense = singular_values(u.delta(torch.float64))
    sv_low = singular_values_lowrank(u)
    k = min(len(sv_dense), len(sv_low))
    assert torch.allclose(sv_low[:k], sv_dense[:k], rtol=1e-7, atol=1e-9)
    assert float(sv_low[k:].abs().sum()) + float(sv_dense[k:].abs().sum()) < 1e-7


def test_fwt_by_hand() -> None:
    acc = [[80, 70, 60], [30, 90, 85], [None, 50, 75]]
    # (a[2][1] − b_2) + (a[3][2] − b_3) = (30 − 20) + (50 − 40) → mean 10
    assert forward_transfer(acc, [10, 20, 40]) == pytest.approx(10.0)
    # runs that evaluate only seen tasks have no a[i][i-1]
    seen_only = [[80, 70, 60], [None, 90, 85], [None, None, 75]]
    assert forward_transfer(seen_only, [10, 20, 40]) is None
    assert forward_transfer([[50.0]], [10]) is None


def test_forgetting_and_unseen_by_hand() -> None:
    # task 1: max(80, 70) − 60 = 20; task 2: 90 − 85 = 5 → 12.5
    acc = [[80, 70, 60], [None, 90, 85], [None, None, 75]]
    assert forgetting(acc) == pytest.approx(12.5)
    out = unseen_generalisation({"NLI/CB": [10.0, None, 30.0]})
    assert out == {"NLI/CB": {"final": 30.0, "curve": [10.0, None, 30.0]}}


def test_layer_index() -> None:
    assert layer_index("model.layers.12.self_attn.q_proj") == 12
    assert layer_index("encoder.block.3.layer.0.SelfAttention.q") == 3
    assert layer_index("lm_head") is None


# --------------------------------------------------------------------------------------------
# Theorem 1 (Section 3.2, Appendix 7.1). Matrices here are in the paper's orientation and
# Definition 2 is read literally: ΔW_1ᵀ ΔW_2 = 0.
# --------------------------------------------------------------------------------------------


@st.composite
def non_colliding_pair(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor]:
    """Two m×n matrices, each position owned by nobody, by ΔW_1 or by ΔW_2."""
    m, n = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    owner = draw(st.lists(st.integers(0, 2), min_size=m * n, max_size=m * n))
    values = st.floats(-10, 10, allow_nan=False).filter(lambda v: v != 0)
    v1 = draw(st.lists(values, min_size=m * n, max_size=m * n))
    v2 = draw(st.lists(values, min_size=m * n, max_size=m * n))
    w1 = torch.tensor([v if o == 1 else 0.0 for v, o in zip(v1, owner, strict=True)],
                      dtype=torch.float64).reshape(m, n)
    w2 = torch.tensor([v if o == 2 else 0.0 for v, o in zip(v2, owner, strict=True)],
                      dtype=torch.float64).reshape(m, n)
    return w1, w2


@given(non_colliding_pair())
@PROPS
def test_theorem1_non_collision_gives_frobenius_orthogonality(pair: tuple) -> None:
    w1, w2 = pair
    assert collision_rate(w1, w2, 0.0, "absolute") == 0.0
    gram = w1.T @ w2
    # what the proof of 7.1 actually shows: each term ΔW_1[a,k]·ΔW_2[a,k] vanishes, so the
    # diagonal of ΔW_1ᵀΔW_2, hence tr(ΔW_1ᵀΔW_2) = <ΔW_1, ΔW_2>_F, is exactly zero
    assert torch.count_nonzero(torch.diagonal(gram)) == 0
    assert float(torch.trace(gram)) == 0.0


@given(non_colliding_pair(), st.integers(0, 2**31 - 1))
@PROPS
def test_theorem1_disjoint_rows_give_full_orthogonality(pair: tuple, seed: int) -> None:
    # the full product ΔW_1ᵀΔW_2 = 0 needs every row a (an input feature, paper orientation)
    # to be used by at most one of the two matrices
    w1, w2 = pair
    g = torch.Generator().manual_seed(seed)
    rows_of_1 = torch.rand(w1.shape[0], 1, generator=g) < 0.5
    w1, w2 = w1 * rows_of_1, w2 * ~rows_of_1
    # nlora's AWOM (PEFT orientation: ΔW = wᵀ, so ‖ΔW_1 ΔW_2ᵀ‖ = ‖w1ᵀ w2‖) is exactly 0
    assert awom_pair(w1.T, w2.T, "fro") == 0.0
    assert awom_pair(w1.T, w2.T, "spectral") == 0.0
    assert collision_rate(w1, w2, 0.0, "absolute") == 0.0


def test_theorem1_as_stated_is_false() -> None:
    # non-colliding, yet ΔW_1ᵀΔW_2 ≠ 0: the proof in 7.1 drops the k ≠ l terms
    w1, w2 = t64([[1, 0]]), t64([[0, 1]])
    assert collision_rate(w1, w2, 0.0, "absolute") == 0.0
    assert (w1.T @ w2).tolist() == [[0.0, 1.0], [0.0, 0.0]]
    # and hypothesis finds such a pair by itself
    w1, w2 = find(non_colliding_pair(), lambda p: bool(torch.any(p[0].T @ p[1] != 0)),
                  settings=settings(database=None, max_examples=2000, derandomize=True))
    assert collision_rate(w1, w2, 0.0, "absolute") == 0.0


def test_theorem1_orthogonal_yet_colliding() -> None:
    # non-necessity: ΔW_1ᵀΔW_2 = 1·1 + 1·(−1) = 0 but every position collides
    w1, w2 = t64([[1], [1]]), t64([[1], [-1]])
    assert awom_pair(w1.T, w2.T, "fro") == 0.0  # ‖w1ᵀw2‖ = |1·1 + 1·(−1)| = 0, by nlora
    assert collision_rate(w1, w2, 0.0, "absolute") == 1.0
    # a dense example: orthogonal Q's columns as two "updates"
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0),
                                       dtype=torch.float64))
    u, v = q[:, :3], q[:, 3:]
    assert awom_pair(u.T, v.T, "fro") == pytest.approx(0.0, abs=1e-12)
    assert awom_pair(u.T, u.T, "fro") == pytest.approx(math.sqrt(3))  # ‖I₃‖_F: not orthogonal
    assert collision_rate(u, v, 0.0, "absolute") == 1.0


# --------------------------------------------------------------------------------------------
# Theorem 2 (Appendix 7.2): independent random supports collide at rate s_i · s_j
# --------------------------------------------------------------------------------------------


@given(s_i=st.floats(0.0, 1.0), s_j=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1))
@settings(max_examples=25, deadline=None, derandomize=True)
def test_theorem2_collision_rate_is_product_of_densities(s_i: float, s_j: float,
                                                         seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    m, n = 200, 200  # 40 000 positions: std of CR ≤ 0.5/200 = 0.0025

    def sparse(s: float) -> torch.Tensor:
        mask = torch.rand(m, n, generator=g) < s
        return (torch.rand(m, n, generator=g) + 0.1) * mask  # non-zero exactly on the mask

    w_i, w_j = sparse(s_i), sparse(s_j)
    cr = collision_rate(w_i, w_j, 0.0, "absolute")
    assert cr == pytest.approx(s_i * s_j, abs=0.0125)  # 5 standard deviations
    d_i, d_j = density(w_i, 0.0, "absolute"), density(w_j, 0.0, "absolute")
    assert cr == pytest.approx(d_i * d_j, abs=0.0125)


# --------------------------------------------------------------------------------------------
# GSR (eq. 9) and the properties of Appendix 7.6. GSR is a density: lower = sparser, so
# "sparsity decreases" (D1, D3) means GSR rises and "sparsity increases" (P2) means it falls.
# --------------------------------------------------------------------------------------------

# Zero or normal-range magnitudes: dilating a subnormal by c underflows to 0 (or loses digits),
# which tests float64, not the metric.
magnitudes = st.lists(
    st.one_of(st.just(0.0), st.floats(1e-100, 10.0)), min_size=2, max_size=24
)


def mat(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64).reshape(1, -1)


@given(magnitudes, st.data())
@PROPS
def test_gsr_d1_robin_hood(values: list[float], data: st.DataObject) -> None:
    i, j = data.draw(st.permutations(range(len(values))))[:2]
    gap = values[i] - values[j]
    assume(gap > 1e-3 * max(values))
    alpha = data.draw(st.floats(0.01, 0.99)) * gap / 2  # 0 < α < (x_i − x_j)/2
    moved = list(values)
    moved[i] -= alpha
    moved[j] += alpha
    assert gsr(mat(moved)) > gsr(mat(values))  # more even → denser → GSR up


@given(magnitudes, st.floats(1e-6, 1e6), st.booleans())
@PROPS
def test_gsr_d2_dilation(values: list[float], c: float, negate: bool) -> None:
    assume(sum(values) > 0)
    c = -c if negate else c  # entries are signed in ΔW; |·| makes the sign irrelevant too
    assert gsr(c * mat(values)) == pytest.approx(gsr(mat(values)), rel=1e-12)


@given(magnitudes, st.floats(1e-3, 100.0))
@PROPS
def test_gsr_d3_rising_tide(values: list[float], alpha: float) -> None:
    assume(max(values) - min(values) > 1e-3)  # a constant vector is already maximally dense
    assert gsr(mat(values) + alpha) > gsr(mat(values))


@given(st.integers(1, 4), st.integers(1, 4), st.integers(2, 4), st.integers(0, 2**31 - 1))
@PROPS
def test_gsr_d4_cloning(m: int, n: int, k: int, seed: int) -> None:
    w = torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    clones = torch.cat([w] * k, dim=1)
    assert gsr(clones) == pytest.approx(gsr(w), rel=1e-12)
    assert gsr(torch.cat([w] * k, dim=0)) == pytest.approx(gsr(w), rel=1e-12)
    # eq. 17 as printed is multiplied by k instead: the proof in 7.6.4 drops a factor √k·√k
    assert gsr_eq17(clones) == pytest.approx(k * gsr_eq17(w), rel=1e-12)


@given(st.integers(1, 4), st.integers(1, 4), st.integers(0, 2**31 - 1))
@PROPS
def test_gsr_p1_dominated_by_maximum(m: int, n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    floor = 1 / math.sqrt(m * n)  # GSR of a single non-zero entry: the global minimum
    assert floor - 1e-12 <= gsr(w) <= 1 + 1e-12
    a, b = int(torch.randint(m, (1,), generator=g)), int(torch.randint(n, (1,), generator=g))
    values = []
    for c in (1e2, 1e4, 1e6, 1e8):
        w[a, b] = c * float(w.abs().sum())
        values.append(gsr(w))
    assert values == sorted(values, reverse=True)  # monotone towards the floor
    assert values[-1] == pytest.approx(floor, rel=1e-6)


@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 3), st.integers(0, 2**31 - 1))
@PROPS
def test_gsr_p2_adding_zeros(m: int, n: int, extra: int, seed: int) -> None:
    w = torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    padded = torch.cat([w, torch.zeros(m, extra, dtype=torch.float64)], dim=1)
    assert gsr(padded) < gsr(w)  # more zeros → sparser → GSR down
    # eq. 17 goes *up* here, the same way it goes up under Robin Hood (D1, less sparse):
    # it cannot be read as either a sparsity or a density
    assert gsr_eq17(padded) > gsr_eq17(w)


def test_eq17_inconsistent_directions_by_hand() -> None:
    x = mat([4.0, 0.0])  # eq. 17: √2·4/4 = √2 ; eq. 9: 4/(√2·4) = 1/√2
    spread = mat([3.0, 1.0])  # Robin Hood: less sparse
    padded = mat([4.0, 0.0, 0.0])  # a zero added: more sparse
    assert gsr_eq17(spread) > gsr_eq17(x) and gsr_eq17(padded) > gsr_eq17(x)
    assert gsr(spread) > gsr(x) > gsr(padded)
