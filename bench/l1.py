"""Benchmark: naive vs blocked ℓ1 of ΔW = scaling·B·A, time per step and extra peak memory.

    PYTHONPATH=src python bench/l1.py            # T5-large and LLaMA-7B shapes
    PYTHONPATH=src python bench/l1.py --quick    # fewer modules and steps
    PYTHONPATH=src python bench/l1.py --sweep    # also blocked at several block budgets

Times are the median (and min) over all steps of all rounds; the first step of each process
is a timed step too (the warm-up covers one module only).

A step is forward + backward of λ·Σ_modules l1(B, A, scaling), the N-LoRA penalty, with
torch.set_num_threads(2). Every (shape, method) runs in a fresh subprocess so that one
configuration's allocator state cannot hide another's peak. Memory: the random factors and
their .grad are allocated, one warm-up forward+backward on a single module pages in library
code and thread pools (a one-off cost of neither method), the blocked form's cached scratch
block is dropped (so that it counts), then gc + malloc_trim, and the process's peak-RSS
counter is reset (writing 5 to
/proc/self/clear_refs resets VmHWM) and its RSS read as the baseline; extra peak memory is
max VmHWM over all steps minus that baseline. Where the reset is not allowed, the fallback
is getrusage ru_maxrss minus the baseline, which can only overstate the extra.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    # name: (modules, out, in, rank). T5-large: q,v of 24+24 layers + enc-dec attention
    # (144 modules of 1024×1024); LLaMA-7B: q,v of 32 layers (64 of 4096×4096).
    "t5-large": (144, 1024, 1024, 8),
    "llama-7b": (64, 4096, 4096, 8),
}
QUICK_MODULES = {"t5-large": 24, "llama-7b": 8}
SWEEP_BLOCK_BYTES = [1 << 18, 1 << 19, 1 << 20, 1 << 21, 1 << 22]
RESULTS = Path(__file__).resolve().parent / "results" / "l1.json"


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M)
    if match is None:
        raise RuntimeError(f"{key} not in /proc/self/status")
    return int(match.group(1))


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def worker(shape: str, method: str, modules: int, steps: int, block_rows: int | None,
           dtype_name: str) -> dict:
    """One configuration in this (fresh) process; returns its measurements."""
    import torch

    from nlora.l1 import clear_scratch, default_block_rows, l1_of_product, l1_of_product_naive

    torch.set_num_threads(2)
    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    _, out, inp, r = SHAPES[shape]
    # PEFT-like factors, but B random (not 0) so that signs and gradients are non-trivial.
    factors = [
        ((torch.randn(out, r) * 0.02).to(dtype).requires_grad_(),
         (torch.randn(r, inp) * 0.02).to(dtype).requires_grad_())
        for _ in range(modules)
    ]
    scaling, lam = 2.0, 1e-3  # lora_alpha / r = 16 / 8; the value of λ is irrelevant here
    if method == "naive":
        def penalty(B, A):
            return l1_of_product_naive(B, A, scaling)
    else:
        def penalty(B, A):
            return l1_of_product(B, A, scaling, block_rows=block_rows)

    def step() -> float:
        for B, A in factors:
            B.grad = A.grad = None
        t0 = time.perf_counter()
        loss = lam * torch.stack([penalty(B, A) for B, A in factors]).sum()
        loss.backward()
        return time.perf_counter() - t0

    # Gradients are allocated by the first backward and are the same for both methods;
    # allocate them before the baseline so that "extra" is what the penalty itself holds.
    for B, A in factors:
        B.grad, A.grad = torch.zeros_like(B), torch.zeros_like(A)
    # Warm up on one module: the first call of each kernel pages in library code and
    # allocates thread pools, a one-off cost that is neither method's. Then hand freed heap
    # back to the OS so that the baseline holds only live data.
    loss = torch.stack([penalty(B, A) for B, A in factors[:1]]).sum()
    loss.backward()
    del loss
    clear_scratch()  # the blocked form's cached scratch block must count as its extra
    gc.collect()
    _malloc_trim()
    reset_ok = _reset_peak()
    baseline_kib = _status_kib("VmRSS")
    times = [step() for _ in range(steps)]
    peak_kib = _status_kib("VmHWM") if reset_ok else resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss
    return {
        "shape": shape, "method": method, "modules": modules, "out": out, "in": inp,
        "rank": r, "dtype": dtype_name,
        "block_rows": (None if method == "naive"
                       else block_rows or default_block_rows(inp, dtype)),
        "steps": steps, "times_s": times, "median_s": statistics.median(times),
        "baseline_rss_mib": baseline_kib / 1024,
        "extra_peak_mib": (peak_kib - baseline_kib) / 1024,
        "memory_method": "VmHWM reset" if reset_ok else "ru_maxrss",
    }


def run_config(shape: str, method: str, modules: int, steps: int, block_rows: int | None,
               dtype: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", shape, method, str(modules), str(steps),
           str(block_rows or 0), dtype]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        shape, method, modules, steps, block_rows, dtype = sys.argv[2:8]
        print(json.dumps(worker(shape, method, int(modules), int(steps),
                                int(block_rows) or None, dtype)))
        return

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer modules and steps")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per config")
    ap.add_argument("--rounds", type=int, default=None, help="fresh processes per config")
    ap.add_argument("--sweep", action="store_true", help="blocked at several block sizes")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    steps = args.steps or (3 if args.quick else 4)
    args.rounds = args.rounds or (1 if args.quick else 2)

    # Rounds: every configuration runs `rounds` times, interleaved, each in a fresh process,
    # so that a burst of load from other users of this shared machine hits several
    # configurations a little rather than one a lot. Times pool over rounds; memory is the
    # worst round.
    runs: dict[tuple[str, str], list[dict]] = {}
    for round_index in range(args.rounds):
        for shape, (modules, _, inp, _) in SHAPES.items():
            if args.quick:
                modules = QUICK_MODULES[shape]
            configs: list[tuple[str, int | None]] = [("naive", None), ("blocked", None)]
            if args.sweep:
                configs += [("blocked", max(1, b // (inp * 4))) for b in SWEEP_BLOCK_BYTES]
            for method, block_rows in configs:
                res = run_config(shape, method, modules, steps, block_rows, args.dtype)
                label = method if block_rows is None else f"blocked/{block_rows}"
                runs.setdefault((shape, label), []).append(res)
                print(f"  round {round_index + 1}: {shape:9s} {label:13s} "
                      f"{res['median_s']:.3f} s/step", flush=True)
    rows = []
    for (_, label), results in runs.items():
        times = [t for res in results for t in res["times_s"]]
        rows.append({**results[0], "label": label, "rounds": len(results), "times_s": times,
                     "median_s": statistics.median(times), "min_s": min(times),
                     "extra_peak_mib": max(res["extra_peak_mib"] for res in results)})

    targets = {}
    for shape in SHAPES:
        naive = next(r for r in rows if r["shape"] == shape and r["label"] == "naive")
        blocked = next(r for r in rows if r["shape"] == shape and r["label"] == "blocked")
        targets[shape] = {
            "memory_ratio": blocked["extra_peak_mib"] / max(naive["extra_peak_mib"], 1e-9),
            "memory_met": blocked["extra_peak_mib"] <= naive["extra_peak_mib"] / 20,
            "time_ratio": blocked["median_s"] / naive["median_s"],
            "time_met": blocked["median_s"] <= naive["median_s"],
        }

    import torch

    env = {"torch": torch.__version__, "threads": 2, "cpus": os.cpu_count(),
           "loadavg_after": os.getloadavg(), "dtype": args.dtype, "quick": args.quick,
           "steps": steps, "rounds": args.rounds, "memory_method": rows[0]["memory_method"]}
    print()
    print(f"ℓ1 of ΔW = s·B·A, {args.dtype}, forward+backward of the summed penalty, "
          f"torch {torch.__version__}, 2 threads, "
          f"{args.rounds} round(s) × {steps} steps, load avg after {os.getloadavg()[0]:.2f}")
    print("extra peak memory = peak RSS during the steps − RSS after factors and grads were "
          f"allocated (fresh subprocess per row; {rows[0]['memory_method']})")
    header = f"{'shape':9s} {'modules':>7s} {'method':13s} {'block':>6s} " \
             f"{'median s':>8s} {'min s':>7s} {'extra MiB':>10s}"
    print(header)
    print("-" * len(header))
    for r in rows:
        block = "-" if r["block_rows"] is None else str(r["block_rows"])
        print(f"{r['shape']:9s} {r['modules']:7d} {r['label']:13s} {block:>6s} "
              f"{r['median_s']:8.3f} {r['min_s']:7.3f} {r['extra_peak_mib']:10.1f}")
    print()
    for shape, t in targets.items():
        print(f"{shape}: memory blocked/naive = {t['memory_ratio']:.4f} (target ≤ 0.05: "
              f"{'met' if t['memory_met'] else 'MISSED'}); time blocked/naive = "
              f"{t['time_ratio']:.2f} (target ≤ 1: {'met' if t['time_met'] else 'MISSED'})")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"env": env, "rows": rows, "targets": targets}, indent=2))
    print(f"\nJSON: {args.out}")


if __name__ == "__main__":
    main()
