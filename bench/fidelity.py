"""Reproduction-fidelity evidence (docs/reproduction.md).

1. O-LoRA's orthogonality term, released form (Σ|A_i A_tᵀ|) against the paper's (‖A_iᵀA_t‖²_F),
   on T5-large shapes with Kaiming-initialised A (d = 1024, r = 8, three earlier tasks): the
   ratio of the values and of the gradient norms (no model needed).
2. Two real O-LoRA runs (default model, two tasks of the shared data), one trained with each
   form: both terms, unweighted, at the first and the last step of task 2.
3. The first run's accuracy table under the normalised and the strict scorer (its predictions
   re-scored: the scorer is the only difference).

    .venv/bin/python bench/fidelity.py --data ../shared/CL_Benchmark --tasks dbpedia,amazon \\
        --train-per-task 64 --test-per-task 40 --batch-size 8
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from common import table, write_result

from nlora.methods import olora as olora_module
from nlora.presets import make_config
from nlora.rundir import finished_task_dirs
from nlora.runner import run
from nlora.scoring import is_correct
from nlora.tables import format_results


def kaiming_a(r: int, d: int, gen: torch.Generator) -> torch.Tensor:
    """PEFT's lora_A initialisation: kaiming_uniform_(a=√5), i.e. U(±1/√d)."""
    bound = 1 / math.sqrt(d)
    return (torch.rand(r, d, generator=gen) * 2 - 1) * bound


def synthetic_ratio(d: int = 1024, r: int = 8, earlier: int = 3, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    previous = torch.cat([kaiming_a(r, d, gen) for _ in range(earlier)])  # (3r, d)
    new = kaiming_a(r, d, gen).requires_grad_(True)
    out = {}
    for form in ("abs", "fro"):
        product = previous @ new.T
        value = product.abs().sum() if form == "abs" else product.pow(2).sum()
        (grad,) = torch.autograd.grad(value, new)
        out[form] = {"value": float(value.detach()), "grad_norm": float(grad.norm())}
    out["value_ratio_abs_over_fro"] = out["abs"]["value"] / out["fro"]["value"]
    out["grad_ratio_abs_over_fro"] = out["abs"]["grad_norm"] / out["fro"]["grad_norm"]
    return out


def recorded_run(form: str, args: argparse.Namespace, out: Path) -> tuple[dict, list[dict]]:
    """An O-LoRA run trained with ``form``; both unweighted terms at every step of task 2."""
    steps: list[dict] = []
    original = olora_module.OLoRA.penalty

    def recording(self, model, index, batch, outputs):
        if index == 1:
            with torch.no_grad():
                steps.append({f: float(olora_module.orthogonality_penalty(
                    model, self.previous_A, f)) for f in ("abs", "fro")})
        return original(self, model, index, batch, outputs)

    config = make_config(
        method="olora", data_dir=args.data, tasks=args.tasks, olora_orth=form,
        train_per_task=args.train_per_task, test_per_task=args.test_per_task, epochs=1,
        batch_size=args.batch_size, seed=args.seed, zero_shot=False,
    )
    olora_module.OLoRA.penalty = recording
    try:
        metrics = run(config, out)
    finally:
        olora_module.OLoRA.penalty = original
    return metrics, steps


def rescored(run_dir: Path, metrics: dict, scorer: str, causal: bool) -> dict:
    """metrics.json's matrix recomputed from the saved predictions under ``scorer``."""
    names = metrics["tasks"]
    matrix = [[None] * len(names) for _ in names]
    for j, folder in enumerate(finished_task_dirs(run_dir)):
        rows = [json.loads(x) for x in (folder / "predictions.jsonl").read_text().splitlines()]
        for name in names:
            mine = [r for r in rows if r["task"] == name]
            if mine:
                right = sum(is_correct(r["prediction"], r["label"], scorer, causal)
                            for r in mine)
                matrix[names.index(name)][j] = 100.0 * right / len(mine)
    from nlora.metrics import summarize

    return {**metrics, "scorer": scorer, "accuracy": matrix,
            "summary": {**summarize(matrix), "AA_pooled": None}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--tasks", default="dbpedia,amazon")
    parser.add_argument("--train-per-task", type=int, default=64)
    parser.add_argument("--test-per-task", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", type=Path, default=None, help="run folders (default: temp)")
    args = parser.parse_args(argv)

    synthetic = synthetic_ratio()
    print("1. T5-large shapes (d=1024, r=8, 3 earlier tasks, Kaiming A), one module:")
    print(table(["form", "value", "grad norm"],
                [[f, synthetic[f]["value"], synthetic[f]["grad_norm"]] for f in ("abs", "fro")]))
    print(f"abs/fro: value x{synthetic['value_ratio_abs_over_fro']:.0f}, gradient "
          f"x{synthetic['grad_ratio_abs_over_fro']:.0f}\n")

    root = args.out or Path(tempfile.mkdtemp(prefix="nlora-fidelity-"))
    record: dict[str, Any] = {"synthetic": synthetic, "runs": {}, "command": sys.argv}
    rows = []
    for form in ("abs", "fro"):
        metrics, steps = recorded_run(form, args, root / f"olora-{form}")
        record["runs"][form] = {"steps": steps, "metrics": metrics}
        rows.append([form, steps[0]["abs"], steps[-1]["abs"], steps[0]["fro"], steps[-1]["fro"],
                     len(steps)])
    print("2. O-LoRA on the default model, task 2: unweighted terms at its first and last step")
    print(table(["trained with", "abs first", "abs last", "fro first", "fro last", "steps"],
                rows))

    abs_run = root / "olora-abs"
    metrics = record["runs"]["abs"]["metrics"]
    causal = True  # SmolLM2 is a causal model
    print("\n3. The abs run's table, normalised scorer (as the run printed it):")
    print(format_results(metrics))
    strict = rescored(abs_run, metrics, "strict", causal)
    print("\n   the same predictions, strict scorer:")
    print(format_results(strict))
    record["strict_table"] = strict
    path = write_result("fidelity", record)
    print(f"\nrecord: {path}; run folders: {root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
