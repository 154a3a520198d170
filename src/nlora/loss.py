"""Training loss of causal models with the vocabulary projection only where the loss is.

A plain ``model(**batch)`` projects every position's hidden state onto the vocabulary
(49k columns for SmolLM2, 262k for Gemma), yet the loss only reads the answer positions
(label + EOS), a few tokens per row. Here the decoder runs over all positions, then the LM
head runs on the answer positions alone: same loss and gradients, far less work.

Seq2seq models, and models this module cannot take apart (no ``lm_head`` or inner decoder,
or wrapped for distributed training), keep the plain forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, DynamicLayer

from nlora.batching import IGNORE_INDEX
from nlora.kvcache import returned_cache, with_cache
from nlora.prefix import MIN_PREFIX_TOKENS


@dataclass
class AnswerOutputs:
    """What the head-at-answers forward returns (methods' ``penalty`` hook receives it).

    ``loss``: mean cross-entropy over answer tokens, as ``model(**batch).loss``.
    ``answer_logits``: (N, vocab) logits of the N answer positions, in row-major order.
    ``answer_mask``: (batch, seq-1) bool; True where position t predicts an answer token
    ``labels[:, t+1]``, i.e. ``answer_logits`` = full logits[:, :-1][answer_mask].
    ``answer_labels``: (N,) the target token of each answer position.
    """

    loss: torch.Tensor
    answer_logits: torch.Tensor
    answer_mask: torch.Tensor
    answer_labels: torch.Tensor


def _causal_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(inner decoder, lm_head) of a Hugging Face causal LM, through a PEFT wrapper."""
    inner = model
    if hasattr(inner, "get_base_model"):  # PeftModel: LoRA layers live inside, in place
        inner = inner.get_base_model()
    config = getattr(inner, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return None
    if getattr(config, "logit_scale", None) is not None:  # Cohere scales its logits: plain path
        return None
    head = getattr(inner, "lm_head", None)
    decoder = getattr(inner, "model", None)
    if not isinstance(head, torch.nn.Linear) or not isinstance(decoder, torch.nn.Module):
        return None
    return decoder, head


def supports_answer_head(model: torch.nn.Module) -> bool:
    return _causal_parts(model) is not None


def batch_prefix_length(batch: dict[str, torch.Tensor]) -> int:
    """Leading columns on which every row has the same prompt token.

    Each row keeps at least its last prompt token after them, so every position that
    predicts an answer token lies after the prefix.
    """
    ids, labels = batch["input_ids"], batch["labels"]
    answers = labels != IGNORE_INDEX
    if ids.shape[0] < 2 or not bool(answers.any(dim=1).all()):
        return 0
    limit = int(answers.int().argmax(dim=1).min()) - 1  # shortest prompt, minus one token
    if limit <= 0:
        return 0
    differs = (ids[:, :limit] != ids[:1, :limit]).any(dim=0)
    return int(differs.int().argmax()) if bool(differs.any()) else limit


def _hidden_after_shared_prefix(
    decoder: torch.nn.Module, batch: dict[str, torch.Tensor], prefix: int
) -> torch.Tensor | None:
    """Hidden states of the columns after a prefix all rows share, the prefix run once.

    The prefix runs for one row; its keys and values are expanded (views) to every row, so
    autograd sums each row's gradient into that one pass: the same gradients as running it
    per row. None where the decoder's cache is not a plain one (then run the plain path).
    """
    ids, mask = batch["input_ids"], batch["attention_mask"]
    rows, width = ids.shape
    positions = torch.arange(width, device=ids.device)[None]
    first = decoder(
        input_ids=ids[:1, :prefix], attention_mask=mask[:1, :prefix],
        position_ids=positions[:, :prefix], use_cache=True,
    )
    cache = returned_cache(first)
    if not isinstance(cache, DynamicCache) or any(
        type(layer) is not DynamicLayer for layer in cache.layers
    ):
        return None
    for layer in cache.layers:
        layer.keys = layer.keys.expand(rows, -1, -1, -1)
        layer.values = layer.values.expand(rows, -1, -1, -1)
    return decoder(
        input_ids=ids[:, prefix:], attention_mask=mask,
        position_ids=positions[:, prefix:].expand(rows, -1), **with_cache(decoder, cache),
        use_cache=True,
    ).last_hidden_state


def answer_head_forward(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], shared_prefix: bool = False
) -> AnswerOutputs:
    """Causal-LM loss with the LM head applied only at the positions that predict labels.

    ``shared_prefix``: run the prompt tokens that all rows share (at least
    ``MIN_PREFIX_TOKENS``) once for the batch instead of once per row; same loss and
    gradients without dropout. Not with gradient checkpointing (recomputation would replay
    the cache).
    """
    parts = _causal_parts(model)
    if parts is None:
        raise TypeError(f"{type(model).__name__} is not a causal LM with an lm_head")
    decoder, head = parts
    config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
    prefix = 0
    checkpointing = any(getattr(m, "gradient_checkpointing", False) for m in decoder.modules())
    if shared_prefix and not checkpointing and "inputs_embeds" not in batch:
        prefix = batch_prefix_length(batch)
    hidden = None
    if prefix >= MIN_PREFIX_TOKENS:
        hidden = _hidden_after_shared_prefix(decoder, batch, prefix)
    if hidden is None:
        prefix = 0
        hidden = decoder(  # token ids, or embeddings (prompt methods put soft prompts first)
            input_ids=batch.get("input_ids"), inputs_embeds=batch.get("inputs_embeds"),
            attention_mask=batch["attention_mask"], use_cache=False,
        ).last_hidden_state
    # Position t predicts token t+1 (the shift a plain forward does inside its loss); the
    # hidden states start at column ``prefix``, and no prefix column predicts an answer.
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    logits = head(hidden[:, :-1][mask[:, prefix:]])
    cap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3 squash their logits
    if cap:
        logits = torch.tanh(logits / cap) * cap
    answer_labels = targets[mask]
    # Half-precision logits are upcast for the loss (as transformers does); float64 ones stay
    # float64, where transformers' own loss would round them to float32.
    wide = logits if logits.dtype == torch.float64 else logits.float()
    loss = F.cross_entropy(wide, answer_labels, reduction="mean")
    return AnswerOutputs(loss, logits, mask, answer_labels)
