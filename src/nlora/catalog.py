"""What a data folder holds: every task, its family, labels or metric, split sizes, rows left
out and why, and whether it has an instruction (``nlora tasks``).

Each task is read by the same loader as a run (its family's, ``nlora.families``), so a bad
file fails here with the same one-line error as ``nlora run``; a user's task folders are
checked whole, and every bad file or row is one line.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from nlora.data import INSTRUCTIONS, read_labels, read_split, task_folders, task_name
from nlora.errors import DataError
from nlora.families import LoadRequest, TaskFamily, TaskFolderProblems, UserTasks, family_of

SPLITS = ("train", "test")


@dataclass
class TaskInfo:
    name: str  # "CATEGORY/DATASET", or "TASK" for a task folder at the top
    category: str
    dataset: str
    labels: list[str]
    rows: dict[str, int | None] = field(default_factory=dict)  # split -> rows kept (None: no file)
    left_out: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> {label: rows}
    family: str = "classification"
    metric: str = "accuracy"
    max_new_tokens: int | None = None  # generation tasks' answer length
    instruction: bool | None = None  # generation tasks: whether the prompt has one

    @property
    def has_instruction(self) -> bool:
        if self.instruction is not None:
            return self.instruction
        return self.category in INSTRUCTIONS


def _left_out_labels(path: Path, labels: list[str]) -> dict[str, int]:
    rows = json.loads(path.read_text(encoding="utf-8"))  # already validated by read_split
    known = set(labels)
    return dict(sorted(Counter(r["label"] for r in rows if r["label"] not in known).items()))


def describe_task(folder: Path) -> TaskInfo:
    """One ``CATEGORY/DATASET`` classification folder, validated as a run would read it."""
    category, dataset = folder.parent.name, folder.name
    labels = read_labels(folder / "labels.json")
    info = TaskInfo(f"{category}/{dataset}", category, dataset, labels)
    for split in SPLITS:
        path = folder / f"{split}.json"
        if not path.is_file():
            info.rows[split] = None
            continue
        kept, skipped = read_split(path, labels)
        info.rows[split] = len(kept)
        if skipped:
            info.left_out[split] = _left_out_labels(path, labels)
    return info


def describe_generation(family: TaskFamily, folder: Path, category: str) -> TaskInfo:
    """A SuperNI or user task folder, loaded as a run loads it (every split there)."""
    dataset = folder.name
    splits = tuple(s for s, f in zip(SPLITS, family.files, strict=True)
                   if (folder / f).is_file())
    task = family.load(folder, category, dataset, LoadRequest(splits=splits))
    info = TaskInfo(task_name(category, dataset), category, dataset, task.labels,
                    family=family.name, metric=task.metric, max_new_tokens=task.max_new_tokens)
    info.rows = {s: len(getattr(task, s)) if s in splits else None for s in SPLITS}
    sample = (task.test or task.train)[:1]
    info.instruction = bool(sample) and sample[0].prompt.startswith("Definition: ")
    return info


def list_tasks(data_dir: Path) -> list[TaskInfo]:
    """Every task folder under ``data_dir`` (classification folders with a labels.json,
    SuperNI task files, a user's task folders), sorted by name. A user's folders are
    checked whole first: their problems, one line each, raise together."""
    data_dir = Path(data_dir)
    found = []
    for category, dataset in task_folders(data_dir):
        folder = data_dir / category / dataset
        family = family_of(folder)
        if family is not None:
            found.append((category, folder, family))
    if not found:
        raise DataError(
            f"no tasks in {data_dir}: expected CATEGORY/DATASET/{{train,test,labels}}.json, "
            "NI task files or task folders with train.jsonl/test.jsonl"
        )
    problems = [p for _, folder, family in found if isinstance(family, UserTasks)
                for p in family.problems(folder)]
    if problems:
        raise TaskFolderProblems(problems)
    infos = [describe_task(folder) if family.name == "classification"
             else describe_generation(family, folder, category)
             for category, folder, family in found]
    return sorted(infos, key=lambda i: i.name)


def format_tasks(infos: list[TaskInfo], data_dir: Path) -> str:
    """The ``nlora tasks`` tables (classification, then generation tasks), then one line per
    task with rows left out or missing."""
    lines = [f"Tasks in {data_dir}", ""]
    notes = []
    labelled = [i for i in infos if i.family == "classification"]
    other = [i for i in infos if i.family != "classification"]
    width = max(len("task"), *(len(i.name) for i in infos)) + 2
    if labelled:
        lines.append(f"{'task':<{width}}{'labels':>7}{'train':>8}{'test':>8}{'left out':>10}"
                     f"  instruction")
    for info in labelled:
        sizes = ["-" if info.rows.get(s) is None else str(info.rows[s]) for s in SPLITS]
        left = sum(sum(c.values()) for c in info.left_out.values())
        lines.append(f"{info.name:<{width}}{len(info.labels):>7}{sizes[0]:>8}{sizes[1]:>8}"
                     f"{left:>10}  {'yes' if info.has_instruction else 'no'}")
        for split, counts in info.left_out.items():
            why = ", ".join(f"{n} labelled {label!r}" for label, n in counts.items())
            notes.append(f"{info.name} {split}: left out {why} (not in labels.json)")
        notes += _missing(info)
        if not info.has_instruction:
            notes.append(f"{info.name}: category {info.category!r} has no instruction "
                         f"(known: {', '.join(INSTRUCTIONS)})")
    if other:
        if labelled:
            lines.append("")
        lines.append(f"{'task':<{width}}{'family':>15}{'metric':>13}{'train':>8}{'test':>8}"
                     f"{'answer':>8}  instruction")
    for info in other:
        sizes = ["-" if info.rows.get(s) is None else str(info.rows[s]) for s in SPLITS]
        answer = "label" if info.max_new_tokens is None else str(info.max_new_tokens)
        lines.append(f"{info.name:<{width}}{info.family:>15}{info.metric:>13}{sizes[0]:>8}"
                     f"{sizes[1]:>8}{answer:>8}  {'yes' if info.has_instruction else 'no'}")
        notes += _missing(info)
    if notes:
        lines += [""] + notes
    return "\n".join(lines)


def _missing(info: TaskInfo) -> list[str]:
    suffix = ".jsonl" if info.family == "user" else ".json"
    missing = [f"{s}{suffix}" for s in SPLITS if info.rows.get(s) is None]
    return [f"{info.name}: no {' or '.join(missing)}; cannot be run"] if missing else []
