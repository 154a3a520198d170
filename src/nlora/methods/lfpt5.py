"""LFPT5 (Qin and Joty, 2022; paper Section 4.1): one soft prompt tuned across all tasks,
which learns both to solve each task and to generate its examples; before each new task it
generates pseudo samples of every earlier task, which are replayed with the new task's data.

Training on task t (every row: a real example of task t or a pseudo sample of task i < t):

    loss = task loss + λ_lm · LM loss + λ_kd · KD

* task loss: the usual prompt → label loss.
* LM loss: given the row's task prefix ``__<dataset>__``, generate
  ``"<sentence> __ans__ <label>"`` (LFPT5's generation target, its task token and answer
  separator), so the prompt learns to produce samples of that task with their label.
* KD (from the second task): on task t's real rows, KL(old ‖ new) between the answer-token
  distributions with the prompt as it was after task t-1 and with the current one.

Pseudo samples: after task t (when a task follows), for each task i ≤ t the model samples
2·k·|labels_i| continuations of ``__<dataset_i>__`` (top-k 64, repetition penalty 2.5, as the
LFPT5 code); each ``sentence __ans__ label`` with a label of task i is turned into task i's
prompt (its instruction, options and ``Task:/Dataset:`` header) with that label, and the first
k per label are kept (``--lfpt5-pseudo-per-label``). They are saved in the task folder as
``pseudo.jsonl`` so a resumed run replays exactly the same ones.

For causal models (LFPT5 is T5-only) the prefix is the decoder's input and the model
continues it with the sample, exactly as it continues a prompt with its answer; for seq2seq
models the prefix is the encoder's input and the decoder writes the sample.

Differences from the LFPT5 code: AdamW (the shared loop) instead of Adafactor; the prompt is
put before the input (LFPT5 appends it after the T5 encoder input), initialised from random
vocabulary tokens (LFPT5: task name, label words and frequent tokens); the task + LM terms are
not scaled by (1 - λ_kd); KD is a mean over answer tokens (LFPT5 sums over the batch).
The prompt after each task is saved as a PEFT prompt-tuning adapter in ``prompt/``.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel

from nlora.data import Example, Task, build_prompt
from nlora.io import write_text_atomic
from nlora.loss import AnswerOutputs
from nlora.methods.base import ContinualMethod, register
from nlora.methods.lwf import answer_logits, kl_at_temperature
from nlora.methods.prompting import (
    PromptedModel,
    load_prompt_adapter,
    new_prompt,
    prompt_weight,
    save_prompt_adapter,
)
from nlora.options import option

ANSWER = "__ans__"  # LFPT5's separator between a generated sample and its label
SAMPLE_TOKENS = 128  # longest generated/learned sentence, in tokens (LFPT5's max_length)
PSEUDO = "pseudo.jsonl"
EXTRA_KEYS = ("lm_input_ids", "lm_attention_mask", "lm_labels", "replayed")


def task_prefix(task: Task) -> str:
    """The generation prefix of a task (LFPT5's per-task generation token)."""
    return f"__{task.dataset}__"


def lm_target(sentence: str, label: str) -> str:
    return f"{sentence} {ANSWER} {label}"


@dataclass(frozen=True)
class TaggedExample(Example):
    """A training row with its task's generation prefix; ``replayed``: a pseudo sample."""

    prefix: str = ""
    replayed: bool = False


def tagged(example: Example, task: Task, replayed: bool = False) -> TaggedExample:
    return TaggedExample(example.sentence, example.label, example.prompt, task_prefix(task),
                         replayed, references=example.references,
                         max_target=example.max_target)


def parse_samples(task: Task, texts: list[str], per_label: int) -> list[TaggedExample]:
    """Pseudo samples of ``task`` from generated ``sentence __ans__ label`` texts: those with
    one of the task's labels, at most ``per_label`` per label in order, as task examples."""
    kept: dict[str, int] = {}
    samples = []
    for text in texts:
        parts = text.split(ANSWER)
        if len(parts) != 2:
            continue
        sentence, label = parts[0].strip(), parts[1].strip()
        if not sentence or label not in task.labels or kept.get(label, 0) >= per_label:
            continue
        kept[label] = kept.get(label, 0) + 1
        prompt = build_prompt(task.category, task.dataset, task.labels, sentence)
        samples.append(TaggedExample(sentence, label, prompt, task_prefix(task), True))
    return samples


class SharedPrompt(PromptedModel):
    """One prompt for every task; ``override`` swaps in another (the KD teacher's)."""

    def __init__(self, backbone: PreTrainedModel, is_seq2seq: bool, length: int) -> None:
        super().__init__(backbone, is_seq2seq)
        self.prompt = new_prompt(backbone, length, is_seq2seq)
        self.override: torch.Tensor | None = None

    def prompt_embeddings(self, input_ids, attention_mask) -> torch.Tensor:
        prompt = self.override if self.override is not None else prompt_weight(self.prompt)
        return prompt.unsqueeze(0).expand(input_ids.shape[0], -1, -1)

    def forward(self, **kwargs):
        for key in EXTRA_KEYS:  # LFPT5's batch fields, read by its penalty
            kwargs.pop(key, None)
        return super().forward(**kwargs)


GROUP = "LFPT5 options (LFPT5 code)"


@dataclass
class LFPT5Options:
    lfpt5_prompt_length: int = option(300, "LFPT5 soft prompt length", "int", GROUP, low=1,
                                      high=4096)
    lfpt5_lm_weight: float = option(0.25, "LFPT5 weight of the pseudo-sample generation loss",
                                    "float", GROUP, low=0)
    lfpt5_kd_weight: float = option(0.01, "LFPT5 weight of the distillation term", "float",
                                    GROUP, low=0)
    lfpt5_pseudo_per_label: int = option(2, "LFPT5 pseudo samples replayed per label of each "
                                         "earlier task", "int", GROUP, low=1, high=2**20)

@register
class LFPT5(ContinualMethod):
    name = "lfpt5"
    title = "LFPT5"
    summary = ("one shared soft prompt that also generates pseudo samples of earlier tasks for "
               "replay")
    options = LFPT5Options
    defaults = {"learning_rate": 0.5}  # LFPT5 code (Adafactor there)
    # pseudo samples are kept by their label and given the classification prompt
    task_families = ("classification",)

    def __init__(self, config, is_seq2seq: bool) -> None:
        super().__init__(config, is_seq2seq)
        self.seen: list[Task] = []
        self.pseudo: list[TaggedExample] = []  # replayed at the next task
        self.teacher: torch.Tensor | None = None

    def _wrap(self, model) -> SharedPrompt:
        if isinstance(model, SharedPrompt):
            return model
        return SharedPrompt(model, self.is_seq2seq, self.config.lfpt5_prompt_length)

    # --- data: every row carries its task prefix for the LM objective --------------------

    def train_examples(self, index: int, tasks: list[Task]) -> list[Example]:
        return [tagged(ex, tasks[index]) for ex in tasks[index].train] + self.pseudo

    def train_features(self, example: Example) -> dict[str, list[int]]:
        features = self.encoder.train_features(example)
        tokenizer = self.encoder.tokenizer
        ids = tokenizer(example.sentence, add_special_tokens=False)["input_ids"][:SAMPLE_TOKENS]
        sentence = tokenizer.decode(ids).strip()
        lm = self.encoder.train_features(
            Example("", lm_target(sentence, example.label), example.prefix)
        )
        return {**features, "lm_input_ids": lm["input_ids"], "lm_labels": lm["labels"],
                "replayed": [int(example.replayed)]}

    def collate_train(self, features) -> dict[str, torch.Tensor]:
        batch = self.encoder.collate_train(
            [{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features]
        )
        lm = self.encoder.collate_train(
            [{"input_ids": f["lm_input_ids"], "labels": f["lm_labels"]} for f in features]
        )
        return {**batch, "lm_input_ids": lm["input_ids"],
                "lm_attention_mask": lm["attention_mask"], "lm_labels": lm["labels"],
                "replayed": torch.tensor([f["replayed"][0] for f in features])}

    # --- training ------------------------------------------------------------------------

    def begin_task(self, model, index: int, task: Task) -> torch.nn.Module:
        model = self._wrap(model)
        model.prompt.requires_grad_(True)
        self.teacher = None
        if index > 0 and self.config.lfpt5_kd_weight > 0:
            self.teacher = prompt_weight(model.prompt).detach().clone()
        self.seen.append(task)
        return model

    def penalty(self, model, index, batch, outputs) -> torch.Tensor | None:
        lm = model(input_ids=batch["lm_input_ids"], attention_mask=batch["lm_attention_mask"],
                   labels=batch["lm_labels"]).loss
        loss = self.config.lfpt5_lm_weight * lm
        if self.teacher is not None:
            rows = batch["replayed"] == 0  # distil on the new task's real rows only
            if rows.any():
                loss = loss + self.config.lfpt5_kd_weight * self._distillation(
                    model, batch, outputs, rows
                )
        return loss

    def _distillation(self, model, batch, outputs, rows) -> torch.Tensor:
        """KL(old ‖ new) over the answer tokens of the rows in ``rows``."""
        model.override = self.teacher
        try:
            with torch.no_grad():  # labels: T5's decoder input, and the answer positions
                teacher = model(input_ids=batch["input_ids"], labels=batch["labels"],
                                attention_mask=batch["attention_mask"])
        finally:
            model.override = None
        if isinstance(outputs, AnswerOutputs):  # causal: only the answer rows were projected
            row_of = outputs.answer_mask.nonzero()[:, 0]
            keep = rows[row_of]
            return kl_at_temperature(outputs.answer_logits[keep], teacher.answer_logits[keep],
                                     1.0)
        student, teacher, labels = outputs.logits[rows], teacher.logits[rows], batch["labels"][rows]
        if not self.is_seq2seq:  # drop the prompt's positions: logits line up with labels
            n = student.shape[1] - labels.shape[1]
            student, teacher = student[:, n:], teacher[:, n:]
        return kl_at_temperature(answer_logits(student, labels, self.is_seq2seq),
                                 answer_logits(teacher, labels, self.is_seq2seq), 1.0)

    def end_task(self, model, index: int, task: Task, folder: Path) -> PreTrainedModel:
        model.prompt.requires_grad_(False)
        self.teacher = None
        if self.is_main_process:
            save_prompt_adapter(folder / "prompt", prompt_weight(model.prompt),
                                model.backbone, self.is_seq2seq, self.config.model)
        if index + 1 < len(self.config.tasks):  # samples of every task so far, for the next
            self.pseudo = [s for t in self.seen for s in self.sample_task(model, t)]
            if self.is_main_process:
                lines = [json.dumps({"sentence": s.sentence, "label": s.label,
                                     "prompt": s.prompt, "prefix": s.prefix},
                                    ensure_ascii=False) for s in self.pseudo]
                write_text_atomic(folder / PSEUDO, "".join(line + "\n" for line in lines))
        return model

    def sample_task(self, model: SharedPrompt, task: Task) -> list[TaggedExample]:
        """Pseudo samples of ``task`` generated from its prefix with the current prompt."""
        per_label = self.config.lfpt5_pseudo_per_label
        count = 2 * per_label * len(task.labels)
        return parse_samples(task, self.sample_texts(model, task, count), per_label)

    @torch.no_grad()
    def sample_texts(self, model: SharedPrompt, task: Task, count: int) -> list[str]:
        encoder = self.encoder
        prefix = encoder.prompt_ids(task_prefix(task))
        batch = encoder.collate_prompts([prefix] * count)
        device = next(model.parameters()).device
        longest_label = max(len(encoder.label_ids(label)) for label in task.labels)
        was_training = model.training
        model.eval()
        with warnings.catch_warnings():  # the penalty acts on generated tokens only: intended
            warnings.filterwarnings("ignore", message=".*repetition_penalty.*")
            out = model.generate(
                **{k: v.to(device) for k, v in batch.items()},
                do_sample=True, top_k=64, repetition_penalty=2.5,
                max_new_tokens=SAMPLE_TOKENS + longest_label + 8,
                pad_token_id=encoder.pad_id, eos_token_id=encoder.eos_id,
            )
        model.train(was_training)
        if not self.is_seq2seq:
            out = out[:, len(prefix):]
        return encoder.tokenizer.batch_decode(out, skip_special_tokens=True)

    def restore_task(self, model, index: int, task: Task, folder: Path) -> PreTrainedModel:
        model = self._wrap(model)
        with torch.no_grad():
            model.prompt.embedding.weight.copy_(load_prompt_adapter(folder / "prompt"))
        model.prompt.requires_grad_(False)
        self.seen.append(task)
        if (folder / PSEUDO).is_file():
            rows = [json.loads(line) for line in
                    (folder / PSEUDO).read_text(encoding="utf-8").splitlines() if line]
            self.pseudo = [TaggedExample(r["sentence"], r["label"], r["prompt"], r["prefix"],
                                         True) for r in rows]
        return model
