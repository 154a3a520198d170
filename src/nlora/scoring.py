"""Is a generated answer correct? The field's normalised exact match, or strict exact match.

``normalised`` (default) is the convention of the public O-LoRA / N-LoRA code, which scores
with the SQuAD-style answer normaliser without article removal: lower-case, drop every ASCII
punctuation character, collapse whitespace; both the answer and the label are normalised
before they are compared. For causal models the released code decodes prompt + answer and
keeps the text after the last ``Answer:``; nlora decodes only the answer, and
``answer_text`` applies the same rule to it, so an answer that repeats the pattern
(``World\\nAnswer: Sports``) is read as the release reads it.

``strict`` compares the answer and the label with surrounding whitespace stripped.

Test rows whose label is not in the task's ``labels.json`` (MNLI's unlabelled ``-`` rows)
can be kept in the denominator (``--count-unlabelled``, as the release does); they are then
always wrong, whatever was generated (docs/reproduction.md).
"""

from __future__ import annotations

import string
from collections.abc import Collection, Sequence
from typing import Protocol

SCORERS = ("normalised", "strict")
DEFAULT_SCORER = "normalised"
ANSWER_PREFIX = "Answer:"  # the last line of every prompt (nlora.data.build_prompt)
_PUNCTUATION = str.maketrans("", "", string.punctuation)


class Scored(Protocol):
    prediction: str
    label: str


def normalise_answer(text: str) -> str:
    """Lower-case, ASCII punctuation removed, runs of whitespace made one space, stripped."""
    return " ".join(text.lower().translate(_PUNCTUATION).split())


def answer_text(generated: str, causal: bool) -> str:
    """What a causal model answered: the text after the last ``Answer:`` if it wrote one."""
    if causal and ANSWER_PREFIX in generated:
        return generated.rsplit(ANSWER_PREFIX, 1)[1]
    return generated


def scored_form(generated: str, scorer: str, causal: bool = False) -> str:
    """The text the scorer compares with the (equally transformed) label."""
    if scorer == "normalised":
        return normalise_answer(answer_text(generated, causal))
    if scorer == "strict":
        return generated.strip()
    raise ValueError(f"scorer must be one of {', '.join(SCORERS)}, got {scorer!r}")


def is_correct(
    generated: str,
    label: str,
    scorer: str = DEFAULT_SCORER,
    causal: bool = False,
    labels: Collection[str] | None = None,
) -> bool:
    """True when the answer matches the label under ``scorer``.

    With ``labels`` given, a row whose label is not one of them (an unlabelled row kept in the
    denominator) is wrong whatever the answer.
    """
    if labels is not None and label not in labels:
        return False
    label_form = normalise_answer(label) if scorer == "normalised" else label.strip()
    return scored_form(generated, scorer, causal) == label_form


def accuracy(
    predictions: Sequence[Scored],
    scorer: str = "strict",
    causal: bool = False,
    labels: Collection[str] | None = None,
) -> float:
    """Percent of correct answers (0-100), as the paper reports."""
    right = sum(is_correct(p.prediction, p.label, scorer, causal, labels) for p in predictions)
    return 100.0 * right / len(predictions)
