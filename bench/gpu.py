"""GPU figures at T5-large and LLaMA-7B shapes: random weights, bf16, no hub, no data files.

Training: step time of a plain PEFT LoRA step (``model(**batch)``) against the N-LoRA step as
``nlora run`` trains (causal: LM head only at answers + ℓ1 penalty; seq2seq: plain forward
+ ℓ1), and, for the causal model, with the prompts' shared prefix run once per batch.
Interleaved rounds, medians; peak memory per variant; MFU = step FLOPs / step time against
the bf16 matmul FLOP/s measured in the same process (and ``--peak-tflops``, the card's
nominal figure, if given).

Evaluation: samples/s of ``nlora.evaluate.predict`` (generate and rank) with and without the
prefix cache, on synthetic prompts: a shared ``--prefix`` tokens (the header, instruction
and options of a real task) + 20-200 own tokens; predictions must be identical. Seq2seq
models have no prefix cache (bidirectional encoder): plain path only.

    python bench/gpu.py                      # on a CUDA machine
    python bench/gpu.py --tiny --device cpu  # smoke test: small shapes, float32, CPU
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
from common import median, table, write_result
from flops import matmul_ceiling, step_flops

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from nlora.adapters import add_adapter  # noqa: E402
from nlora.batching import Encoder  # noqa: E402
from nlora.config import RunConfig  # noqa: E402
from nlora.data import Example  # noqa: E402
from nlora.evaluate import predict  # noqa: E402
from nlora.loss import answer_head_forward  # noqa: E402
from nlora.methods.nlora import NLoRA  # noqa: E402

VOCAB = 32000


class IdTokenizer:
    """Text is space-separated token ids: enough of a tokenizer for ``Encoder`` and decoding."""

    pad_token_id, eos_token_id, bos_token_id = 0, 1, None
    is_fast = False  # no character offsets: the bench's prompts fit, "tail" never cuts

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [int(t) for t in text.split()]}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        return " ".join(str(i) for i in ids if i > 1 or not skip_special_tokens)

    def batch_decode(self, rows, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(row, skip_special_tokens) for row in rows]


def build_model(kind: str, tiny: bool, dtype: torch.dtype, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

    if kind == "t5-large":
        shape = (dict(d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4) if tiny else
                 dict(d_model=1024, d_ff=4096, d_kv=64, num_layers=24, num_heads=16))
        config = T5Config(vocab_size=VOCAB, pad_token_id=0, eos_token_id=1,
                          decoder_start_token_id=0, **shape)
        cls = T5ForConditionalGeneration
    else:
        shape = (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4) if tiny else
                 dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32))
        config = LlamaConfig(vocab_size=VOCAB, pad_token_id=0, eos_token_id=1,
                             bos_token_id=None, max_position_embeddings=4096, **shape)
        cls = LlamaForCausalLM
    torch.manual_seed(0)
    with torch.device(device):
        model = cls._from_config(config, dtype=dtype)
    return model.eval(), kind == "t5-large"


def synthetic_task(n: int, prefix_len: int, seed: int) -> tuple[list[Example], list[str]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(2, VOCAB) for _ in range(prefix_len)]
    labels = [" ".join(str(rng.randrange(2, VOCAB)) for _ in range(k)) for k in (1, 2, 3, 2)]
    examples = []
    for _ in range(n):
        own = [rng.randrange(2, VOCAB) for _ in range(rng.randint(20, 200))]
        label = rng.choice(labels)
        text = " ".join(map(str, prefix + own))
        examples.append(Example(sentence=text, label=label, prompt=text))
    return examples, labels


def train_batch(encoder: Encoder, examples: list[Example], rows: int, device: str):
    features = [encoder.train_features(ex) for ex in examples[:rows]]
    return {k: v.to(device) for k, v in encoder.collate_train(features).items()}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def training(kind, base, is_seq2seq, encoder, examples, args, ceiling) -> tuple[list, dict]:
    batch = train_batch(encoder, examples, args.batch_size, args.device)
    method = NLoRA(RunConfig(), is_seq2seq=is_seq2seq)
    method.l1_lambda = 1e-4

    def plain(model, batch):
        return model(**batch)

    def nlora(model, batch):
        return plain(model, batch) if is_seq2seq else answer_head_forward(model, batch)

    def nlora_prefix(model, batch):
        return answer_head_forward(model, batch, shared_prefix=True)

    variants = {"PEFT LoRA": (plain, False), "N-LoRA": (nlora, True)}
    if not is_seq2seq:
        variants["N-LoRA, prefix once per batch"] = (nlora_prefix, True)
    # One adapter for all variants (a copy of a 7B model per variant would not pay): each
    # step costs the same whatever the adapter's values.
    model = add_adapter(base, RunConfig(), is_seq2seq)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(name):
        forward, with_penalty = variants[name]
        outputs = forward(model, batch)
        loss = outputs.loss
        if with_penalty:
            loss = loss + method.penalty(model, 0, batch, outputs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    flops, peaks = {}, {}
    for name in variants:
        step(name)  # warm-up (kernels, allocator)
        if args.device.startswith("cuda"):
            sync(args.device)
            torch.cuda.reset_peak_memory_stats()
        flops[name] = step_flops(model, step, name)["flops"]
        sync(args.device)
        peaks[name] = (torch.cuda.max_memory_allocated() / 2**30
                       if args.device.startswith("cuda") else float("nan"))
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name in variants:
            sync(args.device)
            start = time.perf_counter()
            step(name)
            sync(args.device)
            times[name].append(time.perf_counter() - start)
    ref = median(times["PEFT LoRA"])
    rows = []
    for name in variants:
        seconds = median(times[name])
        mfu = flops[name] / seconds / ceiling
        nominal = flops[name] / seconds / (args.peak_tflops * 1e12) if args.peak_tflops else ""
        rows.append([kind, name, list(batch["input_ids"].shape), seconds, seconds / ref,
                     peaks[name], flops[name] / 1e12, mfu, nominal])
    return rows, {"seconds": times, "flops": flops, "peak_gib": peaks}


def evaluation(kind, model, encoder, examples, labels, args, ceiling) -> tuple[list, dict]:
    rows, record = [], {}
    for mode in ("generate", "rank"):
        cached_options = (False,) if encoder.is_seq2seq else (False, True)
        times = {c: [] for c in cached_options}
        preds = {}
        predict(model, encoder, examples[: args.batch_size], labels, args.eval_batch_size,
                mode, prefix_cache=False)  # warm-up
        for _ in range(args.rounds):
            for cached in cached_options:
                sync(args.device)
                start = time.perf_counter()
                preds[cached] = predict(model, encoder, examples, labels, args.eval_batch_size,
                                        mode, prefix_cache=cached)
                sync(args.device)
                times[cached].append(time.perf_counter() - start)
        plain = median(times[False])
        for cached in cached_options:
            same = sum(a.prediction == b.prediction
                       for a, b in zip(preds[cached], preds[False], strict=True))
            seconds = median(times[cached])
            rows.append([kind, mode, "prefix cache" if cached else "plain",
                         len(examples) / seconds, plain / seconds, same / len(examples)])
            record[f"{mode}, {'prefix' if cached else 'plain'}"] = {
                "seconds": times[cached], "same_predictions": same / len(examples)}
    return rows, record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="t5-large,llama-7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="small shapes, float32 (smoke test)")
    parser.add_argument("--batch-size", type=int, default=8, help="training batch")
    parser.add_argument("--eval-batch-size", type=int, default=64)
    parser.add_argument("--n", type=int, default=256, help="evaluation prompts")
    parser.add_argument("--prefix", type=int, default=48, help="shared prompt tokens")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, help="the card's nominal bf16 TFLOP/s")
    args = parser.parse_args()
    dtype = torch.float32 if args.tiny else torch.bfloat16
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py: no CUDA device (smoke test: --tiny --device cpu)")
    ceiling = matmul_ceiling([(8192, 8192, 8192), (4096, 4096, 11008)] if not args.tiny
                             else [(256, 256, 256)], dtype=dtype, device=args.device)
    print(f"matmul ceiling {ceiling['flops_per_s'] / 1e12:.1f} TFLOP/s ({dtype})", flush=True)
    encoder_of = {}
    train_rows, eval_rows, record = [], [], {"args": vars(args), "ceiling": ceiling}
    for kind in args.models.split(","):
        model, is_seq2seq = build_model(kind, args.tiny, dtype, args.device)
        encoder = encoder_of.setdefault(is_seq2seq, Encoder(IdTokenizer(), is_seq2seq,
                                                            truncation="tail"))
        examples, labels = synthetic_task(args.n, args.prefix, seed=1)
        rows, eval_record = evaluation(kind, model, encoder, examples, labels, args,
                                       ceiling["flops_per_s"])
        eval_rows += rows
        rows, train_record = training(kind, model, is_seq2seq, encoder, examples, args,
                                      ceiling["flops_per_s"])  # wraps model: after eval
        train_rows += rows
        record[kind] = {"eval": eval_record, "train": train_record}
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    print(table(["model", "step", "batch", "median s/step", "vs PEFT LoRA", "peak GiB",
                 "TFLOP/step", "of measured matmul", "of nominal peak"], train_rows))
    print()
    print(table(["model", "mode", "path", "samples/s", "vs plain", "same predictions"],
                eval_rows))
    name = "gpu-tiny" if args.tiny else "gpu"
    print(f"\nwritten: {write_result(name, record)}")


if __name__ == "__main__":
    main()
