"""Kinds of task ("families"): each defines, in one place, how its tasks are found on disk,
read and validated, how their prompts are built, how long their answers may be, and which
metric scores them (``nlora.scoring``).

- ``classification``: the O-LoRA / N-LoRA ``CL_Benchmark`` layout,
  ``CATEGORY/DATASET/{train,test,labels}.json``; the paper's prompt; answers as long as the
  longest label + 1 token; accuracy over the label set (``nlora.data``).
- ``superni``: Natural-Instructions task files, ``CATEGORY/TASK/{train,test}.json`` each one
  NI task object (``Definition``, ``Instances`` of ``{id, input, output: [references]}``), read
  unchanged; the prompt of the post-N-LoRA releases (SAPT, InfLoRA/GainLoRA); source 512,
  target 50 and generation 50 tokens; ROUGE-L (docs/benchmarks.md).
- ``user``: a user's task folder, ``TASK/{train,test}.jsonl`` (optional ``validation.jsonl``)
  of ``{"input": ..., "output": str or [references]}`` with an optional ``task.yaml``
  (instruction, metric, labels, lengths); every problem is one line naming file and row.

A folder's family is decided by the files it holds (``family_of``), never by its name;
``load_task`` reads any task through its family.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from nlora.data import (
    VALIDATION_SEED,
    Example,
    Task,
    TaskNotFound,
    load_classification,
    read_json,
    resolve_task,
    task_name,
)
from nlora.errors import ConfigError, DataError

SPLITS = ("train", "test")
# SuperNI protocol of the releases (GainLoRA's scripts and data loader; CL_Benchmark/README.md)
SUPERNI_SOURCE_LENGTH = 512
SUPERNI_TARGET_LENGTH = 50
SUPERNI_GENERATION_LENGTH = 50


@dataclass(frozen=True)
class LoadRequest:
    """What a run asks of a task's loader (``nlora.data.load_task``'s arguments)."""

    train_per_task: int | None = None
    test_per_task: int | None = None
    seed: int = 42
    splits: tuple[str, ...] = SPLITS
    instructions: Mapping[str, str] | None = None
    count_unlabelled: bool = False
    eval_split: str = "test"
    validation_per_task: int | None = None
    references: str = "all"


def superni_prompt(definition: str, text: str) -> str:
    """The releases' zero-shot SuperNI prompt, byte for byte (GainLoRA's data collator):
    ``Definition: `` + the definition stripped + a blank line + ``Now complete the following
    example -`` + ``Input: `` + the input as it is + ``Output: `` (trailing space)."""
    return (
        "Definition: " + definition.strip() + "\n\n"
        + "Now complete the following example -\n"
        + "Input: " + text + "\n" + "Output: "
    )


def user_prompt(instruction: str | None, text: str) -> str:
    """A user task's prompt: the SuperNI prompt with the task's instruction as definition,
    or ``Input: ...`` / ``Output: `` alone without one."""
    if instruction:
        return superni_prompt(instruction, text)
    return "Input: " + text + "\n" + "Output: "


def draw_references(rows: Sequence[Sequence[str]], seed: int, key: str) -> list[str]:
    """One reference per row, drawn as the releases do (one random choice per row at load),
    seeded by the run's seed and ``key`` (task and split), so a rerun draws the same ones."""
    rng = random.Random(f"{seed}:{key}")
    return [refs[0] if len(refs) == 1 else rng.choice(list(refs)) for refs in rows]


def random_subsample(rows: list[Any], n: int | None, seed: int) -> list[Any]:
    """``n`` rows drawn without replacement (seeded), in file order; all if n is None."""
    if n is None or n >= len(rows):
        return list(rows)
    if n <= 0:
        raise DataError(f"subsample size must be positive, got {n}")
    keep = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in keep]


def carve_random(rows: list[Any], size: int, where: str) -> tuple[list[Any], list[Any]]:
    """(validation, rest): ``size`` rows drawn with ``VALIDATION_SEED`` (no labels to
    stratify by), the rest in file order."""
    if size >= len(rows):
        raise DataError(f"{where}: a validation split of {size} rows leaves none of its "
                        f"{len(rows)} rows to train on; lower validation_per_task")
    held = set(random.Random(VALIDATION_SEED).sample(range(len(rows)), size))
    return ([r for i, r in enumerate(rows) if i in held],
            [r for i, r in enumerate(rows) if i not in held])


class TaskFamily:
    """A kind of task. Subclasses set ``name`` and ``files`` and implement ``load``."""

    name = ""
    files: tuple[str, str] = ("train.json", "test.json")  # the train and test split files

    def owns(self, folder: Path) -> bool:
        raise NotImplementedError

    def is_runnable(self, folder: Path) -> bool:
        """Both split files are there (a run needs a train and a test split)."""
        return all((folder / f).is_file() for f in self.files)

    def load(self, folder: Path, category: str, dataset: str, request: LoadRequest) -> Task:
        raise NotImplementedError


