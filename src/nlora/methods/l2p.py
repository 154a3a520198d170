"""L2P, Learning to Prompt (Wang et al., 2022; paper Section 4.1): a pool of M learnable
prompts, each with a learnable key; every input picks the N prompts whose keys best match
(cosine) a query feature of the input from the frozen model, and reads them before its
own tokens. No task identity at test time: the same selection answers every task.

loss = task loss + λ · mean over the batch of Σ_{chosen i} (1 − cos(q(x), k_i)),
the term that pulls the chosen keys towards the queries (it alone trains the keys).

Query q(x): L2P takes the frozen ViT's [CLS] feature. nlora takes the frozen backbone's last
hidden states mean-pooled over the input's tokens: the T5 encoder's output for seq2seq
models, the last decoder layer's (after its final norm) for causal models. The backbone
never trains, so q(x) is the pretrained model's feature as in L2P; dropout is off for it.

The pool is a PEFT ``PromptEmbedding`` of M·L_p tokens (random-vocabulary init, so prompts
start on the embedding manifold; L2P draws them uniformly), the keys a (M, dim) tensor drawn
uniformly from [-1, 1] (the L2P PyTorch port's init; cosine matching ignores their scale).
The whole pool is saved after each task as ``l2p_pool.safetensors`` (prompts, keys); resume
loads the latest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from nlora.data import Task
from nlora.errors import ConfigError
from nlora.io import write_file_atomic
from nlora.methods.base import ContinualMethod, register
from nlora.methods.prompting import PromptedModel, new_prompt
from nlora.options import option

POOL = "l2p_pool.safetensors"


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` (batch, seq, dim) over the positions where ``mask`` is 1."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)


class PromptPool(PromptedModel):
    def __init__(
        self, backbone: PreTrainedModel, is_seq2seq: bool, size: int, length: int, top_k: int
    ) -> None:
        super().__init__(backbone, is_seq2seq)
        self.size, self.length, self.top_k = size, length, top_k
        self.pool = new_prompt(backbone, size * length, is_seq2seq)
        dim = self.pool.embedding.weight.shape[1]
        device = self.pool.embedding.weight.device
        self.keys = torch.nn.Parameter(torch.empty(size, dim, device=device).uniform_(-1, 1))
        self.selected: torch.Tensor | None = None  # (batch, N) prompt indices of the last call
        self.pull: torch.Tensor | None = None  # the last call's key-query term

    @torch.no_grad()
    def query(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """q(x): the frozen backbone's last hidden states, mean over the input's tokens."""
        was_training = self.backbone.training
        self.backbone.eval()  # a query, not a training pass: no dropout
        if self.is_seq2seq:
            out = self.backbone.get_encoder()(input_ids=input_ids, attention_mask=attention_mask)
            hidden = out.last_hidden_state
        else:
            out = self.backbone.base_model(
                input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                use_cache=False,
            )
            hidden = getattr(out, "last_hidden_state", None)
            if hidden is None:
                hidden = out.hidden_states[-1]
        self.backbone.train(was_training)
        return mean_pool(hidden, attention_mask)

    def match(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cosine similarity (batch, M) of queries to keys, and the top-N indices, best first."""
        similarity = F.normalize(query, dim=-1) @ F.normalize(self.keys, dim=-1).T
        return similarity, similarity.topk(self.top_k, dim=1).indices

    def prompt_embeddings(self, input_ids, attention_mask) -> torch.Tensor:
        similarity, chosen = self.match(self.query(input_ids, attention_mask))
        self.selected = chosen
        self.pull = (1 - similarity.gather(1, chosen)).sum(1).mean()
        prompts = self.pool.embedding.weight.view(self.size, self.length, -1)
        return prompts[chosen].flatten(1, 2)  # (batch, N · L_p, dim), best match first


GROUP = "L2P options (Wang et al., 2022)"


@dataclass
class L2POptions:
    l2p_pool_size: int = option(10, "L2P prompt pool size M", "int", GROUP, low=1, high=4096)
    l2p_prompt_length: int = option(5, "L2P length of each pool prompt", "int", GROUP, low=1,
                                    high=4096)
    l2p_top_k: int = option(5, "L2P prompts chosen per input by key match", "int", GROUP,
                            low=1, high=4096)
    l2p_key_weight: float = option(1.0, "L2P weight of the key-query pull term (released "
                                   "config)", "float", GROUP, low=0)

@register
class L2P(ContinualMethod):
    name = "l2p"
    title = "L2P"
    summary = "a pool of soft prompts chosen per input by key match (Learning to Prompt)"
    options = L2POptions
    defaults = {"learning_rate": 0.03}  # L2P released config (Adam)

    @classmethod
    def check_options(cls, config) -> None:
        if config.l2p_top_k > config.l2p_pool_size:
            raise ConfigError(f"--l2p-top-k ({config.l2p_top_k}) cannot exceed --l2p-pool-size "
                              f"({config.l2p_pool_size})")

    def _wrap(self, model) -> PromptPool:
        if isinstance(model, PromptPool):
            return model
        c = self.config
        return PromptPool(model, self.is_seq2seq, c.l2p_pool_size, c.l2p_prompt_length,
                          c.l2p_top_k)

    def begin_task(self, model, index: int, task: Task) -> torch.nn.Module:
        model = self._wrap(model)
        model.pool.requires_grad_(True)
        model.keys.requires_grad_(True)
        return model

    def penalty(self, model, index, batch, outputs) -> torch.Tensor | None:
        if not self.config.l2p_key_weight or model.pull is None:
            return None
        return self.config.l2p_key_weight * model.pull

    def end_task(self, model, index: int, task: Task, folder: Path) -> PreTrainedModel:
        model.requires_grad_(False)
        model.pull = None
        if self.is_main_process:
            state = {"prompts": model.pool.embedding.weight.detach().contiguous(),
                     "keys": model.keys.detach().contiguous()}
            write_file_atomic(folder / POOL, lambda tmp: save_file(state, tmp))
        return model

    def restore_task(self, model, index: int, task: Task, folder: Path) -> PreTrainedModel:
        model = self._wrap(model)
        state = load_file(folder / POOL)  # every task saves the whole pool: the last one wins
        device = model.keys.device
        with torch.no_grad():
            model.pool.embedding.weight.copy_(state["prompts"].to(device))
            model.keys.copy_(state["keys"].to(device))
        return model.requires_grad_(False)
