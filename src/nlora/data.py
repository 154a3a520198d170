"""Benchmark tasks in the O-LoRA / N-LoRA ``CL_Benchmark`` layout, and their prompts; what
every task shares (``Task``, ``Example``, finding a task by name). ``nlora.families`` builds
on this module: it defines SuperNI and a user's task folders beside this classification
family, and ``load_task`` hands a folder to its family.

Layout: ``DATA/<CATEGORY>/<DATASET>/{train,test,labels}.json``; each split is a JSON
list of ``{"sentence": str, "label": str}`` and ``labels.json`` lists the label strings.
The category picks the instruction (paper, Table 6); a category without one (COPA, or a
user's own) gets the released code's bare prompt, and ``--instructions FILE`` adds or replaces
instructions per category.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from nlora.errors import ConfigError, DataError

log = logging.getLogger("nlora")

# A small real sample of the benchmark shipped inside the package (scripts/make_sample_data.py
# draws it from the full data; sources and licences: sample_data/README.md).
SAMPLE_DATA = Path(__file__).resolve().parent / "sample_data" / "CL_Benchmark"
_said_sample = False

# Paper, Table 6. The public O-LoRA/N-LoRA instruction config ends each one with a newline.
INSTRUCTIONS: dict[str, str] = {
    "NLI": 'What is the logical relationship between the "sentence 1" and the "sentence 2"? '
    "Choose one from the option.",
    "QQP": 'Whether the "first sentence" and the "second sentence" have the same meaning? '
    "Choose one from the option.",
    "SC": "What is the sentiment of the following paragraph? Choose one from the option.",
    "TC": "What is the topic of the following paragraph? Choose one from the option.",
    "BoolQA": "According to the following passage, is the question true or false? "
    "Choose one from the option.",
    "MultiRC": "According to the following passage and question, is the candidate answer "
    "true or false? Choose one from the option.",
    "WiC": "Given a word and two sentences, whether the word is used with the same sense in "
    "both sentence? Choose one from the option.",
}

# Where the paper's datasets live, so a task missing from a data dir can still be named.
KNOWN_CATEGORIES: dict[str, str] = {
    "yelp": "SC", "amazon": "SC", "imdb": "SC", "sst-2": "SC",
    "dbpedia": "TC", "yahoo": "TC", "agnews": "TC",
    "mnli": "NLI", "cb": "NLI", "rte": "NLI",
    "qqp": "QQP", "boolqa": "BoolQA", "multirc": "MultiRC", "wic": "WiC", "copa": "COPA",
}
ALIASES: dict[str, str] = {"ag": "agnews", "sst2": "sst-2", "boolq": "boolqa"}


def data_dir_from(option: str | os.PathLike | None) -> Path:
    """The data directory: the option, else ``$NLORA_DATA``, else the embedded sample."""
    value = option or os.environ.get("NLORA_DATA")
    if not value:
        global _said_sample
        if not _said_sample:  # one line per process, however many configs are built
            log.info("no --data or NLORA_DATA: using the small sample shipped with nlora (%s)",
                     SAMPLE_DATA)
            _said_sample = True
        return SAMPLE_DATA
    try:
        path = Path(value).expanduser().resolve()
    except (OSError, RuntimeError) as err:  # a symlink loop
        raise DataError(f"data directory {value}: {err}") from None
    if not path.is_dir():
        raise DataError(f"data directory {path} does not exist")
    return path


class TaskNotFound(DataError):
    """No folder of the data directory matches a task name."""


@dataclass(frozen=True)
class Example:
    """One row: its own text, its training target (``label``) and its prompt.

    ``references``: every acceptable answer of a generation task (the label is one of them);
    empty for classification, whose one answer is the label. ``max_target``: target tokens
    kept in training, EOS included (None: all). Both keyword-only, so subclasses keep their
    positional fields.
    """

    sentence: str
    label: str
    prompt: str
    references: tuple[str, ...] = field(default=(), kw_only=True)
    max_target: int | None = field(default=None, kw_only=True)


@dataclass
class Task:
    """One dataset of the benchmark, with its prompts built and splits loaded."""

    name: str  # "CATEGORY/DATASET", or "DATASET" for a task folder at the top of the data dir
    category: str
    dataset: str
    labels: list[str]  # the label set (classification, accuracy); empty for generation tasks
    family: str = "classification"  # nlora.families: how the task is read, prompted, scored
    metric: str = "accuracy"  # nlora.scoring.METRICS
    max_new_tokens: int | None = None  # generation length; None: longest label + 1
    train: list[Example] = field(default_factory=list)
    test: list[Example] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # split -> rows left out
    # split -> (rows asked for, rows there) when a subsample asked for more than the split has
    capped: dict[str, tuple[int, int]] = field(default_factory=dict)
    # split -> rows kept although their label is not in labels.json (scored as wrong)
    unlabelled: dict[str, int] = field(default_factory=dict)
    # set when ``test`` holds a validation split carved from train.json (eval_split)
    validation: dict[str, object] | None = None


def build_prompt(
    category: str,
    dataset: str,
    labels: list[str],
    sentence: str,
    instructions: Mapping[str, str] | None = None,
) -> str:
    """The prompt of the public O-LoRA/N-LoRA code (task and dataset header on).

    ``instructions`` maps category -> instruction (default: ``INSTRUCTIONS``). A category
    without one gets the release's COPA prompt: header, sentence, ``Answer:``, with neither
    instruction nor option list.
    """
    instruction = (INSTRUCTIONS if instructions is None else instructions).get(category)
    if instruction is None:
        return f"Task:{category}\nDataset:{dataset}\n{sentence}\nAnswer:"
    return (
        f"Task:{category}\nDataset:{dataset}\n{instruction}\n"
        f"Option: {', '.join(labels)} \n{sentence}\nAnswer:"
    )


def read_instructions(path: str | os.PathLike) -> dict[str, str]:
    """Category -> instruction from a JSON or YAML file.

    Either a plain mapping ``{"COPA": "Which alternative is more plausible? ..."}`` or the
    released code's ``instruction_config.json`` (``{"NLI": [{"instruction_type": "zero-shot",
    "instruction": "..."}]}``, whose first zero-shot instruction is used, as the release's
    ``single`` strategy does). A trailing newline is dropped (the prompt adds one).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"--instructions {path}: file not found")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"--instructions {path}: not UTF-8 text (byte 0x{raw[err.start]:02x} at offset "
            f"{err.start}); save it as UTF-8"
        ) from None
    try:
        data = yaml.safe_load(text)  # YAML reads JSON too
    except yaml.YAMLError as err:
        first = str(err).strip().splitlines()[0]
        raise ConfigError(f"--instructions {path}: not valid JSON or YAML ({first})") from None
    except RecursionError:
        raise ConfigError(f"--instructions {path}: nested too deeply to read") from None
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"--instructions {path}: expected a mapping category -> instruction")
    out = {}
    for category, value in data.items():
        if isinstance(value, list):  # the release's format
            value = next(
                (v.get("instruction") for v in value
                 if isinstance(v, dict) and v.get("instruction_type", "zero-shot") == "zero-shot"),
                None,
            )
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(
                f"--instructions {path}: category {category!r} has no instruction text"
            )
        out[str(category)] = value.rstrip("\n")
    return out


