"""fp32 against bf16 on this machine: what the CPU offers and what a matmul reaches.

Prints the CPU's bf16 features (AMX-BF16, AVX512-BF16), what ``--precision auto`` picks
here, and the matmul FLOP/s of fp32 and bf16 side by side in one process (SmolLM2's
projection shapes for a batch of 8 x 128 tokens, and 1024²). Writes
bench/results/precision.json.

    .venv/bin/python bench/precision.py [--threads 2] [--seconds 1]
"""

from __future__ import annotations

import argparse

import torch
from common import machine, table, write_result
from flops import matmul_ceiling

from nlora.precision import NATIVE_CPU_FLAGS, cpu_flags, resolve_precision

# (rows, in, out): SmolLM2-135M's q/k/v/o, MLP and a square 1024 matmul
SHAPES = [(1024, 576, 576), (1024, 576, 1536), (1024, 1536, 576), (1024, 1024, 1024)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=1.0,
                        help="time per shape and dtype (at least 3 runs)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    flags = cpu_flags()
    features = {name: flag in flags for flag, name in NATIVE_CPU_FLAGS}
    auto, why = resolve_precision("auto", torch.device("cpu"))
    results = {str(dtype).removeprefix("torch."): matmul_ceiling(SHAPES, dtype,
                                                                  seconds=args.seconds)
               for dtype in (torch.float32, torch.bfloat16)}
    fp32, bf16 = results["float32"]["flops_per_s"], results["bfloat16"]["flops_per_s"]
    print(f"CPU bf16 features: {features}; torch CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}; --precision auto -> {auto} ({why})")
    rows = [[shape, results["float32"]["per_shape"][shape] / 1e9,
             results["bfloat16"]["per_shape"][shape] / 1e9,
             results["bfloat16"]["per_shape"][shape] / results["float32"]["per_shape"][shape]]
            for shape in results["float32"]["per_shape"]]
    rows.append(["best", fp32 / 1e9, bf16 / 1e9, bf16 / fp32])
    print(table(["m x k x n", "fp32 GFLOP/s", "bf16 GFLOP/s", "bf16 / fp32"], rows))
    path = write_result("precision", {
        "machine": machine(), "cpu_features": features,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "auto": {"precision": auto, "why": why}, "matmul": results,
        "bf16_over_fp32": bf16 / fp32,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
