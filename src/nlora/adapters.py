"""LoRA adapters through PEFT: add a fresh one, walk its factors, save, merge, reload."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import PreTrainedModel

from nlora.config import RunConfig
from nlora.io import write_dir_atomic


@dataclass
class LoraFactors:
    """One adapted module: ΔW = scaling · B @ A, with A (r, in) and B (out, r) as in PEFT."""

    name: str
    A: torch.Tensor
    B: torch.Tensor
    scaling: float


def lora_config(config: RunConfig, is_seq2seq: bool) -> LoraConfig:
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.target_modules,  # None: PEFT's query/value default per model type
        task_type=TaskType.SEQ_2_SEQ_LM if is_seq2seq else TaskType.CAUSAL_LM,
    )


def add_adapter(model: PreTrainedModel, config: RunConfig, is_seq2seq: bool) -> PeftModel:
    """Wrap ``model`` with a fresh trainable LoRA adapter; everything else is frozen."""
    return get_peft_model(model, lora_config(config, is_seq2seq))


def lora_factors(model: torch.nn.Module) -> Iterator[LoraFactors]:
    """The active adapter's factors in every adapted module of ``model``."""
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter in module.active_adapters:
            if adapter in module.lora_A:
                yield LoraFactors(
                    name=name,
                    A=module.lora_A[adapter].weight,
                    B=module.lora_B[adapter].weight,
                    scaling=float(module.scaling[adapter]),
                )


def save_adapter(model: PeftModel, folder: Path) -> None:
    """PEFT's own format (safetensors), so plain ``PeftModel.from_pretrained`` reads it."""
    write_dir_atomic(folder, lambda tmp: model.save_pretrained(tmp, safe_serialization=True))


def merge(model: PeftModel) -> PreTrainedModel:
    """Fold the adapter into the base weights and drop the LoRA layers."""
    return model.merge_and_unload()


def load_and_merge(model: PreTrainedModel, folder: Path) -> PreTrainedModel:
    return PeftModel.from_pretrained(model, folder).merge_and_unload()
