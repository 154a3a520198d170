"""Training speed on the default model and real data.

1. Length-grouped batches against plain random batches (``--group-by-length`` on/off):
   padding share over a whole epoch of each task, and measured non-padding tokens/s of
   real LoRA training steps on the first ``--steps`` batches of each, interleaved. The
   losses of those steps are recorded too (both start from the same adapter).
2. Step time on one fixed batch (the ``--batch-size`` longest ``--step-task`` prompts,
   agnews by default, that fit ``--seq-len`` uncut), each step as ``train_task`` runs it
   (forward, + penalty, backward, AdamW, ``after_step``): a plain PEFT LoRA step
   (``model(**batch)``, head at every position), LoRA with the LM head only at answer
   positions, the N-LoRA step as ``nlora run`` trains (head at answers + ℓ1 penalty), and
   that step with the prompts' shared prefix run once per batch
   (``answer_head_forward(..., shared_prefix=True)``). ``--rounds`` interleaved rounds;
   medians, and the median of per-round ratios to the PEFT step. Token positions run
   (padding included; the shared prefix once where it is run once), samples/s, real
   tokens/s, FLOPs per step (torch's FLOP counter + attention) and their share of the
   matmul FLOP/s measured in the same process right before and after every timed step.

    PYTHONPATH=src python bench/train.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import os
from pathlib import Path

import torch
from common import make_train_loader, median, table, timed, write_result
from flops import matmul_ceiling, step_flops

from nlora.adapters import add_adapter
from nlora.batching import Encoder
from nlora.config import RunConfig
from nlora.families import load_task
from nlora.loss import answer_head_forward, batch_prefix_length
from nlora.methods.nlora import NLoRA
from nlora.model import load_backbone

DATA = Path(os.environ.get("NLORA_DATA", Path(__file__).resolve().parents[2] / "shared"
                           / "CL_Benchmark"))


def padding_stats(loader) -> dict[str, float]:
    real = padded = 0
    for batch in loader:
        real += int(batch["attention_mask"].sum())
        padded += batch["attention_mask"].numel()
    return {"real_tokens": real, "padded_tokens": padded, "padding_share": 1 - real / padded}


def train_step(model, optimizer, batch, forward, method=None) -> float:
    """One optimiser step as ``train_task`` runs it: forward, + penalty, backward, update."""
    outputs = forward(model, batch)
    loss = outputs.loss.float()
    penalty = None if method is None else method.penalty(model, 0, batch, outputs)
    if penalty is not None:
        loss = loss + penalty
    loss.backward()
    optimizer.step()
    if method is not None:
        method.after_step(model, 0, optimizer)
    optimizer.zero_grad(set_to_none=True)
    return float(outputs.loss.detach())


def plain(model, batch):
    return model(**batch)


def new_adapter(base, seed: int):
    torch.manual_seed(seed)
    model = add_adapter(copy.deepcopy(base), RunConfig(), is_seq2seq=False)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-3)


def grouping(base, encoder, args) -> tuple[list[list], dict]:
    rows, record = [], {}
    for name in args.tasks.split(","):
        task = load_task(DATA, name, train_per_task=args.train_n, seed=42, splits=("train",))
        features = [encoder.train_features(ex) for ex in task.train]
        loaders = {mode: make_train_loader(features, encoder, args.batch_size, seed=42,
                                           group_by_length=(mode == "grouped"))
                   for mode in ("random", "grouped")}
        stats = {mode: padding_stats(loader) for mode, loader in loaders.items()}
        batches = {mode: [b for _, b in zip(range(args.steps), loader, strict=False)]
                   for mode, loader in loaders.items()}
        runs = {mode: new_adapter(base, seed=0) for mode in loaders}
        seconds = {mode: 0.0 for mode in loaders}
        losses: dict[str, list[float]] = {mode: [] for mode in loaders}
        for step in range(args.steps):  # interleaved: one random step, one grouped step
            for mode in loaders:
                model, optimizer = runs[mode]
                loss, t = timed(train_step, model, optimizer, batches[mode][step],
                                answer_head_forward)
                seconds[mode] += t
                losses[mode].append(loss)
        tps = {mode: sum(int(b["attention_mask"].sum()) for b in batches[mode]) / seconds[mode]
               for mode in loaders}
        record[name] = {"padding": stats, "tokens_per_s": tps, "seconds": seconds,
                        "losses": losses, "steps": args.steps, "batch_size": args.batch_size,
                        "train_examples": len(features)}
        rows.append([name, stats["random"]["padding_share"], stats["grouped"]["padding_share"],
                     stats["random"]["padded_tokens"] / stats["grouped"]["padded_tokens"],
                     tps["random"], tps["grouped"], tps["grouped"] / tps["random"],
                     sum(losses["random"]) / args.steps, sum(losses["grouped"]) / args.steps])
    return rows, record


def step_batch(encoder, args):
    """The ``--batch-size`` longest prompts of ``--step-task`` that fit ``--seq-len`` tokens."""
    task = load_task(DATA, args.step_task, train_per_task=400, seed=42, splits=("train",))
    features = [f for f in (encoder.train_features(ex) for ex in task.train)
                if f["labels"].count(-100) <= args.seq_len]
    features = sorted(features, key=lambda f: -len(f["input_ids"]))[: args.batch_size]
    if not features:
        raise SystemExit(f"no {args.step_task} prompt fits --seq-len {args.seq_len}")
    return encoder.collate_train(features)


PEFT = "PEFT LoRA step (model(**batch))"
NLORA = "N-LoRA step as nlora run trains (head at answers + l1)"


def step_times(base, encoder, args) -> tuple[list[list], dict]:
    batch = step_batch(encoder, args)
    method = NLoRA(RunConfig(), is_seq2seq=False)
    method.l1_lambda = 1e-4

    def prefix_once(model, batch):
        return answer_head_forward(model, batch, shared_prefix=True)

    variants = {  # name: (forward, method adding the l1 penalty, prompt prefix run once)
        PEFT: (plain, None, False),
        "LoRA, head at answers (no l1)": (answer_head_forward, None, False),
        NLORA: (answer_head_forward, method, False),
        "N-LoRA, shared prompt prefix once per batch": (prefix_once, method, True),
    }
    rows_, width = batch["input_ids"].shape
    prefix = batch_prefix_length(batch)
    real = int(batch["attention_mask"].sum())
    answers = int((batch["labels"] != -100).sum())
    positions = {name: rows_ * width - ((rows_ - 1) * prefix if once else 0)
                 for name, (_, _, once) in variants.items()}
    runs = {name: new_adapter(base, seed=0) for name in variants}
    flops = {}
    for name, (forward, meth, _) in variants.items():  # counted once, untimed (slow counter)
        model, optimizer = runs[name]
        flops[name] = step_flops(model, train_step, model, optimizer, batch, forward, meth)
    times: dict[str, list[float]] = {name: [] for name in variants}
    ceilings: dict[str, list[float]] = {name: [] for name in variants}
    losses: dict[str, list[float]] = {name: [] for name in variants}
    shapes = ceiling_shapes(base)
    for _ in range(args.rounds):  # interleaved: each round runs every variant once
        for name, (forward, meth, _) in variants.items():
            model, optimizer = runs[name]
            before = matmul_ceiling(shapes, seconds=0.5)["flops_per_s"]
            loss, t = timed(train_step, model, optimizer, batch, forward, meth)
            after = matmul_ceiling(shapes, seconds=0.5)["flops_per_s"]
            times[name].append(t)
            losses[name].append(loss)
            ceilings[name].append((before + after) / 2)
    ref = times[PEFT]
    rows, ratios_by = [], {}
    for name, v in times.items():
        ratios = [a / b for a, b in zip(v, ref, strict=True)]  # per round: same machine load
        ratios_by[name] = ratios
        seconds = median(v)
        share = median([flops[name]["flops"] / t / lim
                        for t, lim in zip(v, ceilings[name], strict=True)])
        rows.append([name, seconds, median(ratios), min(ratios), max(ratios),
                     rows_ / seconds, real / seconds, positions[name],
                     flops[name]["flops"] / 1e12, flops[name]["flops"] / seconds / 1e9, share])
    return rows, {"batch_shape": [rows_, width], "seconds": times, "ratios_to_peft": ratios_by,
                  "losses": losses, "flops": flops, "matmul_flops_per_s": ceilings,
                  "positions_run": positions, "prefix_tokens": prefix,
                  "unique_tokens": real - (rows_ - 1) * prefix, "real_tokens": real,
                  "answer_tokens": answers}


def ceiling_shapes(model) -> list[tuple[int, int, int]]:
    config = model.config
    return [(1024, config.hidden_size, config.intermediate_size), (2048, 2048, 2048)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="SC/amazon,SC/yelp")
    parser.add_argument("--train-n", type=int, help="training examples per task (default all)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per batching mode")
    parser.add_argument("--step-task", default="TC/agnews", help="task of the step bench")
    parser.add_argument("--seq-len", type=int, default=124, help="prompt tokens, step bench")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds, step bench")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--quick", action="store_true", help="one task, 3 steps, 2 rounds")
    parser.add_argument("--only-steps", action="store_true", help="skip the batching part")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.tasks, args.steps, args.rounds, args.train_n = "SC/amazon", 3, 2, 800
    backbone = load_backbone(args.model)
    base = backbone.model
    encoder = Encoder(backbone.tokenizer, is_seq2seq=False)
    rows, grouped = ([], {}) if args.only_steps else grouping(base, encoder, args)
    if rows:
        print(table(["task", "padding random", "padding grouped", "padded tokens ratio",
                     "random tok/s", "grouped tok/s", "speed-up", "mean loss random",
                     "mean loss grouped"], rows))
    step_rows, steps = step_times(base, encoder, args)
    print()
    print(f"step on one {args.step_task} batch {steps['batch_shape']}: "
          f"{steps['real_tokens']} real tokens, {steps['answer_tokens']} answer tokens, shared "
          f"prefix {steps['prefix_tokens']}, unique tokens {steps['unique_tokens']}; matmul "
          f"{median([c for v in steps['matmul_flops_per_s'].values() for c in v]) / 1e9:.1f}"
          f" GFLOP/s; {args.rounds} interleaved rounds")
    print(table(["step", "median s/step", "vs PEFT (median of rounds)", "min ratio",
                 "max ratio", "samples/s", "real tok/s", "positions run", "TFLOP/step",
                 "GFLOP/s", "of matmul"], step_rows))
    name = "train-steps" if args.only_steps else "train"
    path = write_result(name + ("-quick" if args.quick else ""),
                        {"args": vars(args), "grouping": grouped, "step": steps})
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