def merged_instructions(extra: Mapping[str, str] | None) -> dict[str, str]:
    """The paper's instructions with a user's additions and replacements on top."""
    return {**INSTRUCTIONS, **(extra or {})}


def task_name(category: str, dataset: str) -> str:
    """A task's name: ``CATEGORY/DATASET``, or ``DATASET`` for a folder at the data dir's top."""
    return f"{category}/{dataset}" if category else dataset


def is_task_folder(folder: Path) -> bool:
    """A folder at the data dir's top that is itself a task (a user's task folder,
    ``nlora.families``), not a category."""
    return any((folder / f).is_file() for f in ("train.jsonl", "test.jsonl", "task.yaml"))


def task_folders(data_dir: Path) -> list[tuple[str, str]]:
    """(category, dataset) of every candidate task folder: ``CATEGORY/DATASET/`` two levels
    down, or a task folder at the top (category "")."""
    out = []
    for top in _subdirs(data_dir):
        if is_task_folder(top):
            out.append(("", top.name))
        else:
            out += [(top.name, d.name) for d in _subdirs(top)]
    return out


def resolve_task(data_dir: Path, name: str) -> tuple[str, str]:
    """Map ``CAT/DS`` or a unique ``DS`` (case-insensitive, aliases allowed) to (cat, ds);
    cat is "" for a task folder at the top of ``data_dir``."""
    wanted = name.strip()
    folders = task_folders(data_dir)
    if "/" in wanted:
        category, dataset = wanted.split("/", 1)
        candidates = [(c, d) for c, d in folders
                      if c.lower() == category.lower() and d.lower() == dataset.lower()]
    else:
        key = ALIASES.get(wanted.lower(), wanted.lower())
        candidates = [(c, d) for c, d in folders if d.lower() == key]
    if len(candidates) > 1:
        options = ", ".join(task_name(c, d) for c, d in candidates)
        raise DataError(f"task {name!r} is ambiguous in {data_dir}: use one of {options}")
    if not candidates:
        raise TaskNotFound(f"task {name!r} not found in {data_dir} (expected CATEGORY/DATASET/ "
                           "or a task folder)")
    return candidates[0]


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_json(path: Path) -> object:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raise DataError(f"{path}: starts with a UTF-8 byte-order mark; save it without one")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path}: not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start})"
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: malformed JSON at line {err.lineno} column {err.colno}") from None
    except RecursionError:  # e.g. [[[[...]]]] thousands deep: no benchmark file looks so
        raise DataError(f"{path}: JSON nested too deeply to read (expected a flat list of "
                        "rows or labels)") from None


