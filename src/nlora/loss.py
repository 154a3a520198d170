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

from nlora.batching import IGNORE_INDEX


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


def answer_head_forward(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> AnswerOutputs:
    """Causal-LM loss with the LM head applied only at the positions that predict labels."""
    parts = _causal_parts(model)
    if parts is None:
        raise TypeError(f"{type(model).__name__} is not a causal LM with an lm_head")
    decoder, head = parts
    config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
    hidden = decoder(  # token ids, or embeddings (prompt methods put soft prompts first)
        input_ids=batch.get("input_ids"), inputs_embeds=batch.get("inputs_embeds"),
        attention_mask=batch["attention_mask"], use_cache=False,
    ).last_hidden_state
    # Position t predicts token t+1 (the shift a plain forward does inside its loss).
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    logits = head(hidden[:, :-1][mask])
    cap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3 squash their logits
    if cap:
        logits = torch.tanh(logits / cap) * cap
    answer_labels = targets[mask]
    loss = F.cross_entropy(logits.float(), answer_labels, reduction="mean")
    return AnswerOutputs(loss, logits, mask, answer_labels)
