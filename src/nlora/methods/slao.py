"""SLAO, single-LoRA continual learning with orthogonal initialisation and continual merging
(Qiao and Mahdavi, "Merge before Forget", ICLR 2026, arXiv 2512.23017): one LoRA adapter
for every task, never merged into the base, with PEFT's A (r, in) and B (out, r):

* task 1 starts from PEFT's fresh adapter (Kaiming A, B = 0);
* task t > 1 starts from A_t⁰ = Qᵀ, Q R = QR(A_{t-1}ᵀ) (reduced: A_t⁰ has orthonormal rows
  spanning A_{t-1}'s row space) and B_t⁰ = B_{t-1}, the previous task's *fine-tuned* B
  (``--slao-b-init finetuned``, the paper as summarised; ``merged`` starts from the merged B);
* after task t (1-based) the adapter becomes the merge A ← A_t, B ← B + (B_t − B)/√t
  ("time-aware asymmetric merging": A replaced, B a running average with weight 1/√t;
  at t = 1 it is B_1 exactly). The model is evaluated with that merged adapter.

Each task's ``adapter/`` is the merged adapter (PEFT format: plain ``PeftModel`` on the base
model answers as nlora did); ``slao_state.safetensors`` keeps the fine-tuned B of the latest
finished task for the next task's start (only the latest task keeps it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from nlora.adapters import add_adapter, check_adapter, lora_factors, module_key, save_adapter
from nlora.data import Task
from nlora.io import write_file_atomic
from nlora.methods.base import ContinualMethod, register, remove_superseded
from nlora.options import option

STATE = "slao_state.safetensors"
SLAO_B_INITS = ("finetuned", "merged")
GROUP = "SLAO options"


@dataclass
class SLAOOptions:
    slao_b_init: str = option("finetuned", "SLAO: each task's B starts from the previous "
                              "task's fine-tuned B (finetuned, the paper) or from the merged B "
                              "(merged)", "str", GROUP, choices=SLAO_B_INITS)


def orthonormal_start(a: torch.Tensor) -> torch.Tensor:
    """Qᵀ with Q R = QR(aᵀ), reduced: r orthonormal rows spanning a's row space."""
    q, _ = torch.linalg.qr(a.T)
    return q.T.contiguous()


def merged_b(merged: torch.Tensor, finetuned: torch.Tensor, t: int) -> torch.Tensor:
    """B ← B + (B_t − B)/√t after task t (1-based)."""
    return merged + (finetuned - merged) / math.sqrt(t)


@register
class SLAO(ContinualMethod):
    name = "slao"
    title = "SLAO"
    summary = ("one LoRA for all tasks: each task starts from A orthonormalised (QR) and the last "
               "B; merged as A ← A_t, B ← B + (B_t − B)/√t")
    options = SLAOOptions
    cumulative_adapter = True  # each saved adapter is the merge of every task so far
    undefined_metrics = ("OO",)  # task t's own update is a difference of merges, as seqlora
    latest_only = (STATE,)

    def __init__(self, config, is_seq2seq: bool) -> None:
        super().__init__(config, is_seq2seq)
        self.finetuned_B: dict[str, torch.Tensor] = {}  # module -> last task's trained B
        self.merged: dict[str, torch.Tensor] = {}  # module -> merged B of tasks 1..t-1
        self.previous_folder: Path | None = None

    def check(self, model: PreTrainedModel) -> None:
        check_adapter(model, self.config, self.is_seq2seq)

    def begin_task(self, model: PreTrainedModel, index: int, task: Task) -> torch.nn.Module:
        if not isinstance(model, PeftModel):  # the first task: PEFT's fresh adapter
            return add_adapter(model, self.config, self.is_seq2seq)
        with torch.no_grad():  # the adapter holds the merge of tasks 1..t-1
            for f in lora_factors(model):
                f.A.copy_(orthonormal_start(f.A))
                if self.config.slao_b_init == "finetuned":
                    f.B.copy_(self.finetuned_B[module_key(f.name)])
        return model

    def end_task(self, model, index: int, task: Task, folder: Path) -> PreTrainedModel:
        t = index + 1
        with torch.no_grad():
            for f in lora_factors(model):
                key = module_key(f.name)
                self.finetuned_B[key] = f.B.detach().clone()
                previous = self.merged.get(key, torch.zeros_like(f.B))
                f.B.copy_(merged_b(previous, f.B, t))  # A stays A_t
        if self.is_main_process:
            save_adapter(model, folder / "adapter")
            state = {k: v.contiguous().cpu() for k, v in self.finetuned_B.items()}
            write_file_atomic(folder / STATE, lambda tmp: save_file(state, tmp))
        self.merged = {module_key(f.name): f.B.detach().clone() for f in lora_factors(model)}
        return model

    def restore_task(self, model, index: int, task: Task, folder: Path) -> PreTrainedModel:
        if not isinstance(model, PeftModel):
            model = add_adapter(model, self.config, self.is_seq2seq)
        # every task's file holds the whole merged adapter: the last one restored wins
        set_peft_model_state_dict(model, load_file(folder / "adapter" /
                                                   "adapter_model.safetensors"))
        self.merged = {module_key(f.name): f.B.detach().clone() for f in lora_factors(model)}
        if (folder / STATE).is_file():  # only the latest finished task keeps it
            device = next(model.parameters()).device
            self.finetuned_B = {k: v.to(device) for k, v in load_file(folder / STATE).items()}
        self.previous_folder = folder
        return model

    def task_recorded(self, index: int, folder: Path) -> None:
        self.previous_folder = remove_superseded(self.previous_folder, folder, self.latest_only)
