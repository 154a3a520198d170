"""ProgPrompt (Razdaibiedina et al., 2023; paper Section 4.1): a new soft prompt per task;
earlier prompts are frozen and the new one is put in front of them, so task t reads
[P_t; P_{t-1}; ...; P_1; x]. The backbone never changes.

Like PerTaskFT it answers task i with what was learned up to task i (the task identity is
known at test time): evaluation on task i uses [P_i; ...; P_1]. A task not trained yet
(``--eval-on all``) gets every prompt learned so far.

Each prompt is a PEFT ``PromptEmbedding`` of ``--progprompt-length`` tokens initialised from
random vocabulary embeddings (the ProgPrompt T5 code's init, PEFT's SAMPLE_VOCAB). After task
t the progressive prompt [P_t; ...; P_1] is saved as a PEFT prompt-tuning adapter in
``tasks/NN-x/prompt/`` (plain ``PeftModel.from_pretrained`` answers task t with it); resume
takes P_t, its first rows, back from there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel

from nlora.data import Task
from nlora.methods.base import ContinualMethod, register
from nlora.methods.prompting import (
    PromptedModel,
    load_prompt_adapter,
    new_prompt,
    prompt_weight,
    save_prompt_adapter,
)
from nlora.options import option


class ProgressivePrompts(PromptedModel):
    def __init__(self, backbone: PreTrainedModel, is_seq2seq: bool) -> None:
        super().__init__(backbone, is_seq2seq)
        self.prompts = torch.nn.ModuleList()  # P_1, P_2, ... (PEFT PromptEmbedding each)
        self.active = 0  # the last task whose prompt is read

    def progressive_prompt(self, task_index: int) -> torch.Tensor:
        """[P_t; ...; P_1] for t = ``task_index`` (newest first), (length · (t+1), dim)."""
        return torch.cat([prompt_weight(self.prompts[i]) for i in range(task_index, -1, -1)])

    def prompt_embeddings(self, input_ids, attention_mask) -> torch.Tensor:
        prompt = self.progressive_prompt(self.active)
        return prompt.unsqueeze(0).expand(input_ids.shape[0], -1, -1)


@dataclass
class ProgPromptOptions:
    progprompt_length: int = option(10, "ProgPrompt soft prompt length per task (T5 code)",
                                    "int", "ProgPrompt options", low=1, high=4096)

@register
class ProgPrompt(ContinualMethod):
    name = "progprompt"
    title = "ProgPrompt"
    summary = ("a new soft prompt per task, concatenated with the frozen earlier ones "
               "(Progressive Prompts)")
    options = ProgPromptOptions
    defaults = {"learning_rate": 0.3}  # ProgPrompt T5 code (AdamW)

    def _wrap(self, model) -> ProgressivePrompts:
        return model if isinstance(model, ProgressivePrompts) else ProgressivePrompts(
            model, self.is_seq2seq
        )

    def begin_task(self, model, index: int, task: Task) -> torch.nn.Module:
        model = self._wrap(model)
        model.prompts.requires_grad_(False)  # earlier prompts stay as they are
        model.prompts.append(new_prompt(model.backbone, self.config.progprompt_length,
                                        self.is_seq2seq))
        model.active = index
        return model

    def end_task(self, model, index: int, task: Task, folder: Path) -> PreTrainedModel:
        model.prompts[index].requires_grad_(False)
        if self.is_main_process:
            save_prompt_adapter(folder / "prompt", model.progressive_prompt(index),
                                model.backbone, self.is_seq2seq, self.config.model)
        return model

    def restore_task(self, model, index: int, task: Task, folder: Path) -> PreTrainedModel:
        model = self._wrap(model)
        saved = load_prompt_adapter(folder / "prompt")
        prompt = new_prompt(model.backbone, self.config.progprompt_length, self.is_seq2seq)
        with torch.no_grad():  # P_t is the first block of the saved [P_t; ...; P_1]
            prompt.embedding.weight.copy_(saved[: self.config.progprompt_length])
        model.prompts.append(prompt.requires_grad_(False))
        model.active = index
        return model

    def eval_model(self, model, task_index: int) -> PreTrainedModel:
        model.active = min(task_index, len(model.prompts) - 1)
        return model
