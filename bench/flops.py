"""FLOP counting and the machine's practical limit (measured matmul FLOP/s).

``matmul_ceiling``: the best FLOP/s a plain ``torch.mm`` reaches on this machine, threads and
dtype, over a few shapes (the model's own projection shapes and a large square one). Run it
in the bench's process, next to the timed work, so both see the same load.

``CausalFlops``: counts what a causal LM's forward passes execute, via hooks on the inner
decoder and the LM head: every ``nn.Linear`` inside the decoder (LoRA factors included) for
each token column run, dense attention scores and weighted sums (4·rows·new·kv·heads·head_dim
per layer, as SDPA computes them, masked entries included), and the LM head for the rows it
projects. ``real`` counts the same for non-padding tokens only. Backward is not counted.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch


def matmul_ceiling(
    shapes: list[tuple[int, int, int]],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seconds: float = 1.0,
) -> dict[str, Any]:
    """Best FLOP/s of ``(m, k) @ (k, n)`` over ``shapes``; per-shape figures too."""
    results = {}
    for m, k, n in shapes:
        a = torch.randn(m, k, dtype=dtype, device=device)
        b = torch.randn(k, n, dtype=dtype, device=device)
        out = torch.empty(m, n, dtype=dtype, device=device)
        torch.mm(a, b, out=out)  # warm-up
        _sync(device)
        runs, start = [], time.perf_counter()
        while time.perf_counter() - start < seconds or len(runs) < 3:
            t = time.perf_counter()
            torch.mm(a, b, out=out)
            _sync(device)
            runs.append(time.perf_counter() - t)
        results[f"{m}x{k}x{n}"] = 2 * m * k * n / statistics.median(runs)
    return {"flops_per_s": max(results.values()), "per_shape": results}


def _sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _inner(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@dataclass
class CausalFlops:
    """Executed forward FLOPs and tokens of a causal LM while the context is open."""

    model: torch.nn.Module
    executed: float = 0.0
    real: float = 0.0
    attention: float = 0.0  # of ``executed``: attention scores and weighted sums
    columns: int = 0  # token positions run, padding included (rows × new columns)
    real_tokens: int = 0  # of which not padding
    calls: int = 0
    _handles: list = field(default_factory=list)

    def __post_init__(self) -> None:
        inner = _inner(self.model)
        self.decoder, self.head = inner.model, inner.lm_head
        config = inner.config
        self.layers = config.num_hidden_layers
        heads = config.num_attention_heads
        self.attn_width = heads * (getattr(config, "head_dim", None)
                                   or config.hidden_size // heads)
        # 2·in·out per token for every Linear of the decoder (LoRA factors included)
        self.per_token = sum(2 * m.in_features * m.out_features
                             for m in self.decoder.modules() if isinstance(m, torch.nn.Linear))

    def _before(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs["inputs_embeds"][..., 0]
        rows, new = ids.shape[:2]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers ≥ 5.24: cache
        past = cache.get_seq_length() if cache is not None else 0
        mask = kwargs.get("attention_mask")
        if mask is None or mask.dim() != 2:
            real_new, real_kv = rows * new, torch.full((rows,), past + new)
        else:
            real_new, real_kv = int(mask[:, -new:].sum()), mask.sum(-1)
        per_row_new = (mask[:, -new:].sum(-1) if mask is not None and mask.dim() == 2
                       else torch.full((rows,), new))
        attn = 4 * self.layers * self.attn_width
        self.attention += attn * rows * new * (past + new)
        self.executed += rows * new * self.per_token + attn * rows * new * (past + new)
        self.real += real_new * self.per_token + attn * float((per_row_new * real_kv).sum())
        self.columns += rows * new
        self.real_tokens += real_new
        self.calls += 1

    def _head(self, module, args) -> None:
        rows = args[0].numel() // args[0].shape[-1]
        flops = 2 * rows * module.in_features * module.out_features
        self.executed += flops
        self.real += flops  # the head runs at the last column only, a real token

    def __enter__(self) -> CausalFlops:
        self._handles = [
            self.decoder.register_forward_pre_hook(self._before, with_kwargs=True),
            self.head.register_forward_pre_hook(self._head),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def step_flops(model: torch.nn.Module, step: Any, *args: Any) -> dict[str, float]:
    """FLOPs of one call of ``step(*args)`` (e.g. a training step: forward, backward, update).

    Matrix products, forward and backward, are counted by torch's ``FlopCounterMode``.
    It does not see the CPU SDPA kernel; then the attention is added from the hooks' count,
    ×3 (backward ≈ 2× forward).
    """
    from torch.utils.flop_counter import FlopCounterMode

    config = _inner(model).config
    causal = not getattr(config, "is_encoder_decoder", False)
    counter = CausalFlops(model) if causal else None  # T5's attention is plain matmuls
    with FlopCounterMode(display=False) as flop_counter:
        if counter is not None:
            with counter:
                step(*args)
        else:
            step(*args)
    counted = float(flop_counter.get_total_flops())
    ops = {str(op) for op in flop_counter.get_flop_counts().get("Global", {})}
    sees_attention = getattr(config, "_attn_implementation", None) == "eager" or any(
        "attention" in op for op in ops)
    extra = 0.0 if sees_attention or counter is None else 3 * counter.attention
    return {"flops": counted + extra, "counted_by_torch": counted, "attention_added": extra}