def read_labels(path: Path) -> list[str]:
    labels = read_json(path)
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise DataError(f"{path}: expected a non-empty JSON list of label strings")
    for index, label in enumerate(labels):
        if not label.strip():
            raise DataError(f"{path}: label {index} is empty")
        if "\ufeff" in label:
            raise DataError(f"{path}: label {index} ({label!r}) holds a byte-order mark")
        if label.strip() in (x.strip() for x in labels[:index]):
            raise DataError(f"{path}: label {label!r} is listed twice")
    return labels


def read_split(
    path: Path, labels: list[str], keep_unlabelled: bool = False
) -> tuple[list[dict[str, str]], int]:
    """Validated rows of one split, and how many rows had a label outside ``labels``.

    Those rows are left out, or kept with ``keep_unlabelled`` (scored as wrong later).
    """
    rows = read_json(path)
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of {{sentence, label}} objects")
    if not rows:
        raise DataError(f"{path}: the split is empty")
    known = set(labels)
    kept, skipped = [], 0
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {index} is not an object")
        for key in ("sentence", "label"):
            if not isinstance(row.get(key), str):
                raise DataError(f"{path}: row {index} has no string {key!r}")
        if row["label"] not in known:
            skipped += 1
            if not keep_unlabelled:
                continue
        kept.append({"sentence": row["sentence"], "label": row["label"]})
    if skipped == len(rows):
        raise DataError(f"{path}: no row has a label listed in labels.json")
    return kept, skipped


