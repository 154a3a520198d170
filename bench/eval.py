"""Evaluation throughput on real data: the shared-prefix cache against the plain path.

For each task, nlora's evaluation runs in ``generate`` and ``rank`` modes, each with the
prefix cache (the prompts' shared prefix run once) and without it (today's path before the
cache), interleaved in one process, ``--repeats`` times; times are medians, speed-ups the
median of per-round ratios. The machine's matmul FLOP/s (the practical limit) is measured in
the same process right before and after every timed run; a run's share of the limit uses
the mean of those two, and the table shows the median share.

Reported per task and variant: samples/s, prompt tokens per second, token positions run
(padding included) and the real ones among them, executed forward FLOPs (decoder linears,
dense attention, LM head; counted by hooks, see ``flops.py``), achieved FLOP/s and its share
of the measured matmul FLOP/s. Predictions with and without the cache must be identical.

``--reference`` adds the public O-LoRA/N-LoRA pipeline (file order, batches of 32, up to 50
new tokens, no prefix cache): the "before" of nlora's evaluation. Its answers are decoded
and compared with nlora's (share of identical answers, and its score beside nlora's).

Generation tasks (SuperNI, a user's tasks) run in ``generate`` mode only, up to the task's
answer length (SuperNI: 50 tokens), and are scored by the task's metric (ROUGE-L); ``--superni``
takes four SuperNI tasks of different answer lengths from ``$NLORA_DATA``. The base model
rarely ends an answer before 50 tokens; ``--run DIR`` evaluates a run's final model instead
(e.g. ``nlora demo --benchmark superni``'s N-LoRA run, trained on short answers), whose rows
stop at their own EOS.

    PYTHONPATH=src python bench/eval.py [--quick] [--reference]
    PYTHONPATH=src python bench/eval.py --superni --n 32 --repeats 2 --reference
    PYTHONPATH=src python bench/eval.py --run runs/sdemo/nlora --reference \
        --tasks SuperNI/task363_sst2_polarity_classification,SuperNI/task875_emotion_classification
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from common import median, table, timed, write_result
from flops import CausalFlops, matmul_ceiling

from nlora.batching import Encoder
from nlora.data import Example
from nlora.evaluate import (
    Prediction,
    generate_answers,
    plan_prompt_batches,
    rank_answers,
)
from nlora.families import load_task
from nlora.load import load_model
from nlora.model import load_backbone
from nlora.prefix import build_prefix_cache
from nlora.scoring import row_score

DATA = Path(os.environ.get("NLORA_DATA", Path(__file__).resolve().parents[2] / "shared"
                           / "CL_Benchmark"))
REFERENCE_NEW_TOKENS = 50
SUPERNI = ("SuperNI/task363_sst2_polarity_classification,SuperNI/task591_sciq_answer_generation,"
           "SuperNI/task1572_samsum_summary,SuperNI/task1729_personachat_generate_next")


def task_score(task, predictions: list[Prediction]) -> float:
    """Mean score under the task's own metric (accuracy, exact match or ROUGE-L), x 100."""
    rows = [row_score(task.metric, p.prediction, task.test[p.index].references or [p.label],
                      labels=task.labels or None) for p in predictions]
    return sum(score for score, _ in rows) / len(rows)


@torch.no_grad()
def reference_generate(
    model, encoder: Encoder, examples: list[Example], batch_size: int
) -> list[list[int]]:
    """New token ids per example, the public code's way: file order, up to 50 new tokens."""
    model.eval()
    outputs = []
    for start in range(0, len(examples), batch_size):
        prompts = [encoder.example_ids(ex) for ex in examples[start : start + batch_size]]
        batch = encoder.collate_prompts(prompts)
        out = model.generate(
            **batch, max_new_tokens=REFERENCE_NEW_TOKENS, do_sample=False, num_beams=1,
            pad_token_id=encoder.pad_id, eos_token_id=encoder.eos_id,
        )
        outputs += out[:, batch["input_ids"].shape[1] :].tolist()
    return outputs


