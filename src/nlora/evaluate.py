"""Accuracy on a task's test split: greedy decoding and exact match (whitespace stripped).

Generation stops after the longest label's token count plus one (room for EOS): no
correct answer is longer, so longer decoding only costs time. Prompts are sorted by
length so batches carry little padding; predictions come back in the original order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from nlora.batching import Encoder
from nlora.data import Example, Task


@dataclass
class Prediction:
    index: int
    prediction: str
    label: str

    @property
    def correct(self) -> bool:
        return self.prediction.strip() == self.label.strip()


def accuracy(predictions: list[Prediction]) -> float:
    """Percent of exact matches (0-100), as the paper reports."""
    return 100.0 * sum(p.correct for p in predictions) / len(predictions)


@torch.no_grad()
def generate_answers(
    model: PreTrainedModel,
    encoder: Encoder,
    examples: list[Example],
    labels: list[str],
    batch_size: int = 32,
    desc: str = "eval",
) -> list[Prediction]:
    was_training = model.training
    model.eval()
    max_new_tokens = max(len(encoder.label_ids(label)) for label in labels) + 1
    prompts = [encoder.prompt_ids(ex.prompt) for ex in examples]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    device = next(model.parameters()).device
    texts: dict[int, str] = {}
    for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False, unit="batch"):
        chunk = order[start : start + batch_size]
        batch = encoder.collate_prompts([prompts[i] for i in chunk])
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=encoder.pad_id,
            eos_token_id=encoder.eos_id,
        )
        if not encoder.is_seq2seq:  # causal output repeats the prompt first
            out = out[:, batch["input_ids"].shape[1] :]
        decoded = encoder.tokenizer.batch_decode(out, skip_special_tokens=True)
        texts.update(zip(chunk, decoded, strict=True))
    model.train(was_training)
    return [Prediction(i, texts[i].strip(), ex.label) for i, ex in enumerate(examples)]


def evaluate_task(
    model: PreTrainedModel, encoder: Encoder, task: Task, batch_size: int = 32
) -> tuple[float, list[Prediction]]:
    predictions = generate_answers(
        model, encoder, task.test, task.labels, batch_size, desc=f"eval {task.dataset}"
    )
    return accuracy(predictions), predictions