class Classification(TaskFamily):
    name = "classification"

    def owns(self, folder: Path) -> bool:
        return (folder / "labels.json").is_file()

    def load(self, folder: Path, category: str, dataset: str, request: LoadRequest) -> Task:
        return load_classification(
            folder, category, dataset, request.train_per_task, request.test_per_task,
            request.seed, request.splits, request.instructions, request.count_unlabelled,
            request.eval_split, request.validation_per_task,
        )


@dataclass
class _Rows:
    """A generation task's rows of one split: input texts and their references."""

    inputs: list[str]
    references: list[tuple[str, ...]]


def _generation_task(
    category: str, dataset: str, family: str, metric: str, prompt: Callable[[str], str],
    read: Callable[[str], _Rows], request: LoadRequest, max_target: int | None,
    max_new_tokens: int, labels: list[str] | None = None, train_file: str = "train.json",
) -> Task:
    """Split reading, validation carving, subsampling, reference drawing and prompting, the
    same for every generation family (``read(split)``: that split's rows)."""
    task = Task(name=task_name(category, dataset), category=category, dataset=dataset,
                labels=list(labels or []), family=family, metric=metric,
                max_new_tokens=max_new_tokens)
    sizes = {"train": request.train_per_task, "test": request.test_per_task}
    rows: dict[str, list[tuple[str, tuple[str, ...], str]]] = {}
    wanted = set(request.splits)
    carve = request.eval_split == "validation" and "test" in wanted
    for split in ("train", "test"):
        if split not in wanted and not (carve and split == "train"):
            continue
        if carve and split == "test":
            continue
        data = read(split)
        # the reference drawn per row depends on the seed, task and split only (not on the
        # data folder's path, nor on the subsample taken later)
        drawn = draw_references(data.references, request.seed, f"{task.name}/{split}")
        rows[split] = list(zip(data.inputs, data.references, drawn, strict=True))
    if carve:
        size = (request.validation_per_task or request.test_per_task
                or max(1, len(rows["train"]) // 10))
        rows["test"], rows["train"] = carve_random(rows["train"], size,
                                                   f"{task.name} {train_file}")
        task.validation = {"source": train_file, "rows": len(rows["test"]),
                           "seed": VALIDATION_SEED, "stratified": False}
        sizes["test"] = None
    for split in request.splits:
        have = rows[split]
        if sizes[split] is not None and sizes[split] > len(have):
            task.capped[split] = (sizes[split], len(have))
        have = random_subsample(have, sizes[split], request.seed)
        examples = [
            Example(text, drawn, prompt(text), references=refs, max_target=max_target)
            for text, refs, drawn in have
        ]
        setattr(task, split, examples)
        task.skipped[split] = 0
        task.unlabelled[split] = 0
    return task


class SuperNI(TaskFamily):
    name = "superni"

    def owns(self, folder: Path) -> bool:
        return not (folder / "labels.json").is_file() and any(
            (folder / f).is_file() for f in self.files)

    @staticmethod
    def read(path: Path) -> tuple[str, _Rows]:
        """A Natural-Instructions task file: (definition, rows), validated."""
        data = read_json(path)
        if not isinstance(data, dict):
            raise DataError(f"{path}: expected a Natural-Instructions task object "
                            "(Definition, Instances)")
        definition = data.get("Definition")
        if not (isinstance(definition, list) and definition and isinstance(definition[0], str)
                and definition[0].strip()):
            raise DataError(f"{path}: Definition is not a list holding an instruction string")
        instances = data.get("Instances")
        if not isinstance(instances, list) or not instances:
            raise DataError(f"{path}: Instances is missing or empty")
        inputs, references = [], []
        for index, row in enumerate(instances):
            if not isinstance(row, dict):
                raise DataError(f"{path}: instance {index} is not an object")
            if not isinstance(row.get("input"), str):
                raise DataError(f"{path}: instance {index} has no string 'input'")
            output = row.get("output")
            if isinstance(output, str):  # three released tasks (sst2, sentiment140, emotion)
                output = [output]
            if not (isinstance(output, list) and output
                    and all(isinstance(o, str) for o in output)):
                raise DataError(f"{path}: instance {index}: 'output' is neither a string nor "
                                "a non-empty list of reference strings")
            inputs.append(row["input"])
            references.append(tuple(output))
        return definition[0], _Rows(inputs, references)

    def load(self, folder: Path, category: str, dataset: str, request: LoadRequest) -> Task:
        definitions: dict[str, str] = {}

        def read(split: str) -> _Rows:
            definitions[split], rows = self.read(folder / f"{split}.json")
            return rows

        task = _generation_task(
            category, dataset, self.name, "rougeL",
            lambda text: superni_prompt(definitions.get("train") or definitions["test"], text),
            read, request, SUPERNI_TARGET_LENGTH, SUPERNI_GENERATION_LENGTH,
        )
        if len(set(definitions.values())) > 1:
            raise DataError(f"{folder}: train.json and test.json hold different Definitions")
        return task


# --------------------------------------------------------------------------------------------
# A user's task folders
# --------------------------------------------------------------------------------------------

USER_METRICS = ("exact_match", "rougeL", "accuracy")  # nlora.scoring.METRICS
USER_KEYS = ("instruction", "metric", "labels", "max_target_length", "max_new_tokens")
USER_DEFAULT_LENGTH = 50  # target and generation tokens when task.yaml names none (SuperNI's)


@dataclass
class UserSettings:
    instruction: str | None = None
    metric: str = "exact_match"
    labels: list[str] | None = None
    max_target_length: int = USER_DEFAULT_LENGTH
    max_new_tokens: int = USER_DEFAULT_LENGTH


def _text(path: Path, problems: list[str]) -> str | None:
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        problems.append(f"{path}: starts with a UTF-8 byte-order mark; save it without one")
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        problems.append(f"{path}: not UTF-8 text (byte 0x{raw[err.start]:02x} at offset "
                        f"{err.start}); save it as UTF-8")
        return None


def read_task_yaml(path: Path, problems: list[str]) -> UserSettings:
    """task.yaml's settings; each bad key is one line in ``problems``."""
    settings = UserSettings()
    if not path.is_file():
        return settings
    text = _text(path, problems)
    if text is None:
        return settings
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problems.append(f"{path}: malformed YAML{where}")
        return settings
    if data is None:
        return settings
    if not isinstance(data, dict):
        problems.append(f"{path}: expected a mapping of {', '.join(USER_KEYS)}")
        return settings
    for key in data:
        if key not in USER_KEYS:
            problems.append(f"{path}: unknown key {key!r} (keys: {', '.join(USER_KEYS)})")
    instruction = data.get("instruction")
    if instruction is not None:
        if isinstance(instruction, str) and instruction.strip():
            settings.instruction = instruction
        else:
            problems.append(f"{path}: instruction must be a non-empty string")
    metric = data.get("metric", settings.metric)
    if metric not in USER_METRICS:
        problems.append(f"{path}: unknown metric {metric!r} (one of {', '.join(USER_METRICS)})")
    else:
        settings.metric = metric
    labels = data.get("labels")
    if labels is not None:
        if (isinstance(labels, list) and labels
                and all(isinstance(x, str) and x.strip() for x in labels)):
            settings.labels = labels
        else:
            problems.append(f"{path}: labels must be a non-empty list of strings")
    for key in ("max_target_length", "max_new_tokens"):
        value = data.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(f"{path}: {key} must be a whole number of tokens, at least 1")
        else:
            setattr(settings, key, value)
    return settings


def read_jsonl(path: Path, problems: list[str]) -> _Rows:
    """The rows of one ``.jsonl`` split; each bad line is one line in ``problems``."""
    rows = _Rows([], [])
    text = _text(path, problems)
    if text is None:
        return rows
    lines = text.splitlines()
    if not any(line.strip() for line in lines):
        problems.append(f"{path}: the file is empty (one JSON object per line expected)")
        return rows
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}: row {number}"
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            problems.append(f"{where}: not a JSON object")
            continue
        if not isinstance(row, dict):
            problems.append(f"{where}: not a JSON object")
            continue
        if not isinstance(row.get("input"), str):
            problems.append(f"{where}: no string 'input'")
            continue
        if "output" not in row:
            problems.append(f"{where}: no 'output'")
            continue
        output = row["output"]
        refs = [output] if isinstance(output, str) else output
        if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
            problems.append(f"{where}: 'output' must be a string or a list of strings")
            continue
        if not refs:
            problems.append(f"{where}: 'output' is an empty list (give at least one reference)")
            continue
        if not all(r.strip() for r in refs):
            problems.append(f"{where}: 'output' holds an empty answer")
            continue
        rows.inputs.append(row["input"])
        rows.references.append(tuple(refs))
    return rows


class TaskFolderProblems(DataError):
    """A user's task folder with problems: ``problems`` lists every one, one line each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        more = f" (and {len(problems) - 1} more: nlora tasks --data DIR lists them)" \
            if len(problems) > 1 else ""
        super().__init__(problems[0] + more)


class UserTasks(TaskFamily):
    name = "user"
    files = ("train.jsonl", "test.jsonl")

    def owns(self, folder: Path) -> bool:
        return any((folder / f).is_file() for f in (*self.files, "task.yaml"))

    def read(self, folder: Path) -> tuple[UserSettings, dict[str, _Rows], list[str]]:
        """task.yaml and every split there, and every problem found, one line each."""
        problems: list[str] = []
        settings = read_task_yaml(folder / "task.yaml", problems)
        splits: dict[str, _Rows] = {}
        for split in ("train", "test", "validation"):
            path = folder / f"{split}.jsonl"
            if path.is_file():
                splits[split] = read_jsonl(path, problems)
            elif split != "validation":
                problems.append(f"{path}: file not found")
        if settings.metric == "accuracy":
            labels = settings.labels
            for split, rows in splits.items():
                for number, refs in enumerate(rows.references, start=1):
                    if len(refs) > 1:
                        problems.append(f"{folder / f'{split}.jsonl'}: row {number}: accuracy "
                                        "over labels takes one label per row, not a list")
                    elif labels is not None and refs[0] not in labels:
                        problems.append(f"{folder / f'{split}.jsonl'}: row {number}: label "
                                        f"{refs[0]!r} is not in task.yaml's labels")
        return settings, splits, problems

    def problems(self, folder: Path) -> list[str]:
        return self.read(folder)[2]

    def load(self, folder: Path, category: str, dataset: str, request: LoadRequest) -> Task:
        settings, splits, problems = self.read(folder)
        if problems:
            raise TaskFolderProblems(problems)
        labels = None
        if settings.metric == "accuracy":
            labels = settings.labels or sorted({r[0] for r in splits["train"].references})
        # the folder's own validation.jsonl, where there is one, is its validation split
        own = request.eval_split == "validation" and "validation" in splits

        def read(split: str) -> _Rows:
            return splits["validation" if own and split == "test" else split]

        task = _generation_task(
            category, dataset, self.name, settings.metric,
            lambda text: user_prompt(settings.instruction, text), read,
            replace(request, eval_split="test") if own else request,
            settings.max_target_length, settings.max_new_tokens, labels,
            train_file="train.jsonl",
        )
        if settings.metric == "accuracy":
            task.max_new_tokens = None  # longest label + 1, as classification
        if own:
            task.validation = {"source": "validation.jsonl", "rows": len(task.test)}
        return task


FAMILIES: dict[str, TaskFamily] = {f.name: f for f in (Classification(), SuperNI(), UserTasks())}


def family_of(folder: Path) -> TaskFamily | None:
    """The family whose files ``folder`` holds: labels.json (classification) first, then
    ``.jsonl`` splits or task.yaml (a user's), then NI task files (SuperNI); None if none."""
    for name in ("classification", "user", "superni"):
        if FAMILIES[name].owns(folder):
            return FAMILIES[name]
    return None


def load_task(
    data_dir: Path,
    name: str,
    train_per_task: int | None = None,
    test_per_task: int | None = None,
    seed: int = 42,
    splits: tuple[str, ...] = ("train", "test"),
    instructions: Mapping[str, str] | None = None,
    count_unlabelled: bool = False,
    eval_split: str = "test",
    validation_per_task: int | None = None,
    references: str = "all",
) -> Task:
    """Load, validate, subsample and prompt one task, as its family reads it
    (``nlora.families``: classification, SuperNI, a user's task folder).

    ``instructions``: category -> instruction (default: the paper's). ``count_unlabelled``
    keeps test rows whose label is not in labels.json (counted in ``unlabelled``, not
    ``skipped``). ``references`` (generation tasks): score against all of a row's references
    (``all``) or the one drawn at load (``drawn``, the releases).

    ``eval_split="validation"``: ``task.test`` is a validation split carved from the training
    rows (``carve_validation``) and training subsamples only the rest; test.json is never
    opened.
    """
    if eval_split not in ("test", "validation"):
        raise ConfigError(f"eval_split must be test or validation, got {eval_split!r}")
    category, dataset = resolve_task(data_dir, name)
    folder = data_dir / category / dataset
    family = family_of(folder)
    if family is None:
        raise DataError(f"{folder}: not a task folder (no labels.json, NI task files "
                        "train.json/test.json, or train.jsonl/test.jsonl)")
    request = LoadRequest(train_per_task, test_per_task, seed, splits, instructions,
                          count_unlabelled, eval_split, validation_per_task, references)
    return family.load(folder, category, dataset, request)


def task_is_available(data_dir: Path, name: str) -> bool:
    """True when the task resolves and has both a train and a test split (a name found in
    several categories is an error: ambiguous)."""
    try:
        category, dataset = resolve_task(data_dir, name)
    except TaskNotFound:
        return False
    folder = data_dir / category / dataset
    family = family_of(folder)
    return family is not None and family.is_runnable(folder)
