"""Token ids for prompts and labels, and padded batches for training and generation.

Causal models train on prompt + label + EOS with the loss on label + EOS only; seq2seq
models read the prompt in the encoder and produce label + EOS.

Over-long prompts (``truncation``): ``text`` (default) removes tokens from the middle of the
example's own text, so the header, instruction, options and ``Answer:`` stay, as do the
text's beginning and end (where these benchmarks put the question: BoolQA starts with it);
``head`` keeps the first ``max_source_length`` tokens, as the released O-LoRA/N-LoRA code
(the tokenizer's own truncation); ``tail`` keeps the last ones (nlora's earlier behaviour).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from nlora.data import Example
from nlora.errors import ConfigError

IGNORE_INDEX = -100  # positions the loss skips
TRUNCATIONS = ("text", "head", "tail")
MIN_SOURCE_LENGTH = 8  # room for a BOS, a few text tokens and "Answer:"


class Encoder:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        is_seq2seq: bool,
        max_source_length: int = 512,
        truncation: str = "text",
    ) -> None:
        if max_source_length < MIN_SOURCE_LENGTH:
            raise ConfigError(
                f"--max-source-length must be at least {MIN_SOURCE_LENGTH}, got {max_source_length}"
            )
        if truncation not in TRUNCATIONS:
            raise ConfigError(f"--truncation must be one of {', '.join(TRUNCATIONS)}")
        if truncation == "text" and not tokenizer.is_fast:
            raise ConfigError(
                "--truncation text needs a fast tokenizer (character offsets); this model's is "
                "slow: use --truncation head or tail"
            )
        self.tokenizer = tokenizer
        self.is_seq2seq = is_seq2seq
        self.max_source_length = max_source_length
        self.truncation = truncation
        self.pad_id = tokenizer.pad_token_id
        self.eos_id = tokenizer.eos_token_id

    def prompt_ids(self, prompt: str, text: str | None = None) -> list[int]:
        """Token ids of ``prompt``, at most ``max_source_length`` of them.

        ``text`` is the example's own text inside the prompt (``Example.sentence``): with
        ``truncation="text"`` an over-long prompt loses tokens from its middle only. Without
        it (or when the prompt does not contain it) the prompt's end is kept, as ``tail``.
        """
        if self.truncation == "head":
            return self.tokenizer(
                prompt, add_special_tokens=True, truncation=True,
                max_length=self.max_source_length,
            )["input_ids"]
        if self.truncation == "text" and text:
            start = prompt.rfind(text)  # the text follows the header and the instruction
            if start >= 0:
                return self._cut_text(prompt, start, start + len(text))
        return self._keep_tail(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])

    def example_ids(self, example: Example) -> list[int]:
        return self.prompt_ids(example.prompt, example.sentence)

    def _keep_tail(self, ids: list[int]) -> list[int]:
        if len(ids) <= self.max_source_length:
            return ids
        bos = self.tokenizer.bos_token_id
        if bos is not None and ids[0] == bos:  # keep a leading BOS, cut after it
            return [bos] + ids[len(ids) - self.max_source_length + 1 :]
        return ids[len(ids) - self.max_source_length :]

    def _cut_text(self, prompt: str, start: int, end: int) -> list[int]:
        encoded = self.tokenizer(prompt, add_special_tokens=True, return_offsets_mapping=True)
        ids = encoded["input_ids"]
        excess = len(ids) - self.max_source_length
        if excess <= 0:
            return ids
        # tokens wholly inside the text; special tokens have empty (0, 0) offsets
        inside = [
            k for k, (a, b) in enumerate(encoded["offset_mapping"]) if start <= a and b <= end
            and b > a
        ]
        if len(inside) <= excess:  # the rest alone is too long: drop the text, keep the end
            drop = set(inside)
            return self._keep_tail([t for k, t in enumerate(ids) if k not in drop])
        keep = len(inside) - excess
        head = (keep + 1) // 2  # the text's first and last tokens survive, its middle goes
        drop = set(inside[head : head + excess])
        return [t for k, t in enumerate(ids) if k not in drop]

    def label_ids(self, label: str) -> list[int]:
        return self.tokenizer(label, add_special_tokens=False)["input_ids"]

    def train_features(self, example: Example) -> dict[str, list[int]]:
        prompt = self.example_ids(example)
        target = self.label_ids(example.label)
        if example.max_target is not None:  # EOS included, as the tokenizer truncates
            target = target[: example.max_target - 1]
        target = target + [self.eos_id]
        if self.is_seq2seq:
            return {"input_ids": prompt, "labels": target}
        return {"input_ids": prompt + target, "labels": [IGNORE_INDEX] * len(prompt) + target}

    def collate_train(self, features: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        """Right-padded batch (positions of real tokens stay 0..n-1 for causal models)."""
        input_ids = pad([f["input_ids"] for f in features], self.pad_id, left=False)
        batch = {
            "input_ids": input_ids,
            "attention_mask": pad([[1] * len(f["input_ids"]) for f in features], 0, left=False),
            "labels": pad([f["labels"] for f in features], IGNORE_INDEX, left=False),
        }
        return batch

    def collate_prompts(self, prompts: Sequence[list[int]]) -> dict[str, torch.Tensor]:
        """Left-padded prompts, so every row's next token is generated at the same column."""
        left = not self.is_seq2seq
        return {
            "input_ids": pad(prompts, self.pad_id, left=left),
            "attention_mask": pad([[1] * len(p) for p in prompts], 0, left=left),
        }


def pad(rows: Sequence[Sequence[int]], value: int, left: bool) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            if left:
                out[i, width - len(row) :] = torch.tensor(row)
            else:
                out[i, : len(row)] = torch.tensor(row)
    return out


class LengthGroupedBatchSampler:
    """Shuffled batches of examples of similar length, so few tokens are padding.

    Each epoch: a seeded permutation, cut into mega-chunks of ``chunk_batches`` batches; each
    chunk is sorted by length and cut into batches; then the order of all batches is
    shuffled. Batches stay random in content across chunks and in order, yet each holds
    neighbours in length. Epoch e uses seed + e, so a run is reproducible from its seed.
    """

    def __init__(
        self, lengths: Sequence[int], batch_size: int, seed: int, chunk_batches: int = 50
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.chunk = batch_size * chunk_batches
        self.drop_last = False  # read by Accelerate when it shards batches over processes
        self.epoch = 0

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def batches(self, epoch: int) -> list[list[int]]:
        gen = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.lengths), generator=gen).tolist()
        batches = []
        for start in range(0, len(order), self.chunk):
            chunk = sorted(order[start : start + self.chunk], key=lambda i: -self.lengths[i])
            step = self.batch_size
            batches += [chunk[i : i + step] for i in range(0, len(chunk), step)]
        return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]

    def __iter__(self):
        batches = self.batches(self.epoch)
        self.epoch += 1  # the next pass over the data gets another shuffle
        yield from batches