def stratified_sample(rows: list[dict[str, str]], n: int | None, seed: int) -> list[dict[str, str]]:
    """``n`` rows drawn per label in proportion to its frequency (seeded); all if n is None."""
    if n is None or n >= len(rows):
        return list(rows)
    if n <= 0:
        raise DataError(f"subsample size must be positive, got {n}")
    rng = random.Random(seed)
    by_label: dict[str, list[int]] = defaultdict(list)
    for index, row in enumerate(rows):
        by_label[row["label"]].append(index)
    # Largest-remainder allocation keeps the label mix and sums to exactly n.
    quotas = {label: n * len(idx) / len(rows) for label, idx in by_label.items()}
    counts = {label: int(q) for label, q in quotas.items()}
    by_remainder = sorted(quotas, key=lambda lab: (quotas[lab] - counts[lab], lab), reverse=True)
    for label in by_remainder[: n - sum(counts.values())]:
        counts[label] += 1
    chosen = [i for label in sorted(by_label) for i in rng.sample(by_label[label], counts[label])]
    rng.shuffle(chosen)
    return [rows[i] for i in chosen]


# The validation split is the same for every run of a task, whatever its seed: a study's grid
# points and seeds are all scored on the same rows (paired), and a rerun carves it again.
VALIDATION_SEED = 0


def carve_validation(
    rows: list[dict[str, str]], size: int, where: str
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(validation, rest) of a task's training rows: ``size`` rows drawn stratified by label
    with ``VALIDATION_SEED``, and every other row in its original order."""
    if size >= len(rows):
        raise DataError(f"{where}: a validation split of {size} rows leaves none of its "
                        f"{len(rows)} rows to train on; lower validation_per_task")
    held = stratified_sample([{**r, "_i": str(i)} for i, r in enumerate(rows)], size,
                             VALIDATION_SEED)
    taken = {int(r["_i"]) for r in held}
    validation = [{"sentence": r["sentence"], "label": r["label"]} for r in held]
    return validation, [r for i, r in enumerate(rows) if i not in taken]


def load_classification(
    folder: Path,
    category: str,
    dataset: str,
    train_per_task: int | None = None,
    test_per_task: int | None = None,
    seed: int = 42,
    splits: tuple[str, ...] = ("train", "test"),
    instructions: Mapping[str, str] | None = None,
    count_unlabelled: bool = False,
    eval_split: str = "test",
    validation_per_task: int | None = None,
) -> Task:
    """A classification task (``CATEGORY/DATASET/{train,test,labels}.json``), see
    ``nlora.families.load_task``."""
    labels = read_labels(folder / "labels.json")
    task = Task(name=f"{category}/{dataset}", category=category, dataset=dataset, labels=labels)
    sizes = {"train": train_per_task, "test": test_per_task}
    carved: dict[str, list[dict[str, str]]] = {}
    if eval_split == "validation" and "test" in splits:
        rows, skipped = read_split(folder / "train.json", labels)
        size = validation_per_task or test_per_task or max(1, len(rows) // 10)
        carved["test"], carved["train"] = carve_validation(rows, size, f"{folder / 'train.json'}")
        carved["skipped"] = skipped  # type: ignore[assignment]
        task.validation = {"source": "train.json", "rows": len(carved["test"]),
                           "seed": VALIDATION_SEED, "stratified": True}
        sizes["test"] = None  # the validation split is scored whole
    for split in splits:
        keep = count_unlabelled and split == "test"
        if carved:
            rows, skipped = carved[split], carved["skipped"] if split == "train" else 0
        else:
            rows, skipped = read_split(folder / f"{split}.json", labels, keep_unlabelled=keep)
        if sizes[split] is not None and sizes[split] > len(rows):
            task.capped[split] = (sizes[split], len(rows))
        rows = stratified_sample(rows, sizes[split], seed)
        prompt = lambda sentence: build_prompt(  # noqa: E731
            category, dataset, labels, sentence, instructions
        )
        examples = [Example(r["sentence"], r["label"], prompt(r["sentence"])) for r in rows]
        setattr(task, split, examples)
        task.skipped[split] = 0 if keep else skipped
        task.unlabelled[split] = sum(r["label"] not in labels for r in rows)
    return task
