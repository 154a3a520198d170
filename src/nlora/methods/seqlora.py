"""SeqLoRA (paper Section 4.1): one LoRA adapter trained on task after task, never reset
and never merged; the base model stays frozen. Its state is saved (PEFT format) after every
task, so resume reloads the latest one."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import PreTrainedModel

from nlora.adapters import add_adapter, check_adapter, save_adapter
from nlora.data import Task
from nlora.methods.base import ContinualMethod, register


@register
class SeqLoRA(ContinualMethod):
    name = "seqlora"
    title = "SeqLoRA"
    summary = "one LoRA adapter trained on task after task, never reset (the forgetting baseline)"
    released_scripts = "o-lora-baseline"
    own_schedule = True
    cumulative_adapter = True
    # Task t's update is adapter_t − adapter_{t-1} = s·[B_t, −B_{t-1}]·[A_t; A_{t-1}]: it has
    # no A of its own, and OO on the stacked factors counts A_{t-1} against itself (task t-1's
    # update holds it too), so OO is not defined for it (AWOM, on ΔW, is)
    undefined_metrics = ("OO",)

    def check(self, model: PreTrainedModel) -> None:
        check_adapter(model, self.config, self.is_seq2seq)

    def begin_task(self, model: PreTrainedModel, index: int, task: Task) -> torch.nn.Module:
        if isinstance(model, PeftModel):  # the one adapter, as the last task left it
            return model
        return add_adapter(model, self.config, self.is_seq2seq)

    def end_task(self, model, index: int, task: Task, folder: Path) -> PreTrainedModel:
        if self.is_main_process:
            save_adapter(model, folder / "adapter")
        return model

    def restore_task(self, model, index: int, task: Task, folder: Path) -> PreTrainedModel:
        if not isinstance(model, PeftModel):
            model = add_adapter(model, self.config, self.is_seq2seq)
        # every task's file holds the whole adapter: the last one restored wins
        state = load_file(folder / "adapter" / "adapter_model.safetensors")
        set_peft_model_state_dict(model, state)
        return model
