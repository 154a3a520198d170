"""Answers on a task's test split: greedy decoding (scored by ``nlora.scoring``).

Generation stops after the task's answer length (``Task.max_new_tokens``, set by its family:
50 tokens for SuperNI) or, for classification, after the longest label's token count plus one
(room for EOS): no correct answer is longer, so longer decoding only costs time. Each row
stops at its own EOS (the batch ends when every row has). Prompts are sorted by
length so batches carry little padding; predictions come back in the original order.
``generate`` keeps the prompt's key/value cache between steps (``use_cache`` is on by
default) and, for causal models, projects only the last position onto the vocabulary.

``rank`` mode instead scores every label (+ EOS) by its log-likelihood given the prompt and
predicts the most likely one: one pass over the prompt, whose cache all labels then reuse.

For causal models the prompt prefix that all of a task's prompts share (header, instruction,
options) runs once; every batch starts from a copy of its key/value cache and runs only the
rows' own tokens (``nlora.prefix``; ``prefix_cache=False`` turns it off).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel
from transformers.cache_utils import Cache

from nlora.batching import Encoder
from nlora.data import Example
from nlora.kvcache import returned_cache, unwrap, with_cache
from nlora.prefix import PrefixCache, build_prefix_cache


@dataclass
class Prediction:
    """One test row's generated text (raw, stripped) and its label; ``nlora.scoring`` judges it
    (the run's ``--scorer``)."""

    index: int
    prediction: str
    label: str


def plan_prompt_batches(
    prompts: list[list[int]], batch_size: int, prefix: PrefixCache | None = None
) -> list[tuple[list[int], bool]]:
    """Row indices of each batch, longest first, and whether the batch uses the prefix.

    Prompts the prefix covers are batched together; the others (e.g. truncated ones that
    lost their beginning) form their own batches on the plain path.
    """
    covered = [prefix is not None and prefix.covers(p) for p in prompts]
    plan = []
    for cached in (True, False):
        group = [i for i in range(len(prompts)) if covered[i] == cached]
        order = sorted(group, key=lambda i: len(prompts[i]), reverse=True)
        plan += [(order[s : s + batch_size], cached) for s in range(0, len(order), batch_size)]
    return plan


def _prompt_batches(
    model: PreTrainedModel,
    encoder: Encoder,
    examples: list[Example],
    batch_size: int,
    desc: str,
    prefix_cache: bool = True,
) -> Iterator[tuple[list[int], dict[str, torch.Tensor], Cache | None]]:
    """Left-padded prompt batches, longest first (little padding), with their row indices.

    Where the task's shared prefix is cached, a batch is ``[prefix | padding | own tokens]``
    and comes with a fresh copy of the prefix cache (else None).
    """
    prompts = [encoder.example_ids(ex) for ex in examples]
    prefix = build_prefix_cache(model, prompts, encoder.max_source_length) if prefix_cache else None
    device = next(model.parameters()).device
    plan = plan_prompt_batches(prompts, batch_size, prefix)
    for chunk, cached in tqdm(plan, desc=desc, leave=False, unit="batch"):
        if cached:
            assert prefix is not None
            skip = len(prefix)
            batch = prefix.prepend(encoder.collate_prompts([prompts[i][skip:] for i in chunk]))
            cache = prefix.for_rows(len(chunk))
        else:
            batch, cache = encoder.collate_prompts([prompts[i] for i in chunk]), None
        yield chunk, {k: v.to(device) for k, v in batch.items()}, cache


@torch.no_grad()
def generate_answers(
    model: PreTrainedModel,
    encoder: Encoder,
    examples: list[Example],
    labels: list[str],
    batch_size: int = 32,
    desc: str = "eval",
    prefix_cache: bool = True,
    max_new_tokens: int | None = None,
) -> list[Prediction]:
    """Greedy answers, at most ``max_new_tokens`` tokens (None: longest label + 1)."""
    was_training = model.training
    model.eval()
    if max_new_tokens is None:
        max_new_tokens = max(len(encoder.label_ids(label)) for label in labels) + 1
    texts: dict[int, str] = {}
    for chunk, batch, cache in _prompt_batches(
        model, encoder, examples, batch_size, desc, prefix_cache
    ):
        extra = with_cache(model, cache)
        out = model.generate(
            **batch,
            **extra,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=encoder.pad_id,
            eos_token_id=encoder.eos_id,
        )
        if not encoder.is_seq2seq:  # causal output repeats the prompt first
            out = out[:, batch["input_ids"].shape[1] :]
        decoded = encoder.tokenizer.batch_decode(out, skip_special_tokens=True)
        texts.update(zip(chunk, decoded, strict=True))
    model.train(was_training)
    return [Prediction(i, texts[i].strip(), ex.label) for i, ex in enumerate(examples)]


EVAL_MODES = ("generate", "rank")


def predict(
    model: PreTrainedModel,
    encoder: Encoder,
    examples: list[Example],
    labels: list[str],
    batch_size: int = 64,
    mode: str = "generate",
    desc: str = "eval",
    prefix_cache: bool = True,
    max_new_tokens: int | None = None,
) -> list[Prediction]:
    """Predictions by greedy generation (``generate``) or by label likelihood (``rank``).

    ``prefix_cache``: run the prompts' shared prefix once (causal models; same predictions).
    ``max_new_tokens``: the answer length of generation (None: longest label + 1).
    """
    if mode == "generate":
        return generate_answers(model, encoder, examples, labels, batch_size, desc, prefix_cache,
                                max_new_tokens)
    if mode == "rank":
        return rank_answers(model, encoder, examples, labels, batch_size, desc, prefix_cache)
    raise ValueError(f"eval mode must be one of {EVAL_MODES}, got {mode!r}")


@torch.no_grad()
def rank_answers(
    model: PreTrainedModel,
    encoder: Encoder,
    examples: list[Example],
    labels: list[str],
    batch_size: int = 64,
    desc: str = "rank",
    prefix_cache: bool = True,
) -> list[Prediction]:
    """The label with the highest total log-likelihood of its tokens + EOS, per prompt."""
    was_training = model.training
    model.eval()
    targets = [encoder.label_ids(label) + [encoder.eos_id] for label in labels]
    score = _seq2seq_scores if encoder.is_seq2seq else _causal_scores
    best: dict[int, int] = {}
    for chunk, batch, cache in _prompt_batches(
        model, encoder, examples, batch_size, desc, prefix_cache
    ):
        scores = score(model, batch, targets, cache)  # (rows, labels)
        best.update(zip(chunk, scores.argmax(dim=1).tolist(), strict=True))
    model.train(was_training)
    return [Prediction(i, labels[best[i]], ex.label) for i, ex in enumerate(examples)]


def _accepts(model: torch.nn.Module, name: str) -> bool:
    return name in inspect.signature(unwrap(model).forward).parameters


def _causal_scores(
    model: PreTrainedModel,
    batch: dict[str, torch.Tensor],
    targets: list[list[int]],
    cache: Cache | None = None,
) -> torch.Tensor:
    mask = batch["attention_mask"]  # left-padded: every prompt ends at the last column
    rows = mask.shape[0]
    extra = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    # With a prefix cache its columns are computed already: run only the columns after it.
    done = 0 if cache is None else cache.get_seq_length()
    out = model(
        input_ids=batch["input_ids"][:, done:], attention_mask=mask,
        position_ids=(mask.cumsum(-1) - 1).clamp(min=0)[:, done:], use_cache=True,
        **with_cache(model, cache), **extra,
    )
    cache, first = returned_cache(out), F.log_softmax(out.logits[:, -1].float(), dim=-1)
    lengths = mask.sum(-1, keepdim=True)
    scores = torch.empty(rows, len(targets), device=mask.device)
    for k, target in enumerate(targets):
        ids = torch.tensor(target, device=mask.device)
        total = first[:, ids[0]].clone()
        if len(target) > 1:
            # Feed the label's tokens after every prompt (the same label for all rows, so no
            # padding), continuing from the cached prompt; then drop them from the cache.
            steps = len(target) - 1
            follow = model(
                input_ids=ids[:-1].expand(rows, steps),
                attention_mask=torch.cat([mask, mask.new_ones(rows, steps)], dim=1),
                position_ids=lengths + torch.arange(steps, device=mask.device),
                **with_cache(model, cache), use_cache=True,
            )
            logp = F.log_softmax(follow.logits.float(), dim=-1)
            total += logp.gather(-1, ids[1:].expand(rows, steps).unsqueeze(-1)).sum((1, 2))
            cache.crop(-steps)  # negative: remove that many tokens (all transformers versions)
        scores[:, k] = total
    return scores


def _seq2seq_scores(
    model: PreTrainedModel,
    batch: dict[str, torch.Tensor],
    targets: list[list[int]],
    cache: Cache | None = None,  # always None: no prefix cache for a bidirectional encoder
) -> torch.Tensor:
    encoder_outputs = model.get_encoder()(**batch)  # the prompt is read once for all labels
    rows = batch["input_ids"].shape[0]
    start = model.config.decoder_start_token_id
    scores = torch.empty(rows, len(targets), device=batch["input_ids"].device)
    for k, target in enumerate(targets):
        ids = torch.tensor(target, device=scores.device)
        decoder_input = torch.cat([ids.new_tensor([start]), ids[:-1]]).expand(rows, -1)
        out = model(
            encoder_outputs=encoder_outputs, attention_mask=batch["attention_mask"],
            decoder_input_ids=decoder_input, use_cache=False,
        )
        logp = F.log_softmax(out.logits.float(), dim=-1)
        scores[:, k] = logp.gather(-1, ids.expand(rows, -1).unsqueeze(-1)).sum((1, 2))
    return scores
