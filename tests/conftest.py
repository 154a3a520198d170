"""Shared fixtures: tiny randomly initialised T5 and LLaMA models saved to disk, the data.

The tokenizer is a small word-piece-free BPE trained in seconds on real benchmark text, so
no model or tokenizer is downloaded. The data is the sample shipped inside the package
(``nlora.data.SAMPLE_DATA``), or ``$NLORA_DATA`` when set: the same data on every machine,
whatever lies beside the clone. A test that needs the full benchmark is marked
``shared_data`` and skipped, with the reason, where ``$NLORA_DATA`` does not hold it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from nlora.data import SAMPLE_DATA

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("NLORA_DATA") or SAMPLE_DATA)
TINY_TASKS = ["SC/yelp", "TC/agnews", "NLI/CB"]


def is_full_benchmark(folder: Path) -> bool:
    """The full CL_Benchmark, not the shipped sample: agnews with its 7600 test rows."""
    test = folder / "TC" / "agnews" / "test.json"
    return test.is_file() and len(json.loads(test.read_text(encoding="utf-8"))) == 7600


def pytest_collection_modifyitems(config, items) -> None:
    if is_full_benchmark(DATA):
        return
    skip = pytest.mark.skip(reason=f"needs the full CL_Benchmark; {DATA} is not it (set "
                            "NLORA_DATA to the full benchmark to run it)")
    for item in items:
        if "shared_data" in item.keywords:
            item.add_marker(skip)


def _corpus() -> list[str]:
    from nlora.data import INSTRUCTIONS

    texts = list(INSTRUCTIONS.values()) + ["Task: Dataset: Option: Answer:"]
    for name in ["SC/yelp", "TC/agnews", "NLI/CB", "SC/amazon", "NLI/MNLI", "QQP/QQP"]:
        folder = DATA / name
        texts += json.loads((folder / "labels.json").read_text())
        rows = json.loads((folder / "test.json").read_text())[:200]
        texts += [r["sentence"] for r in rows]
    return texts


def build_tokenizer(vocab_size: int = 600):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "</s>", "<unk>", "<s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        bos_token="<s>",
    )


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


def tiny_llama(tokenizer, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def tiny_t5(tokenizer, seed: int = 0):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(tokenizer), d_model=32, d_ff=64, d_kv=8, num_layers=2,
        num_decoder_layers=2, num_heads=4, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5ForConditionalGeneration(config)


def _save(model, tokenizer, folder: Path) -> Path:
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tokenizer, tmp_path_factory) -> Path:
    return _save(tiny_llama(tokenizer), tokenizer, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_t5_dir(tokenizer, tmp_path_factory) -> Path:
    return _save(tiny_t5(tokenizer), tokenizer, tmp_path_factory.mktemp("tiny-t5"))


@pytest.fixture(params=["llama", "t5"])
def tiny_model_dir(request, tiny_llama_dir, tiny_t5_dir) -> Path:
    return tiny_llama_dir if request.param == "llama" else tiny_t5_dir


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA / "TC" / "agnews" / "train.json").is_file():
        pytest.fail(f"benchmark data not found at {DATA} (NLORA_DATA?)")
    return DATA


@pytest.fixture
def interrupt_training(monkeypatch):
    """``interrupt_training(k)``: the runner's training of task index ``k`` raises
    KeyboardInterrupt, as Ctrl-C there would (the run exits 130 and keeps what finished);
    ``interrupt_training(None)``: training runs normally again (to resume)."""
    from nlora import runner

    real_train = runner.train_task

    def cut_at(index: int | None) -> None:
        if index is None:
            monkeypatch.setattr(runner, "train_task", real_train)
            return

        def interrupt(model, method, task_index, *args, **kwargs):
            if task_index == index:
                raise KeyboardInterrupt
            return real_train(model, method, task_index, *args, **kwargs)

        monkeypatch.setattr(runner, "train_task", interrupt)

    return cut_at