def prompt_stats(model, encoder: Encoder, examples: list[Example], batch_size: int) -> dict:
    """Prompt tokens: real, unique (the shared prefix once), and run with/without the cache."""
    prompts = [encoder.example_ids(ex) for ex in examples]
    prefix = build_prefix_cache(model, prompts, encoder.max_source_length)
    skip = len(prefix) if prefix is not None else 0
    covered = [prefix is not None and prefix.covers(p) for p in prompts]
    real = sum(map(len, prompts))

    def columns(use_prefix: bool) -> int:
        total = skip if use_prefix and skip else 0
        for chunk, cached in plan_prompt_batches(prompts, batch_size,
                                                 prefix if use_prefix else None):
            width = max(len(prompts[i]) for i in chunk) - (skip if cached else 0)
            total += len(chunk) * width
        return total

    return {
        "prompts": len(prompts), "prefix_tokens": skip, "covered": sum(covered),
        "real_tokens": real, "unique_tokens": real - skip * max(sum(covered) - 1, 0),
        "mean_prompt_tokens": real / len(prompts),
        "columns_plain": columns(False), "columns_prefix": columns(True),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="TC/agnews,SC/SST-2")
    parser.add_argument("--n", type=int, default=256, help="test examples per task")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default="generate,rank")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--run", help="a run folder: its final model instead of --model")
    parser.add_argument("--reference", action="store_true",
                        help="also time the public code's pipeline (slow)")
    parser.add_argument("--ref-batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--max-source-length", type=int, default=512)
    parser.add_argument("--quick", action="store_true", help="agnews, 64 examples, 1 repeat")
    parser.add_argument("--superni", action="store_true", help=f"--tasks {SUPERNI}")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.tasks, args.n, args.repeats = "TC/agnews", 64, 1
    if args.superni:
        args.tasks = SUPERNI
    torch.manual_seed(0)
    if args.run:
        loaded = load_model(args.run)
        model, tokenizer, is_seq2seq = loaded.model, loaded.tokenizer, loaded.is_seq2seq
    else:
        backbone = load_backbone(args.model)
        model, tokenizer, is_seq2seq = backbone.model, backbone.tokenizer, backbone.is_seq2seq
    model.eval()
    encoder = Encoder(tokenizer, is_seq2seq, args.max_source_length)
    hidden = model.config.hidden_size
    ceiling_shapes = [(4096, hidden, model.config.intermediate_size), (2048, 2048, 2048)]
    functions = {"generate": generate_answers, "rank": rank_answers}
    modes = args.modes.split(",")
    rows, record = [], {"args": vars(args), "tasks": {}, "ceilings": []}
    for name in args.tasks.split(","):
        task = load_task(DATA, name, test_per_task=args.n, seed=42, splits=("test",))
        examples = task.test
        stats = prompt_stats(model, encoder, examples, args.batch_size)
        task_modes = modes if task.labels else ["generate"]  # no labels to rank
        variants = {f"{mode}, {'prefix cache' if cached else 'plain'}": (mode, cached)
                    for mode in task_modes for cached in (False, True)}
        times: dict[str, list[float]] = {v: [] for v in variants}
        ceilings: dict[str, list[float]] = {v: [] for v in variants}
        counts: dict[str, CausalFlops] = {}
        predictions: dict[str, list[Prediction]] = {}
        if args.reference:
            times["reference"] = []
        for _ in range(args.repeats):  # interleaved, so machine load hits all alike
            for variant, (mode, cached) in variants.items():
                # the limit, measured right before and after the run, under the same load
                before = matmul_ceiling(ceiling_shapes, seconds=0.5)["flops_per_s"]
                counter = CausalFlops(model)
                with counter:
                    preds, t = timed(functions[mode], model, encoder, examples, task.labels,
                                     args.batch_size, mode, cached,
                                     *([task.max_new_tokens] if mode == "generate" else []))
                after = matmul_ceiling(ceiling_shapes, seconds=0.5)["flops_per_s"]
                times[variant].append(t)
                ceilings[variant].append((before + after) / 2)
                counts[variant], predictions[variant] = counter, preds
            if args.reference:
                ref_ids, t = timed(reference_generate, model, encoder, examples,
                                   args.ref_batch_size)
                times["reference"].append(t)
        ceiling = median([c for v in ceilings.values() for c in v])
        record["ceilings"] += [c for v in ceilings.values() for c in v]
        task_record = {"n": len(examples), "prompts": stats, "seconds": times,
                       "matmul_flops_per_s": ceilings, "variants": {}}
        for variant, (mode, _) in variants.items():
            seconds = median(times[variant])
            plain = times[f"{mode}, plain"]
            speedup = median([p / t for p, t in zip(plain, times[variant], strict=True)])
            same = sum(a.prediction == b.prediction for a, b in zip(
                predictions[variant], predictions[f"{mode}, plain"], strict=True))
            c = counts[variant]
            achieved = c.executed / seconds
            # share of the limit per run (its own time and neighbouring ceiling), then median
            share = median([c.executed / t / lim
                            for t, lim in zip(times[variant], ceilings[variant], strict=True)])
            real_share = share * c.real / c.executed
            entry = {
                "samples_per_s": len(examples) / seconds, "speedup": speedup,
                "prompt_tokens_per_s": stats["real_tokens"] / seconds,
                "positions_run": c.columns, "real_positions_run": c.real_tokens,
                "executed_flops": c.executed, "real_flops": c.real,
                "achieved_flops_per_s": achieved, "share_of_matmul": share,
                "real_share_of_matmul": real_share,
                "same_predictions": same / len(examples),
                "score": task_score(task, predictions[variant]), "metric": task.metric,
            }
            task_record["variants"][variant] = entry
            rows.append([name, len(examples), variant, entry["samples_per_s"], speedup,
                         entry["prompt_tokens_per_s"], c.columns, c.real_tokens,
                         c.executed / 1e12, achieved / 1e9, share, real_share,
                         entry["same_predictions"], entry["score"]])
        if args.reference:
            speed = len(examples) / median(times["reference"])
            task_record["reference_samples_per_s"] = speed
            task_record["reference_mean_new_tokens"] = sum(
                sum(t != encoder.pad_id for t in ids) for ids in ref_ids) / len(ref_ids)
            # the reference's answers, cut where nlora's generation stops (the answer length)
            length = task.max_new_tokens or REFERENCE_NEW_TOKENS
            answers = encoder.tokenizer.batch_decode([ids[:length] for ids in ref_ids],
                                                     skip_special_tokens=True)
            ref_preds = [Prediction(i, a.strip(), ex.label)
                         for i, (a, ex) in enumerate(zip(answers, examples, strict=True))]
            ours = predictions["generate, prefix cache"]
            same = sum(a.prediction == b.prediction for a, b in zip(ours, ref_preds, strict=True))
            task_record["reference_same_answers"] = same / len(examples)
            task_record["reference_score"] = task_score(task, ref_preds)
            nlora_speed = task_record["variants"]["generate, prefix cache"]["samples_per_s"]
            task_record["nlora_vs_reference"] = nlora_speed / speed
            rows.append([name, len(examples), "reference (public code)", speed,
                         "", "", "", "", "", "", "", "",
                         same / len(examples), task_record["reference_score"]])
        record["tasks"][name] = task_record
        print(f"{name}: {stats['prompts']} prompts, {stats['mean_prompt_tokens']:.1f} tokens on "
              f"average, shared prefix {stats['prefix_tokens']} tokens ({stats['covered']} "
              f"covered); prompt tokens {stats['real_tokens']}, unique {stats['unique_tokens']}; "
              f"prompt positions run (padding incl.) {stats['columns_plain']} plain, "
              f"{stats['columns_prefix']} with the cache; matmul {ceiling / 1e9:.1f} GFLOP/s",
              flush=True)
    print(table(["task", "n", "variant", "samples/s", "vs plain", "prompt tok/s",
                 "positions run", "real positions", "TFLOP executed", "GFLOP/s",
                 "of matmul", "real of matmul", "same preds", "score"], rows))
    for task_name, t in record["tasks"].items():
        if "nlora_vs_reference" in t:
            print(f"{task_name}: nlora {t['nlora_vs_reference']:.2f}x the reference's samples/s, "
                  f"{t['reference_same_answers']:.0%} identical answers")
    name = ("eval-quick" if args.quick else "eval-run" if args.run
            else "eval-superni" if args.superni else "eval")
    print(f"\nwritten: {write_result(name, record)}")
    differing = [f"{task}: {variant}" for task, t in record["tasks"].items()
                 for variant, v in t["variants"].items() if v["same_predictions"] < 1]
    if differing:  # the cache must not change a single prediction
        raise SystemExit(f"predictions differ from the plain path: {', '.join(differing)}")


if __name__ == "__main__":
    main()
