"""PerTaskFT (paper Section 4.1): an independent LoRA adapter per task, each trained from the
base model (nothing is merged), and task i answered by adapter i.

All adapters live in one PEFT model under the names task0, task1, ...; ``eval_model``
switches the active one. Each is saved in its task folder (adapter/taskN, PEFT format).
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from transformers import PreTrainedModel

from nlora.adapters import check_adapter, lora_config, save_adapter
from nlora.data import Task
from nlora.methods.base import ContinualMethod, register


def adapter_name(index: int) -> str:
    return f"task{index}"


def activate(model: PeftModel, index: int) -> None:
    """Make adapter ``index`` the one that answers and the only one that trains."""
    name = adapter_name(index)
    model.base_model.enable_adapter_layers()
    model.set_adapter(name)
    for param_name, param in model.named_parameters():
        param.requires_grad = f".{name}." in param_name


@register
class PerTaskFT(ContinualMethod):
    name = "pertaskft"
    title = "PerTaskFT"
    summary = ("a separate LoRA adapter per task, each answering its own task (no transfer, no "
               "forgetting)")
    per_task_model = True

    def check(self, model: PreTrainedModel) -> None:
        check_adapter(model, self.config, self.is_seq2seq)

    def begin_task(self, model: PreTrainedModel, index: int, task: Task) -> torch.nn.Module:
        config = lora_config(self.config, self.is_seq2seq)
        if isinstance(model, PeftModel):
            model.add_adapter(adapter_name(index), config)
        else:
            model = get_peft_model(model, config, adapter_name=adapter_name(index))
        activate(model, index)
        return model

    def end_task(self, model, index: int, task: Task, folder: Path) -> PreTrainedModel:
        if self.is_main_process:
            save_adapter(model, folder / "adapter", selected_adapters=[adapter_name(index)])
        return model

    def restore_task(self, model, index: int, task: Task, folder: Path) -> PreTrainedModel:
        path, name = folder / "adapter" / adapter_name(index), adapter_name(index)
        if isinstance(model, PeftModel):
            model.load_adapter(path, adapter_name=name)
        else:
            model = PeftModel.from_pretrained(model, path, adapter_name=name)
        return model

    def eval_model(self, model: PreTrainedModel, task_index: int) -> PreTrainedModel:
        if adapter_name(task_index) not in model.peft_config:  # not trained yet (--eval-on all)
            model.base_model.disable_adapter_layers()  # the base model answers
            return model
        activate(model, task_index)
        return model
