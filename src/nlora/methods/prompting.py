"""Glue shared by the prompt-based methods (l2p, lfpt5, progprompt): a frozen backbone that
reads soft prompt embeddings put before its input.

The prompt parameters are PEFT's own ``PromptEmbedding`` (with PEFT's initialisations);
what PEFT's ``PeftModel`` cannot do for these methods is choose the prompt per input (L2P)
or per evaluated task (ProgPrompt), so the concatenation lives here. ``PromptedModel``
speaks the backbone's interface, so training and both evaluation modes run unchanged:

* ``forward``: the prompts go before the input embeddings (the encoder's input for seq2seq
  models), the attention mask gets ones for them and causal labels get -100 for them. A
  causal training call (labels, nothing else) projects onto the vocabulary only at the answer
  positions and returns ``nlora.loss.AnswerOutputs``, as the LoRA methods' training does.
  Position ids given by the caller are recomputed from the extended mask, and a causal
  call that continues from a cache (rank evaluation) only shifts its positions.
* ``generate``: returns what the backbone's ``generate`` returns for ``input_ids`` (causal
  outputs start with the prompt's ids), so evaluation slices it as usual.
* ``get_encoder``: an encoder that reads the prompted input (seq2seq rank evaluation).

A prompt saved as a PEFT prompt-tuning adapter (``save_prompt_adapter``) loads with plain
``PeftModel.from_pretrained(base, folder)``, which prepends it the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import PromptTuningConfig, TaskType
from peft.tuners.prompt_tuning import PromptEmbedding
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput

from nlora.batching import IGNORE_INDEX
from nlora.io import write_dir_atomic
from nlora.kvcache import with_cache
from nlora.loss import answer_head_forward, supports_answer_head

PROMPT_FILE = "adapter_model.safetensors"
PROMPT_KEY = "prompt_embeddings"  # PEFT's key for a prompt-tuning adapter's weights


def new_prompt(backbone: PreTrainedModel, length: int, is_seq2seq: bool) -> PromptEmbedding:
    """PEFT prompt embedding of ``length`` tokens, initialised from random vocabulary tokens
    (PEFT's SAMPLE_VOCAB: the prompt starts on the embedding manifold, as ProgPrompt does)."""
    embeddings = backbone.get_input_embeddings()
    config = prompt_config(backbone, length, is_seq2seq, init="SAMPLE_VOCAB")
    prompt = PromptEmbedding(config, embeddings)
    return prompt.to(embeddings.weight.device)


def prompt_config(
    backbone: PreTrainedModel, length: int, is_seq2seq: bool, init: str = "RANDOM"
) -> PromptTuningConfig:
    """One prompt read by the encoder (seq2seq) or the decoder input (causal), as PEFT has it."""
    config = backbone.config
    heads = getattr(config, "num_attention_heads", getattr(config, "num_heads", None))
    return PromptTuningConfig(
        task_type=TaskType.SEQ_2_SEQ_LM if is_seq2seq else TaskType.CAUSAL_LM,
        num_virtual_tokens=length,
        token_dim=backbone.get_input_embeddings().weight.shape[1],
        num_transformer_submodules=1,  # the encoder only, for seq2seq models
        num_layers=getattr(config, "num_hidden_layers", getattr(config, "num_layers", None)),
        num_attention_heads=heads,
        prompt_tuning_init=init,
    )


def prompt_weight(prompt: PromptEmbedding) -> torch.Tensor:
    """The (length, dim) embeddings of a PEFT prompt, through its own forward."""
    indices = torch.arange(prompt.embedding.num_embeddings, device=prompt.embedding.weight.device)
    return prompt(indices)


def save_prompt_adapter(
    folder: Path, weight: torch.Tensor, backbone: PreTrainedModel, is_seq2seq: bool, base: str
) -> None:
    """Write ``weight`` (length, dim) as a PEFT prompt-tuning adapter folder."""
    config = prompt_config(backbone, weight.shape[0], is_seq2seq)
    config.base_model_name_or_path = base
    tensor = weight.detach().to("cpu", torch.float32).contiguous()

    def fill(tmp: Path) -> None:
        config.save_pretrained(tmp)
        save_file({PROMPT_KEY: tensor}, str(tmp / PROMPT_FILE))

    write_dir_atomic(folder, fill)


def load_prompt_adapter(folder: Path) -> torch.Tensor:
    return load_file(folder / PROMPT_FILE)[PROMPT_KEY]


class _PromptedEncoder(torch.nn.Module):
    def __init__(self, owner: PromptedModel) -> None:
        super().__init__()
        self.owner = [owner]  # a list: not registered as a submodule (no cycle)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any):
        owner = self.owner[0]
        embeds, mask = owner.prompted_inputs(input_ids, attention_mask)
        out = owner.backbone.get_encoder()(inputs_embeds=embeds, attention_mask=mask, **kwargs)
        return BaseModelOutput(last_hidden_state=out.last_hidden_state)


class PromptedModel(torch.nn.Module):
    """A frozen backbone with soft prompts before its input; subclasses say which prompts."""

    def __init__(self, backbone: PreTrainedModel, is_seq2seq: bool) -> None:
        super().__init__()
        self.backbone = backbone.requires_grad_(False)
        self.is_seq2seq = is_seq2seq
        self.head_at_answers = not is_seq2seq and supports_answer_head(backbone)

    def prompt_embeddings(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """(batch, n, dim) prompt embeddings for these inputs."""
        raise NotImplementedError

    @property
    def config(self):
        return self.backbone.config

    @property
    def generation_config(self):
        return self.backbone.generation_config

    def prompted_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Input embeddings with the prompts first, and the attention mask to match."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = self.backbone.get_input_embeddings()(input_ids)
        prompts = self.prompt_embeddings(input_ids, attention_mask).to(embeds.dtype)
        ones = attention_mask.new_ones(input_ids.shape[0], prompts.shape[1])
        return torch.cat([prompts, embeds], dim=1), torch.cat([ones, attention_mask], dim=1)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Any = None,
        encoder_outputs: Any = None,
        **kwargs: Any,
    ):
        kv = with_cache(self.backbone, cache)  # under the backbone's own name for it
        if encoder_outputs is not None:  # seq2seq: get_encoder() already read the prompts
            if attention_mask is not None:
                extra = encoder_outputs.last_hidden_state.shape[1] - attention_mask.shape[1]
                attention_mask = torch.cat(
                    [attention_mask.new_ones(attention_mask.shape[0], extra), attention_mask], 1
                )
            return self.backbone(
                encoder_outputs=encoder_outputs, attention_mask=attention_mask, labels=labels,
                **kv, **kwargs,
            )
        cached = 0 if cache is None else cache.get_seq_length()
        if cached:  # causal continuation: the cache already holds the prompts and the input
            extra = cached + input_ids.shape[1] - attention_mask.shape[1]
            attention_mask = torch.cat(
                [attention_mask.new_ones(attention_mask.shape[0], extra), attention_mask], 1
            )
            if position_ids is not None:
                position_ids = position_ids + extra
            return self.backbone(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                **kv, labels=labels, **kwargs,
            )
        embeds, mask = self.prompted_inputs(input_ids, attention_mask)
        n = embeds.shape[1] - input_ids.shape[1]
        if self.is_seq2seq:
            return self.backbone(
                inputs_embeds=embeds, attention_mask=mask, labels=labels, **kv, **kwargs
            )
        if labels is not None:
            labels = torch.cat([labels.new_full((labels.shape[0], n), IGNORE_INDEX), labels], 1)
            if self.head_at_answers and position_ids is None and not kwargs:
                # training: the vocabulary projection only where the loss is (nlora.loss)
                return answer_head_forward(
                    self.backbone, {"inputs_embeds": embeds, "attention_mask": mask,
                                    "labels": labels}
                )
        if position_ids is not None:  # positions count real tokens (left padding, rank mode)
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        return self.backbone(
            inputs_embeds=embeds, attention_mask=mask, labels=labels,
            position_ids=position_ids, **kv, **kwargs,
        )

    @torch.no_grad()
    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> torch.Tensor:
        embeds, mask = self.prompted_inputs(input_ids, attention_mask)
        out = self.backbone.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
        if self.is_seq2seq:
            return out
        # from embeddings alone a causal model returns only the new tokens; put the prompt's
        # ids first, as generate(input_ids=...) does
        return torch.cat([input_ids, out], dim=1)

    def get_encoder(self) -> torch.nn.Module:
        return _PromptedEncoder(self)
