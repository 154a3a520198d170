"""Is a generated answer correct, and how good is it? Exact match for classification and short
answers; ROUGE-L for generation tasks (SuperNI).

Metrics (``METRICS``, named in every record): ``accuracy`` (exact match against the row's
label, over a task's label set), ``exact_match`` (exact match against any of a row's
references) and ``rougeL`` (ROUGE-L F-measure x 100 with Google's ``rouge_score``, Porter
stemmer on, as Super-NaturalInstructions and the post-N-LoRA releases score; the maximum over
a row's references, or the one reference drawn at load with ``--references drawn``).

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
from functools import lru_cache
from typing import Any, Protocol

SCORERS = ("normalised", "strict")
METRICS = ("accuracy", "exact_match", "rougeL")
# generation tasks: score against every reference of a row (the best counts), or the one drawn
REFERENCE_CHOICES = ("all", "drawn")
METRIC_TITLES = {"accuracy": "accuracy (%)", "exact_match": "exact match (%)",
                 "rougeL": "ROUGE-L (F x 100)"}
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


@lru_cache(maxsize=1)
def _rouge_scorer() -> Any:
    from rouge_score import rouge_scorer  # imported on first use: only generation tasks need it

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure x 100 of ``prediction`` against ``reference`` (rouge_score's default
    tokenizer: lower-cased, non-alphanumerics dropped; Porter stemmer on)."""
    return 100.0 * _rouge_scorer().score(reference, prediction)["rougeL"].fmeasure


def exact_match_any(
    generated: str, references: Sequence[str], scorer: str = DEFAULT_SCORER, causal: bool = False
) -> bool:
    """True when the answer matches one of ``references`` under ``scorer``."""
    return any(is_correct(generated, r, scorer, causal) for r in references)


def row_score(
    metric: str,
    generated: str,
    references: Sequence[str],
    scorer: str = DEFAULT_SCORER,
    causal: bool = False,
    labels: Collection[str] | None = None,
) -> tuple[float, bool]:
    """(score, exact match) of one row under ``metric``: 100 or 0 for the exact-match metrics,
    the best ROUGE-L over ``references`` for rougeL. ``accuracy`` takes the row's one label
    (``references[0]``) and, with ``labels``, is wrong for a label outside them."""
    if metric == "accuracy":
        right = is_correct(generated, references[0], scorer, causal, labels)
        return 100.0 * right, right
    right = exact_match_any(generated, references, scorer, causal)
    if metric == "exact_match":
        return 100.0 * right, right
    if metric == "rougeL":
        return max(rouge_l(generated, r) for r in references), right
    raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
