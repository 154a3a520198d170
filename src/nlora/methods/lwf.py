"""LwF (Li and Hoiem, 2017; paper Section 4.1): SeqFT plus distillation, on the new task's
inputs, towards the model as it was before the task.

penalty = α · T² · KL(softmax(teacher / T) ‖ softmax(student / T)), averaged over the answer
tokens (the positions the task loss is computed on). The teacher is a frozen copy made at the
start of each task after the first (the first task has no earlier knowledge to keep). It is
rebuilt from the restored weights on resume, so nothing extra is saved.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from nlora.batching import IGNORE_INDEX
from nlora.data import Task
from nlora.loss import AnswerOutputs, answer_head_forward
from nlora.methods.base import register
from nlora.methods.seqft import SeqFT
from nlora.options import option


def answer_logits(logits: torch.Tensor, labels: torch.Tensor, is_seq2seq: bool) -> torch.Tensor:
    """The logits that predict answer tokens, one row per token."""
    if not is_seq2seq:  # a causal model's position p predicts token p + 1
        logits, labels = logits[:, :-1], labels[:, 1:]
    return logits[labels != IGNORE_INDEX]


def distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    is_seq2seq: bool,
) -> torch.Tensor:
    """T² · KL(teacher ‖ student) at temperature T, mean over answer tokens."""
    return kl_at_temperature(
        answer_logits(student, labels, is_seq2seq), answer_logits(teacher, labels, is_seq2seq),
        temperature,
    )


def kl_at_temperature(student: torch.Tensor, teacher: torch.Tensor, temperature: float):
    """T² · KL(teacher ‖ student) over rows of answer-token logits, mean over rows."""
    kl = F.kl_div(
        F.log_softmax(student / temperature, dim=-1), F.log_softmax(teacher / temperature, dim=-1),
        log_target=True, reduction="batchmean",
    )
    return kl * temperature**2  # keeps the gradient scale independent of T (Hinton et al.)


@dataclass
class LwFOptions:
    lwf_alpha: float = option(1.0, "LwF distillation weight (Li and Hoiem, 2017)", "float",
                              "LwF options", low=0)
    lwf_temperature: float = option(2.0, "LwF distillation temperature (Li and Hoiem, 2017)",
                                    "float", "LwF options", low=0, low_open=True)

@register
class LwF(SeqFT):
    name = "lwf"
    title = "LwF"
    summary = "full fine-tuning with distillation from the model before the task"
    options = LwFOptions

    def __init__(self, config, is_seq2seq: bool) -> None:
        super().__init__(config, is_seq2seq)
        self.teacher: torch.nn.Module | None = None

    def begin_task(self, model: PreTrainedModel, index: int, task: Task) -> torch.nn.Module:
        self.teacher = None
        if index > 0 and self.config.lwf_alpha > 0:
            self.teacher = copy.deepcopy(model).eval().requires_grad_(False)
        return super().begin_task(model, index, task)

    def penalty(self, model, index, batch, outputs) -> torch.Tensor | None:
        if self.teacher is None:
            return None
        temperature = self.config.lwf_temperature
        if isinstance(outputs, AnswerOutputs):
            # causal fast path: the student's head ran only at answer positions; run the
            # teacher the same way, so both hold the same rows in the same order
            with torch.no_grad():
                teacher = answer_head_forward(self.teacher, batch).answer_logits
            return self.config.lwf_alpha * kl_at_temperature(
                outputs.answer_logits, teacher, temperature
            )
        with torch.no_grad():
            teacher_logits = self.teacher(**batch).logits
        return self.config.lwf_alpha * distillation_loss(
            outputs.logits, teacher_logits, batch["labels"], temperature, self.is_seq2seq,
        )

    def end_task(self, model, index: int, task: Task, folder: Path) -> PreTrainedModel:
        self.teacher = None  # free its memory before evaluation and the next task
        return super().end_task(model, index, task, folder)
