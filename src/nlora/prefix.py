"""A task's shared prompt prefix, computed once: its key/value cache serves every row.

Every prompt of a task begins with the same tokens (header, instruction, option list: 36-68
SmolLM2 tokens, a fifth to a half of a prompt). In a causal model the states at those
positions depend on those tokens alone, so one batch-1 pass computes them and each batch
starts from a copy of that cache; the rows then run only their own tokens.

The prefix is found on token ids (longest common prefix of the encoded prompts), never by
splitting strings: BPE may merge across the instruction/text boundary, and truncation may
cut a prompt's start. Prompts that do not begin with the prefix take the plain path.

Batch layout with a prefix: ``[prefix | left padding | own tokens]``; the attention mask is 0
on the padding and positions are counted from the mask (prefix 0..L-1, then L, L+1, ... on
each row's own tokens). Every real token thus sees the same keys at the same positions as in
the plain ``[padding | prompt]`` layout, and ``generate`` derives those positions itself.

Not for seq2seq models (their encoder is bidirectional: each prefix state depends on the
whole prompt), for PEFT prompt learning or any other wrapper (soft prompts come first,
possibly chosen from the whole input), or for caches other
than plain ``DynamicLayer`` ones (a sliding window counts cache columns, which the padding
between prefix and own tokens would shift): those keep the plain path.
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from peft import PeftModel
from transformers import PreTrainedModel
from transformers.cache_utils import DynamicCache, DynamicLayer

from nlora.kvcache import cache_argument, returned_cache, unwrap

log = logging.getLogger("nlora")

# Below this many shared tokens the extra pass and the cache copies are not worth it.
MIN_PREFIX_TOKENS = 8


def common_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix, shorter than every prompt (each keeps a token).

    The last prompt token must stay with the row: its logits give the first prediction.
    """
    if not prompts:
        return 0
    limit = min(len(p) for p in prompts) - 1
    first = prompts[0]
    length = 0
    while length < limit and all(p[length] == first[length] for p in prompts):
        length += 1
    return max(length, 0)


def shared_prefix(prompts: Sequence[Sequence[int]], max_length: int | None = None) -> list[int]:
    """The prefix shared by the prompts, ignoring any cut to ``max_length`` tokens.

    A truncated prompt may have lost its beginning; it must not shorten everyone's prefix
    (it then takes the plain path). If every prompt is truncated, all of them count.
    """
    whole = [p for p in prompts if max_length is None or len(p) < max_length] or list(prompts)
    return list(whole[0][: common_prefix_length(whole)]) if whole else []


_said: set[tuple[str, str]] = set()


def _say_once(model: torch.nn.Module, why: str) -> None:
    """Log (once per model class and reason) that a model that should take the cache can't."""
    key = (type(model).__name__, why)
    if key not in _said:
        _said.add(key)
        log.warning("prefix cache off for %s: %s (same predictions, slower evaluation)", *key)


def supports_prefix_cache(model: torch.nn.Module) -> bool:
    """Whether a prefix cache gives this model exactly the plain path's states.

    Only a transformers causal LM, bare or inside a PEFT model that does not add virtual
    tokens: a wrapper that puts anything before the tokens (soft prompts, chosen per input
    or per task) would see a different input when its prefix runs alone; so would a model that
    sets ``reads_whole_prompts`` (gainlora's gates: the whole prompt's mean). Such a model whose
    forward takes no positions or no cache is named once in the log.
    """
    if isinstance(model, PeftModel) and model.active_peft_config.is_prompt_learning:
        return False
    inner = unwrap(model)
    if not isinstance(inner, PreTrainedModel) or inner.config.is_encoder_decoder:
        return False
    if getattr(inner, "reads_whole_prompts", False):  # e.g. gainlora: gates on the whole prompt
        _say_once(inner, "its adapters depend on each whole prompt")
        return False
    if "position_ids" not in inspect.signature(inner.forward).parameters:
        _say_once(inner, "its forward takes no position_ids")
        return False
    if cache_argument(inner) is None:
        _say_once(inner, "its forward takes no key/value cache (cache= or past_key_values=)")
        return False
    return True


@dataclass
class PrefixCache:
    """The key/value cache (batch 1) of ``ids``, the prompt prefix a task shares."""

    ids: list[int]
    cache: DynamicCache

    def __len__(self) -> int:
        return len(self.ids)

    def covers(self, prompt: Sequence[int]) -> bool:
        """True if the prompt starts with the prefix and has tokens of its own after it."""
        n = len(self.ids)
        return len(prompt) > n and list(prompt[:n]) == self.ids

    def for_rows(self, rows: int) -> DynamicCache:
        """A fresh copy of the cache for a batch of ``rows`` (generation appends to it)."""
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(rows)
        return cache

    def prepend(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``[prefix | batch]``: the prefix ids and mask ones before a left-padded batch."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        rows = ids.shape[0]
        prefix = torch.tensor(self.ids, dtype=ids.dtype, device=ids.device).expand(rows, -1)
        return {
            "input_ids": torch.cat([prefix, ids], dim=1),
            "attention_mask": torch.cat([mask.new_ones(rows, len(self.ids)), mask], dim=1),
        }


@torch.no_grad()
def build_prefix_cache(
    model: torch.nn.Module, prompts: Sequence[Sequence[int]], max_length: int | None = None
) -> PrefixCache | None:
    """The shared prefix's cache, or None where the plain path must (or might as well) run.

    None when the model does not support it, fewer than two prompts would share it, the
    prefix is shorter than ``MIN_PREFIX_TOKENS``, or the model's cache is not plain dynamic.
    """
    if len(prompts) < 2 or not supports_prefix_cache(model):
        return None
    ids = shared_prefix(prompts, max_length)
    if len(ids) < MIN_PREFIX_TOKENS:
        return None
    if sum(len(p) > len(ids) and list(p[: len(ids)]) == ids for p in prompts) < 2:
        return None
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(
        unwrap(model).forward).parameters else {}
    out = model(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
        position_ids=torch.arange(len(ids), device=device)[None], use_cache=True, **extra,
    )
    cache = returned_cache(out)
    if not isinstance(cache, DynamicCache) or any(
        type(layer) is not DynamicLayer for layer in cache.layers
    ):
        _say_once(unwrap(model), f"its cache is {type(cache).__name__} with layers of types "
                  f"{sorted({type(layer).__name__ for layer in getattr(cache, 'layers', [])})}, "
                  "not plain DynamicLayer ones")
        return None
    return PrefixCache(ids, cache)
