"""Sweep the N-LoRA sparsity weight λ (ΔW form) on the default model and real data.

Runs the same short continual sequence once per λ (same data subsample and seed), then
prints AA / F.Ra / BWT and how large and how concentrated each task's ΔW came out.

    .venv/bin/python bench/lambda_sweep.py --data ../shared/CL_Benchmark
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from nlora.config import RunConfig
from nlora.runner import run


def delta_stats(adapter_dir: Path) -> dict[str, float]:
    """‖ΔW‖₁ summed over modules, and the share of entries below 1% of each module's max."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    scaling = cfg["lora_alpha"] / cfg["r"]
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    l1, small, total = 0.0, 0, 0
    for key, A in weights.items():
        if "lora_A" not in key:
            continue
        delta = scaling * weights[key.replace("lora_A", "lora_B")] @ A
        l1 += float(delta.abs().sum())
        small += int((delta.abs() < 0.01 * delta.abs().max()).sum())
        total += delta.numel()
    return {"l1": l1, "near_zero_share": small / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/CL_Benchmark")
    parser.add_argument("--tasks", default="TC/dbpedia,SC/amazon,TC/agnews")
    parser.add_argument("--lambdas", default="0,1e-5,1e-4,1e-3")
    parser.add_argument("--train-per-task", type=int, default=48)
    parser.add_argument("--test-per-task", type=int, default=40)
    parser.add_argument("--out", default="runs/lambda-sweep")
    parser.add_argument("--json", default="bench/results/lambda_sweep.json")
    args = parser.parse_args()
    torch.set_num_threads(2)

    rows = []
    for value in [float(x) for x in args.lambdas.split(",")]:
        config = RunConfig(
            data_dir=str(Path(args.data).resolve()), tasks=args.tasks.split(","),
            l1_lambda=value, learning_rate=1e-3, epochs=1, batch_size=8,
            train_per_task=args.train_per_task, test_per_task=args.test_per_task,
        )
        out = Path(args.out) / f"lambda-{value:g}"
        start = time.perf_counter()
        metrics = run(config, out)
        stats = [delta_stats(d / "adapter") for d in sorted((out / "tasks").iterdir())]
        rows.append({
            "lambda": value, **metrics["summary"], "seconds": time.perf_counter() - start,
            "delta_l1": [s["l1"] for s in stats],
            "near_zero_share": [s["near_zero_share"] for s in stats],
            "accuracy": metrics["accuracy"],
        })

    print(f"\n{'λ':>8} {'AA':>6} {'F.Ra':>6} {'BWT':>6}  {'‖ΔW‖₁ per task':<28} near-zero share")
    for r in rows:
        l1 = ", ".join(f"{x:.0f}" for x in r["delta_l1"])
        share = ", ".join(f"{x:.2f}" for x in r["near_zero_share"])
        print(f"{r['lambda']:>8g} {r['AA']:>6.1f} {r['F.Ra']:>6.1f} {r['BWT']:>6.1f}  "
              f"{l1:<28} {share}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
