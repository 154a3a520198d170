"""The ℓ1 norm of a LoRA update ΔW = scaling · B·A.

PEFT stores ``lora_A.weight`` as (r, in_features) and ``lora_B.weight`` as
(out_features, r), so ΔW = scaling · B @ A has the layer's own (out, in) shape.

The naive form materialises B @ A and autograd keeps it alive until backward (abs's backward
needs its input): one full (out, in) matrix per adapted module, ~4.3 GB in float32 for LLaMA-7B's
q/v projections. ``l1_of_product`` instead walks ΔW in row blocks, once in forward for the
value and once more in backward for the gradient, so only one (block_rows, in) block exists
at a time. With P = B @ A and S = sign(P):

    d‖P‖₁/dB = S @ Aᵀ        (row block i of grad_B needs only row block i of S)
    d‖P‖₁/dA = Bᵀ @ S = Σ_i B[i]ᵀ @ S[i]   (accumulated over row blocks)

Dtypes: bfloat16/float16 inputs are computed and summed in float32 (summing ~10⁶ entries in
bfloat16 would lose the value to rounding), and the value is **returned in float32**, the
accumulation dtype, rather than rounded back to the input dtype; float64 stays float64.
Gradients come back in each input's own dtype, as autograd requires.
"""

from __future__ import annotations

import threading

import torch

# Bytes of one ΔW row block in the compute dtype (2 MiB: 512 rows of 1024, 128 of 4096, in
# float32). Negligible next to the naive form's full matrices and about one core's L2 here;
# large enough that per-block dispatch overhead stays small. Measured with
# bench/l1.py --sweep: 0.25-0.5 MiB blocks are 1.1-1.7x slower, 1-4 MiB within ~12%
# (docs/performance.md).
DEFAULT_BLOCK_BYTES = 2 << 20


# Per-thread scratch blocks for CPU, keyed by dtype. Why not a fresh buffer per call: a ~1 MiB
# buffer freed at the end of every call, with small allocations (autograd nodes, outputs)
# landing in between, fragments glibc's heap, and RSS then grows by about one block per
# module per step (measured: ~130 MB over T5-large's 144 modules), which is most of what
# blocking saves. Reusing one block keeps the extra memory at one block. CUDA's caching
# allocator already reuses blocks, so other devices just allocate.
_workspace = threading.local()


def _scratch(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised contiguous (rows, cols) block, reused across calls on CPU."""
    if device.type != "cpu":
        return torch.empty(rows, cols, dtype=dtype, device=device)
    buffers: dict[torch.dtype, torch.Tensor] = _workspace.__dict__.setdefault("buffers", {})
    buf = buffers.get(dtype)
    if buf is None or buf.numel() < rows * cols:
        # A normal tensor even if the caller is in inference mode, so that it can be
        # written in place later outside it.
        with torch.inference_mode(False):
            buf = torch.empty(rows * cols, dtype=dtype)
        buffers[dtype] = buf
    return buf[: rows * cols].view(rows, cols)


def clear_scratch() -> None:
    """Free this thread's cached scratch blocks (they are re-made on the next call)."""
    _workspace.__dict__.pop("buffers", None)


def l1_of_product_naive(B: torch.Tensor, A: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """‖scaling · B @ A‖₁, materialising the full product (reference form)."""
    return (B @ A).abs().sum() * abs(scaling)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # float32 for half types (accuracy of the sum), the input's own dtype for float32/64.
    return torch.promote_types(dtype, torch.float32)


def default_block_rows(in_features: int, dtype: torch.dtype = torch.float32) -> int:
    """Rows per ΔW block so that one block is about ``DEFAULT_BLOCK_BYTES``."""
    row_bytes = max(1, in_features) * _compute_dtype(dtype).itemsize
    return max(1, DEFAULT_BLOCK_BYTES // row_bytes)


class _BlockedL1OfProduct(torch.autograd.Function):
    """‖B @ A‖₁ (without scaling) computed in row blocks; see the module docstring."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        B: torch.Tensor,
        A: torch.Tensor,
        block_rows: int,
    ) -> torch.Tensor:
        cdtype = _compute_dtype(torch.promote_types(B.dtype, A.dtype))
        Bc, Ac = B.to(cdtype), A.to(cdtype)  # no copy for float32; (out + in)·r otherwise
        ctx.save_for_backward(B, A)  # the factors only, never the product
        ctx.block_rows = block_rows

        out_features, in_features = B.shape[0], A.shape[1]
        total = torch.zeros((), dtype=cdtype, device=B.device)
        # One scratch block for all row blocks: the last block is a (contiguous) prefix of it.
        buf = _scratch(min(block_rows, out_features), in_features, cdtype, B.device)
        for start in range(0, out_features, block_rows):
            rows = Bc[start:start + block_rows]
            P = buf[: rows.shape[0]]
            torch.mm(rows, Ac, out=P)
            # ord=1 norm reads the block once, with no |P| temporary.
            total += torch.linalg.vector_norm(P, ord=1)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        B, A = ctx.saved_tensors
        need_B, need_A = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_B or need_A):
            return None, None, None
        block_rows: int = ctx.block_rows
        cdtype = grad_out.dtype
        Bc, Ac = B.to(cdtype), A.to(cdtype)
        out_features, in_features = B.shape[0], A.shape[1]

        grad_B = torch.empty_like(Bc) if need_B else None
        grad_A = torch.zeros_like(Ac) if need_A else None
        At = Ac.t()
        buf = _scratch(min(block_rows, out_features), in_features, cdtype, B.device)
        for start in range(0, out_features, block_rows):
            rows = Bc[start:start + block_rows]
            S = buf[: rows.shape[0]]
            torch.mm(rows, Ac, out=S)  # recompute the block rather than keep it from forward
            S.sign_()  # sign(0) = 0, as in autograd's abs backward (B = 0 gives zero grads)
            if grad_B is not None:
                torch.mm(S, At, out=grad_B[start:start + block_rows])
            if grad_A is not None:
                grad_A.addmm_(rows.t(), S)

        # grad_out is a scalar: scale the small (out, r) / (r, in) results, not the blocks.
        if grad_B is not None:
            grad_B = grad_B.mul_(grad_out).to(B.dtype)
        if grad_A is not None:
            grad_A = grad_A.mul_(grad_out).to(A.dtype)
        return grad_B, grad_A, None


def l1_of_product(
    B: torch.Tensor,
    A: torch.Tensor,
    scaling: float = 1.0,
    *,
    block_rows: int | None = None,
) -> torch.Tensor:
    """‖scaling · B @ A‖₁ with autograd, never holding more than one row block of B @ A.

    Same value and gradients as :func:`l1_of_product_naive`; the form the training loss
    uses. ``B`` is (out, r), ``A`` is (r, in). ``block_rows`` rows of ΔW are formed at a time
    (default: about ``DEFAULT_BLOCK_BYTES`` per block). The result is a 0-dim tensor in
    float32 for float32/bfloat16/float16 inputs (float64 for float64); see the module
    docstring.
    """
    if B.dim() != 2 or A.dim() != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(f"expected B (out, r) and A (r, in), got {tuple(B.shape)} and "
                         f"{tuple(A.shape)}")
    if block_rows is None:
        block_rows = default_block_rows(A.shape[1], torch.promote_types(B.dtype, A.dtype))
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    # |scaling| is applied outside the Function: autograd then scales the gradient for us,
    # and ‖s·P‖₁ = |s|·‖P‖₁ for negative s too.
    return _BlockedL1OfProduct.apply(B, A, block_rows) * abs(scaling)
