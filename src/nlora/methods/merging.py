"""Merging baselines: one LoRA adapter per task trained from the base model (as PerTaskFT),
and after task t every task is answered by the merge of adapters 1..t, made by PEFT's
``add_weighted_adapter`` with every adapter weighted ``--merge-weight``:

* ``task_arithmetic`` (Ilharco et al., ICLR 2023): ΔW = λ·Σ_i ΔW_i exactly (PEFT's ``cat``:
  the factors concatenated, so no product of sums is formed);
* ``ties`` (Yadav et al., NeurIPS 2023), ``dare_linear`` / ``dare_ties`` (Yu et al., ICML
  2024): PEFT's implementations, which for LoRA trim, drop and elect signs on the A and on the
  B factors separately (not on ΔW), keeping ``--merge-density`` of the entries. DARE's random
  drop is seeded per task (seed, task), so a resumed run merges the same way.

Each task's own adapter is saved in ``adapter/taskN`` (PEFT format, trained from the base:
plain ``PeftModel`` reads it, and ``add_weighted_adapter`` with the same arguments rebuilds
the merge). Resume reloads the adapters and merges again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from transformers import PreTrainedModel

from nlora.data import Task
from nlora.methods.base import register
from nlora.methods.pertaskft import PerTaskFT, adapter_name
from nlora.options import option

MERGED = "merged"
# nlora's name -> PEFT's combination_type
COMBINATIONS = {"task_arithmetic": "cat", "ties": "ties", "dare_linear": "dare_linear",
                "dare_ties": "dare_ties"}
GROUP = "Merging baselines (merge)"


@dataclass
class MergeOptions:
    merge_combination: str = option("task_arithmetic", "merge: how the per-task adapters are "
                                    "combined (through PEFT's add_weighted_adapter)", "str",
                                    GROUP, choices=tuple(COMBINATIONS))
    merge_weight: float = option(1.0, "merge: weight λ of every task's adapter (1: the plain "
                                 "sum of the updates)", "float", GROUP, low=0, low_open=True)
    merge_density: float = option(0.2, "merge: share of entries ties/dare keep (PEFT's "
                                  "density; its docs' example value)", "float", GROUP, low=0,
                                  low_open=True, high=1)


def merge_adapters(model: PeftModel, count: int, config, seed: int) -> None:
    """Add adapter ``merged``, PEFT's merge of task0..task{count-1}, and make it answer."""
    kind = COMBINATIONS[config.merge_combination]
    extra = {} if kind == "cat" else {"density": config.merge_density}
    with torch.random.fork_rng(devices=[]):  # DARE draws: seeded, the caller's RNG untouched
        torch.manual_seed(seed)
        model.add_weighted_adapter([adapter_name(i) for i in range(count)],
                                   [config.merge_weight] * count, MERGED,
                                   combination_type=kind, **extra)
    model.set_adapter(MERGED)


@register
class Merge(PerTaskFT):
    name = "merge"
    title = "Merging"
    summary = ("a LoRA adapter per task from the base model; after each task all of them merged "
               "by task arithmetic, TIES or DARE (PEFT)")
    options = MergeOptions
    per_task_model = False  # one merged model answers every task

    def begin_task(self, model: PreTrainedModel, index: int, task: Task) -> torch.nn.Module:
        if isinstance(model, PeftModel) and MERGED in model.peft_config:
            model.delete_adapter(MERGED)
        return super().begin_task(model, index, task)

    def _merge(self, model: PeftModel, index: int) -> PeftModel:
        merge_adapters(model, index + 1, self.config, self.config.seed * 1000 + index)
        return model

    def end_task(self, model, index: int, task: Task, folder: Path) -> PreTrainedModel:
        return self._merge(super().end_task(model, index, task, folder), index)

    def restore_task(self, model, index: int, task: Task, folder: Path) -> PreTrainedModel:
        model = super().restore_task(model, index, task, folder)
        if MERGED in model.peft_config:
            model.delete_adapter(MERGED)
        return self._merge(model, index)

    def eval_model(self, model: PreTrainedModel, task_index: int) -> PreTrainedModel:
        return model  # the merge answers every task
