"""Which precision a run computes in, and why.

``--precision auto`` picks bf16 only where the hardware multiplies bf16 natively: a CPU with
AMX-BF16 or AVX512-BF16 (oneDNN's fast paths), or a CUDA GPU of compute capability 8.0 or
newer; fp32 everywhere else. Elsewhere bf16 matmuls take a slow path: on an AVX2-only
EPYC machine of this project, 0.6-1.2 GFLOP/s against fp32's 17-26 (``bench/precision.py``),
so a careless bf16 run is 20-45x slower, not faster. The run log says what was used and why,
and each step's ``done.json`` records it (``precision``).
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["cpu_flags", "native_bf16", "resolve_precision"]

# CPU flag -> name, best first (Linux /proc/cpuinfo names)
NATIVE_CPU_FLAGS = (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16"))


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags (Linux); empty where the file is not there."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags") and ":" in line:
            return set(line.split(":", 1)[1].split())
    return set()


def native_bf16(device: torch.device) -> str | None:
    """What makes bf16 matmuls native on ``device`` ("AMX-BF16", "AVX512-BF16", "CUDA
    compute capability 9.0"), or None."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"CUDA compute capability {major}.{minor}" if major >= 8 else None
    if device.type != "cpu":
        return None
    flags = cpu_flags()
    return next((name for flag, name in NATIVE_CPU_FLAGS if flag in flags), None)


def resolve_precision(requested: str, device: torch.device) -> tuple[str, str]:
    """(the precision a run computes in, why): ``auto`` resolved for ``device``; bf16 asked
    for where it is not native is kept, with the reason to expect it slow."""
    native = native_bf16(device) if requested in ("auto", "bf16") else None
    if requested == "auto":
        if native:
            return "bf16", f"auto: native bf16 matmul ({native})"
        return "fp32", f"auto: no native bf16 matmul on this {device.type} (fp32 is faster)"
    if requested == "bf16" and native is None:
        return "bf16", (f"asked for, but this {device.type} has no native bf16 matmul: expect "
                        "it slower than fp32 (bench/precision.py)")
    return requested, "asked for"
