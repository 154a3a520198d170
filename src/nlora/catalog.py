"""What a data folder holds: every task, its category, labels, split sizes, rows left out and
why, and whether its category has an instruction (``nlora tasks``).

Each split is read by the same validation as a run (``nlora.data.read_split``), so a bad file
fails here with the same one-line error as ``nlora run``.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from nlora.data import INSTRUCTIONS, _subdirs, read_labels, read_split
from nlora.errors import DataError

SPLITS = ("train", "test")


@dataclass
class TaskInfo:
    name: str  # "CATEGORY/DATASET"
    category: str
    dataset: str
    labels: list[str]
    rows: dict[str, int | None] = field(default_factory=dict)  # split -> rows kept (None: no file)
    left_out: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> {label: rows}

    @property
    def has_instruction(self) -> bool:
        return self.category in INSTRUCTIONS


def _left_out_labels(path: Path, labels: list[str]) -> dict[str, int]:
    rows = json.loads(path.read_text(encoding="utf-8"))  # already validated by read_split
    known = set(labels)
    return dict(sorted(Counter(r["label"] for r in rows if r["label"] not in known).items()))


def describe_task(folder: Path) -> TaskInfo:
    """One ``CATEGORY/DATASET`` folder, validated as a run would read it."""
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


def list_tasks(data_dir: Path) -> list[TaskInfo]:
    """Every ``CATEGORY/DATASET`` folder with a labels.json under ``data_dir``, sorted."""
    data_dir = Path(data_dir)
    folders = [d for c in _subdirs(data_dir) for d in _subdirs(c) if (d / "labels.json").exists()]
    if not folders:
        raise DataError(
            f"no tasks in {data_dir}: expected CATEGORY/DATASET/{{train,test,labels}}.json"
        )
    return [describe_task(folder) for folder in folders]


def format_tasks(infos: list[TaskInfo], data_dir: Path) -> str:
    """The ``nlora tasks`` table, then one line per task with rows left out or missing."""
    width = max(len("task"), *(len(i.name) for i in infos)) + 2
    lines = [f"Tasks in {data_dir}", "",
             f"{'task':<{width}}{'labels':>7}{'train':>8}{'test':>8}{'left out':>10}"
             f"  instruction"]
    notes = []
    for info in infos:
        sizes = ["-" if info.rows.get(s) is None else str(info.rows[s]) for s in SPLITS]
        left = sum(sum(c.values()) for c in info.left_out.values())
        lines.append(f"{info.name:<{width}}{len(info.labels):>7}{sizes[0]:>8}{sizes[1]:>8}"
                     f"{left:>10}  {'yes' if info.has_instruction else 'no'}")
        for split, counts in info.left_out.items():
            why = ", ".join(f"{n} labelled {label!r}" for label, n in counts.items())
            notes.append(f"{info.name} {split}: left out {why} (not in labels.json)")
        missing = [f"{s}.json" for s in SPLITS if info.rows.get(s) is None]
        if missing:
            notes.append(f"{info.name}: no {' or '.join(missing)}; cannot be run")
        if not info.has_instruction:
            notes.append(f"{info.name}: category {info.category!r} has no instruction "
                         f"(known: {', '.join(INSTRUCTIONS)})")
    if notes:
        lines += [""] + notes
    return "\n".join(lines)
