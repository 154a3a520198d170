"""Training speed on the default model and real data.

1. Length-grouped batches against plain random batches (``--group-by-length`` on/off):
   padding share over a whole epoch of each task, and measured non-padding tokens/s of
   real LoRA training steps on the first ``--steps`` batches of each, interleaved. The
   losses of those steps are recorded too (both start from the same adapter).
2. Step time on fixed 8x128-token batches: a plain PEFT LoRA step (``model(**batch)``,
   head at every position), the same step with the LM head only at answer positions, and
   the full N-LoRA step (head at answers + ℓ1 penalty). Interleaved; medians.

    PYTHONPATH=src python bench/train.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import os
from pathlib import Path

import torch
from common import median, table, timed, write_result

from nlora.adapters import add_adapter
from nlora.batching import Encoder
from nlora.config import RunConfig
from nlora.data import load_task
from nlora.loss import answer_head_forward
from nlora.methods.nlora import NLoRA
from nlora.model import load_backbone
from nlora.train import make_train_loader

DATA = Path(os.environ.get("NLORA_DATA", Path(__file__).resolve().parents[2] / "shared"
                           / "CL_Benchmark"))


def padding_stats(loader) -> dict[str, float]:
    real = padded = 0
    for batch in loader:
        real += int(batch["attention_mask"].sum())
        padded += batch["attention_mask"].numel()
    return {"real_tokens": real, "padded_tokens": padded, "padding_share": 1 - real / padded}


def train_step(model, optimizer, batch, forward, penalty=None) -> float:
    outputs = forward(model, batch)
    loss = outputs.loss if penalty is None else outputs.loss + penalty(model)
    loss.backward()
    optimizer.step()
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


def step_times(base, encoder, args) -> tuple[list[list], dict]:
    task = load_task(DATA, "SC/amazon", train_per_task=400, seed=42, splits=("train",))
    short = Encoder(encoder.tokenizer, is_seq2seq=False, max_source_length=args.seq_len)
    features = sorted((short.train_features(ex) for ex in task.train),
                      key=lambda f: -len(f["input_ids"]))[: args.batch_size]
    batch = short.collate_train(features)  # the longest prompts: a full 8 x seq_len batch
    method = NLoRA(RunConfig(), is_seq2seq=False)
    method.l1_lambda = 1e-4

    def penalty(model):
        return method.penalty(model, 0, batch, None)

    variants = {
        "PEFT LoRA, head everywhere": (plain, None),
        "LoRA, head at answers": (answer_head_forward, None),
        "N-LoRA (head at answers + l1)": (answer_head_forward, penalty),
        "N-LoRA, head everywhere + l1": (plain, penalty),
    }
    runs = {name: new_adapter(base, seed=0) for name in variants}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (forward, pen) in variants.items():
            model, optimizer = runs[name]
            _, t = timed(train_step, model, optimizer, batch, forward, pen)
            times[name].append(t)
    ref = median(times["PEFT LoRA, head everywhere"])
    rows = [[name, median(v), median(v) / ref] for name, v in times.items()]
    shape = list(batch["input_ids"].shape)
    return rows, {"batch_shape": shape, "seconds": times,
                  "answer_tokens": int((batch["labels"] != -100).sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="SC/amazon,SC/yelp")
    parser.add_argument("--train-n", type=int, help="training examples per task (default all)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per batching mode")
    parser.add_argument("--seq-len", type=int, default=124, help="prompt tokens, step bench")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds, step bench")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--quick", action="store_true", help="one task, 3 steps, 2 rounds")
    parser.add_argument("--only-steps", action="store_true", help="skip the batching part")
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.steps, args.rounds, args.train_n = "SC/amazon", 3, 2, 800
    backbone = load_backbone(args.model)
    base = backbone.model
    encoder = Encoder(backbone.tokenizer, is_seq2seq=False)
    rows, grouped = ([], {}) if args.only_steps else grouping(base, encoder, args)
    print(table(["task", "padding random", "padding grouped", "padded tokens ratio",
                 "random tok/s", "grouped tok/s", "speed-up", "mean loss random",
                 "mean loss grouped"], rows))
    step_rows, steps = step_times(base, encoder, args)
    print()
    print(f"step on a {steps['batch_shape']} batch ({steps['answer_tokens']} answer tokens)")
    print(table(["step", "median s/step", "vs PEFT LoRA"], step_rows))
    name = "train-steps" if args.only_steps else "train"
    path = write_result(name + ("-quick" if args.quick else ""),
                        {"args": vars(args), "grouping": grouped, "step": steps})
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
