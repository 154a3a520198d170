"""The blocked ℓ1 of B·A must match the naive (materialising) form in value and gradient."""

from __future__ import annotations

import pytest
import torch

from nlora.l1 import default_block_rows, l1_of_product, l1_of_product_naive


def _factors(out: int, r: int, inp: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(out, r, generator=g).to(dtype).requires_grad_()
    A = torch.randn(r, inp, generator=g).to(dtype).requires_grad_()
    return B, A


def _value_and_grads(fn, B, A, scaling, **kw):
    B, A = B.detach().clone().requires_grad_(), A.detach().clone().requires_grad_()
    value = fn(B, A, scaling, **kw)
    value.backward()
    return value, B.grad, A.grad


# bfloat16: the naive form rounds its sum to bfloat16 (8 mantissa bits), the blocked one
# sums in float32, and A's gradient is summed over `out` rows in a different grouping.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-4), torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("out", "r", "inp", "block_rows"),
    [
        (64, 4, 64, None),  # square, default block (whole matrix)
        (64, 4, 64, 16),  # block divides out
        (37, 3, 53, 5),  # non-square, block does not divide out
        (20, 8, 96, 1),  # single-row blocks
        (10, 2, 7, 64),  # block larger than out
        (1100, 2, 1024, None),  # default block: 512 rows, 3 blocks, last one partial
    ],
)
def test_matches_naive(dtype, out, r, inp, block_rows):
    B, A = _factors(out, r, inp, dtype)
    scaling = 2.5
    v_naive, gB_naive, gA_naive = _value_and_grads(l1_of_product_naive, B, A, scaling)
    v, gB, gA = _value_and_grads(l1_of_product, B, A, scaling, block_rows=block_rows)
    assert v.dtype == torch.float32  # documented: accumulated and returned in float32
    assert gB.dtype == dtype and gA.dtype == dtype
    tol = TOL[dtype]
    torch.testing.assert_close(v, v_naive.float(), **tol)
    torch.testing.assert_close(gB.float(), gB_naive.float(), **tol)
    torch.testing.assert_close(gA.float(), gA_naive.float(), **tol)


@pytest.mark.parametrize("scaling", [-0.5, 0.0])
def test_negative_and_zero_scaling(scaling):
    B, A = _factors(33, 4, 21, torch.float32)
    v_naive, gB_naive, gA_naive = _value_and_grads(l1_of_product_naive, B, A, scaling)
    v, gB, gA = _value_and_grads(l1_of_product, B, A, scaling, block_rows=8)
    torch.testing.assert_close(v, v_naive)
    torch.testing.assert_close(gB, gB_naive)
    torch.testing.assert_close(gA, gA_naive)
    assert v.item() >= 0


def test_zero_B_like_peft_init():
    # PEFT initialises lora_B to zero: ΔW = 0, and autograd's abs backward uses sign(0) = 0.
    B = torch.zeros(24, 4, requires_grad=True)
    A = torch.randn(4, 16, requires_grad=True)
    v, gB, gA = _value_and_grads(l1_of_product, B, A, 2.0, block_rows=5)
    v_naive, gB_naive, gA_naive = _value_and_grads(l1_of_product_naive, B, A, 2.0)
    assert v.item() == 0.0
    torch.testing.assert_close(gB, gB_naive)
    torch.testing.assert_close(gA, gA_naive)
    assert not gB.any() and not gA.any()


def test_grad_for_one_factor_only():
    B, A = _factors(19, 3, 11, torch.float32)
    _, gB_naive, gA_naive = _value_and_grads(l1_of_product_naive, B, A, 1.0)

    Bq = B.detach().clone().requires_grad_()
    l1_of_product(Bq, A.detach(), block_rows=4).backward()
    torch.testing.assert_close(Bq.grad, gB_naive)

    Aq = A.detach().clone().requires_grad_()
    l1_of_product(B.detach(), Aq, block_rows=4).backward()
    torch.testing.assert_close(Aq.grad, gA_naive)


def test_no_grad_caller():
    B, A = _factors(30, 4, 12, torch.float32)
    with torch.no_grad():
        v = l1_of_product(B, A, 3.0, block_rows=7)
    assert not v.requires_grad
    torch.testing.assert_close(v, l1_of_product_naive(B, A, 3.0).detach())


def test_summed_over_modules_like_training_loop():
    # The training loop stacks per-module terms, sums and scales by λ.
    mods = [_factors(16, 2, 24, torch.float32, seed=s) for s in range(3)]
    lam = 0.1
    naive = lam * torch.stack([l1_of_product_naive(B, A, 2.0) for B, A in mods]).sum()
    naive.backward()
    expected = [(B.grad.clone(), A.grad.clone()) for B, A in mods]
    for B, A in mods:
        B.grad = A.grad = None
    blocked = lam * torch.stack([l1_of_product(B, A, 2.0, block_rows=5) for B, A in mods]).sum()
    blocked.backward()
    torch.testing.assert_close(blocked, naive)
    for (B, A), (gB, gA) in zip(mods, expected, strict=True):
        torch.testing.assert_close(B.grad, gB)
        torch.testing.assert_close(A.grad, gA)


def test_gradcheck_float64():
    # Away from P = 0 the ℓ1 norm is smooth; random factors keep every entry clear of 0.
    B, A = _factors(7, 3, 5, torch.float64, seed=1)
    assert (B.detach() @ A.detach()).abs().min() > 1e-3
    assert torch.autograd.gradcheck(
        lambda b, a: l1_of_product(b, a, -1.5, block_rows=3), (B, A), eps=1e-7
    )


def test_default_block_rows_budget():
    assert default_block_rows(1024) == 512  # 2 MiB of float32 rows
    assert default_block_rows(4096) == 128
    assert default_block_rows(1024, torch.bfloat16) == 512  # computed in float32
    assert default_block_rows(10**8) == 1


def test_rejects_bad_shapes_and_block():
    B, A = _factors(4, 2, 3, torch.float32)
    with pytest.raises(ValueError):
        l1_of_product(B, A.t())
    with pytest.raises(ValueError):
        l1_of_product(B, A, block_rows=0)


def test_inference_mode_then_training():
    # The CPU scratch block is cached across calls; one first made under inference mode
    # must still be writable by a later training call.
    B, A = _factors(4000, 2, 70, torch.float32)  # larger than any earlier test's block
    with torch.inference_mode():
        v_inf = l1_of_product(B, A, block_rows=3000)
    v, gB, gA = _value_and_grads(l1_of_product, B, A, 1.0, block_rows=3000)
    v_naive, gB_naive, gA_naive = _value_and_grads(l1_of_product_naive, B, A, 1.0)
    torch.testing.assert_close(v_inf, v_naive.detach())
    torch.testing.assert_close(v, v_naive)
    torch.testing.assert_close(gB, gB_naive)
    torch.testing.assert_close(gA, gA_naive)
