"""The three training mechanics of the releases that ``--protocol release`` reproduces or
documents (issue 25, items 6-8; docs/reproduction.md), measured on a tiny T5 built in code
(no download) and rows of the shipped sample:

6. DeepSpeed's WarmupLR (``--zero-lr-steps 2``): the learning rate of each step, and whether
   the weights moved after the first two steps.
7. LoRA dropout on the earlier tasks' ranks: the training loss of one batch with task 1's
   adapter merged into the base (nlora) and kept as a separate, frozen adapter whose input
   also passes through dropout (the releases' extra ranks), mean over dropout draws; without
   dropout (eval mode) the two are equal.
8. The loss of 6 rows split in two halves of 3: every answer token weighted alike (paper,
   ``--loss-parts 1``) against the mean of the two halves' mean losses (the releases' per-GPU
   means, ``--loss-parts 2``).

    .venv/bin/python bench/release_parity.py
"""

from __future__ import annotations

import copy
import statistics

import torch
from accelerate import Accelerator
from common import write_result
from peft import PeftModel
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

from nlora.adapters import add_adapter, save_adapter
from nlora.batching import Encoder
from nlora.config import RunConfig
from nlora.data import SAMPLE_DATA
from nlora.families import load_task
from nlora.methods.nlora import NLoRA
from nlora.train import global_batches, train_task

DRAWS = 400  # dropout draws per form in item 7


def tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>")


def tiny_t5(tok: PreTrainedTokenizerFast, dropout: float = 0.1) -> T5ForConditionalGeneration:
    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(
        vocab_size=len(tok), d_model=32, d_ff=64, d_kv=8, num_layers=2, num_decoder_layers=2,
        num_heads=4, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id, dropout_rate=dropout))


def randomise_lora(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name and p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def main() -> None:
    task = load_task(SAMPLE_DATA, "TC/agnews", train_per_task=12, test_per_task=2, seed=1)
    tok = tokenizer([ex.prompt + " " + ex.label for ex in task.train])
    encoder = Encoder(tok, is_seq2seq=True, max_source_length=96)
    results = {}

    # 6: the learning rate of each step under --zero-lr-steps 2
    config = RunConfig(lora_r=4, lora_dropout=0.0, l1_lambda=0.0, tasks=["a"])
    lrs = {}
    for zero in (0, 2):
        method = NLoRA(config, is_seq2seq=True)
        model = method.begin_task(tiny_t5(tok), 0, None)
        start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        moved = []

        def on_step(record, model=model, start=start, moved=moved):
            moved.append(any(not p.equal(start[n]) for n, p in model.named_parameters()
                             if p.requires_grad))
        _, result = train_task(model, method, 0, task.train[:8], encoder, Accelerator(cpu=True),
                               1e-3, 1, 2, 0.0, seed=0, group_by_length=False, zero_lr_steps=zero,
                               on_step=lambda r, lrs=lrs, zero=zero, cb=on_step: (
                                   lrs.setdefault(zero, []).append(r.learning_rate), cb(r)))
        results[f"zero_lr_steps_{zero}"] = {"learning_rates": lrs[zero],
                                            "weights_moved_after_step": moved,
                                            "last_loss": result.last_loss}

    # 7: task 2's loss with task 1 merged, or kept as a separate adapter under dropout (T5's
    # own dropout off, so the LoRA dropout is the only random part)
    base = tiny_t5(tok, dropout=0.0)
    first = add_adapter(copy.deepcopy(base), RunConfig(lora_r=8, lora_dropout=0.1), True)
    randomise_lora(first, seed=1)
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        save_adapter(first, Path(tmp) / "t1")
        merged = PeftModel.from_pretrained(copy.deepcopy(base), Path(tmp) / "t1").merge_and_unload()
        merged = add_adapter(merged, RunConfig(lora_r=8, lora_dropout=0.1), True)
        randomise_lora(merged, seed=2)
        separate = PeftModel.from_pretrained(copy.deepcopy(base), Path(tmp) / "t1",
                                             adapter_name="old")
    new = {k: v for k, v in merged.state_dict().items() if "lora_" in k}
    separate.add_adapter("new", merged.peft_config["default"])
    separate.load_state_dict({k.replace(".default.", ".new."): v for k, v in new.items()},
                             strict=False)
    separate.base_model.set_adapter(["old", "new"])
    batch = encoder.collate_train([encoder.train_features(ex) for ex in task.train[:6]])
    with torch.no_grad():
        plain = [float(m.eval()(**batch).loss) for m in (merged, separate)]
        draws = {"merged": [], "separate": []}
        for seed in range(DRAWS):
            for name, m in (("merged", merged), ("separate", separate)):
                torch.manual_seed(seed)
                draws[name].append(float(m.train()(**batch).loss))
    results["dropout_on_earlier_ranks"] = {
        "eval_mode_loss": {"merged": plain[0], "separate": plain[1]},
        "draws": DRAWS,
        "train_mode_loss_mean": {k: statistics.mean(v) for k, v in draws.items()},
        "train_mode_loss_stdev": {k: statistics.stdev(v) for k, v in draws.items()},
    }

    # 8: 6 rows in two halves: token-weighted against the mean of the halves' means
    features = [encoder.train_features(ex) for ex in task.train[:6]]
    model = tiny_t5(tok).eval()
    order = global_batches([len(f["input_ids"]) for f in features], 6, 0, 0, False)[0]
    with torch.no_grad():
        whole = float(model(**encoder.collate_train(features)).loss)
        halves = [float(model(**encoder.collate_train([features[i] for i in order[k::2]])).loss)
                  for k in (0, 1)]
    tokens = [sum(sum(1 for t in features[i]["labels"] if t != -100) for i in order[k::2])
              for k in (0, 1)]
    results["loss_weighting"] = {"token_weighted": whole, "mean_of_half_means": sum(halves) / 2,
                                 "half_losses": halves, "half_answer_tokens": tokens}
    for key, value in results.items():
        print(key, value)
    write_result("release_parity", results)


if __name__ == "__main__":
    main()
