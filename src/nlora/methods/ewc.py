"""EWC (Kirkpatrick et al., 2017; paper Section 4.1): SeqFT plus a quadratic penalty that
keeps the weights important to earlier tasks near their values.

penalty = (λ / 2) · Σ_params F · (θ - θ*)², where θ* are the weights after the previous task
and F is the diagonal Fisher, summed over the earlier tasks (one anchor and one Fisher in
memory, whatever the number of tasks). Each task's F is the mean over its training batches
of the squared gradient of the batch loss (dropout off), estimated at the end of the task.
F is saved as ``ewc_fisher.safetensors`` beside the weights (latest task only); on resume
the anchor is the restored weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from transformers import PreTrainedModel

from nlora.data import Task
from nlora.io import write_file_atomic
from nlora.methods.base import register
from nlora.methods.seqft import WEIGHTS, SeqFT
from nlora.options import option

FISHER = "ewc_fisher.safetensors"


def estimate_fisher(model: torch.nn.Module, batches) -> dict[str, torch.Tensor]:
    """Diagonal Fisher: mean over ``batches`` of the squared gradient of the loss."""
    params = dict(model.named_parameters())
    fisher = {name: torch.zeros_like(p) for name, p in params.items()}
    was_training = model.training
    # train mode keeps gradient checkpointing on (it only acts in training); dropout off
    model.train()
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    for m in dropouts:
        m.eval()
    count = 0
    device = next(model.parameters()).device
    with torch.enable_grad():
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            grads = torch.autograd.grad(
                model(**batch).loss, list(params.values()), allow_unused=True
            )
            for name, grad in zip(params, grads, strict=True):
                if grad is not None:
                    fisher[name] += grad.detach() ** 2
            count += 1
    model.train(was_training)
    return {name: f / max(count, 1) for name, f in fisher.items()}


def ewc_penalty(
    model: torch.nn.Module, fisher: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Σ F · (θ - θ*)² over the parameters that have a Fisher (without the λ/2)."""
    terms = [
        (fisher[name] * (param - anchor[name]) ** 2).sum()
        for name, param in model.named_parameters()
        if name in fisher
    ]
    return torch.stack(terms).sum()


@dataclass
class EWCOptions:
    ewc_lambda: float = option(5000.0, "EWC penalty weight (our choice; the paper gives none)",
                               "float", "EWC options", low=0)

@register
class EWC(SeqFT):
    name = "ewc"
    title = "EWC"
    summary = "full fine-tuning with a Fisher-weighted pull towards the earlier tasks' weights"
    options = EWCOptions
    latest_only = (WEIGHTS, FISHER)

    def __init__(self, config, is_seq2seq: bool) -> None:
        super().__init__(config, is_seq2seq)
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}

    def penalty(self, model, index, batch, outputs) -> torch.Tensor | None:
        if not self.fisher or self.config.ewc_lambda == 0:
            return None  # first task: nothing to protect yet
        return self.config.ewc_lambda / 2 * ewc_penalty(model, self.fisher, self.anchor)

    def end_task(self, model, index: int, task: Task, folder: Path) -> PreTrainedModel:
        model.requires_grad_(True)  # still checkpointing: the estimate stays small too
        batches = DataLoader(
            [self.encoder.train_features(ex) for ex in task.train],
            batch_size=self.config.batch_size,
            collate_fn=self.encoder.collate_train,
        )
        for name, f in estimate_fisher(model, batches).items():
            self.fisher[name] = self.fisher[name] + f if name in self.fisher else f
        self._set_anchor(model)
        if self.is_main_process:
            fisher = {k: v.contiguous() for k, v in self.fisher.items()}
            write_file_atomic(folder / FISHER, lambda tmp: save_file(fisher, tmp))
        return super().end_task(model, index, task, folder)

    def restore_task(self, model, index: int, task: Task, folder: Path) -> PreTrainedModel:
        model = super().restore_task(model, index, task, folder)
        if (folder / FISHER).is_file():  # the latest task's file holds the summed Fisher
            device = next(model.parameters()).device
            self.fisher = {k: v.to(device) for k, v in load_file(folder / FISHER).items()}
        self._set_anchor(model)
        return model

    def _set_anchor(self, model: torch.nn.Module) -> None:
        self.anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
