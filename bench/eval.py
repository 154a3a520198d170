"""Evaluation throughput: the reference pipeline against nlora's, on real data.

Reference (the public O-LoRA/N-LoRA code's way): test prompts in their file order, batches
of ``--ref-batch-size``, greedy ``generate`` of up to 50 new tokens (a row stops at EOS, the
batch when all rows have). nlora: prompts sorted by length, batches of ``--batch-size``,
decoding capped at the longest label's tokens + 1; and ``rank`` mode. The three run
interleaved in one process, ``--repeats`` times; times are medians.

Agreement: nlora's generated text must equal the reference's first (cap) tokens, and each
row's exact-match verdict must be the same as the reference's full 50-token output.

    PYTHONPATH=src python bench/eval.py [--quick]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from common import median, table, timed, write_result

from nlora.batching import Encoder
from nlora.data import Example, load_task
from nlora.evaluate import Prediction, accuracy, generate_answers, rank_answers
from nlora.model import load_backbone

DATA = Path(os.environ.get("NLORA_DATA", Path(__file__).resolve().parents[2] / "shared"
                           / "CL_Benchmark"))
REFERENCE_NEW_TOKENS = 50


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


def _text(encoder: Encoder, ids: list[int]) -> str:
    return encoder.tokenizer.decode(ids, skip_special_tokens=True).strip()


def compare(encoder: Encoder, ref_ids: list[list[int]], ours: list[Prediction],
            cap: int) -> dict[str, float]:
    ref_full = [Prediction(p.index, _text(encoder, ids), p.label)
                for p, ids in zip(ours, ref_ids, strict=True)]
    same_text = sum(p.prediction == _text(encoder, ids[:cap])
                    for p, ids in zip(ours, ref_ids, strict=True))
    same_verdict = sum(a.correct == b.correct for a, b in zip(ours, ref_full, strict=True))
    return {"text_agreement": same_text / len(ours), "verdict_agreement": same_verdict / len(ours),
            "reference_accuracy": accuracy(ref_full), "nlora_accuracy": accuracy(ours)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="SC/amazon,TC/agnews")
    parser.add_argument("--n", type=int, default=64, help="test examples per task")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--ref-batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--quick", action="store_true", help="32 examples, one task, 1 repeat")
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.n, args.repeats = "SC/amazon", 32, 1
    torch.manual_seed(0)
    backbone = load_backbone(args.model)
    model, encoder = backbone.model.eval(), Encoder(backbone.tokenizer, backbone.is_seq2seq)
    rows, record = [], {"args": vars(args), "tasks": {}}
    for name in args.tasks.split(","):
        task = load_task(DATA, name, test_per_task=args.n, seed=42, splits=("test",))
        examples = task.test
        cap = max(len(encoder.label_ids(label)) for label in task.labels) + 1
        times: dict[str, list[float]] = {"reference": [], "generate": [], "rank": []}
        for _ in range(args.repeats):  # interleaved, so machine load hits all three alike
            ref_ids, t = timed(reference_generate, model, encoder, examples,
                               args.ref_batch_size)
            times["reference"].append(t)
            ours, t = timed(generate_answers, model, encoder, examples, task.labels,
                            args.batch_size)
            times["generate"].append(t)
            ranked, t = timed(rank_answers, model, encoder, examples, task.labels,
                              args.batch_size)
            times["rank"].append(t)
        agreement = compare(encoder, ref_ids, ours, cap)
        speed = {k: len(examples) / median(v) for k, v in times.items()}
        record["tasks"][name] = {
            "n": len(examples), "seconds": times, "samples_per_s": speed, **agreement,
            "rank_accuracy": accuracy(ranked), "cap_tokens": cap,
            "reference_mean_new_tokens": sum(
                sum(t != encoder.pad_id for t in ids) for ids in ref_ids) / len(ref_ids),
        }
        rows.append([name, len(examples), speed["reference"], speed["generate"],
                     speed["generate"] / speed["reference"], agreement["text_agreement"],
                     agreement["verdict_agreement"], speed["rank"],
                     speed["rank"] / speed["reference"], agreement["reference_accuracy"],
                     agreement["nlora_accuracy"], accuracy(ranked)])
    print(table(["task", "n", "ref samples/s", "generate samples/s", "speed-up",
                 "text agree", "verdict agree", "rank samples/s", "rank speed-up",
                 "ref acc", "generate acc", "rank acc"], rows))
    print(f"\nwritten: {write_result('eval-quick' if args.quick else 'eval', record)}")


if __name__ == "__main__":
    main()
