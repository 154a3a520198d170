"""The run folder: its layout, the config check on resume, what is finished, reading it back.

Layout::

    RUN/config.yaml            resolved settings (a different config is refused on resume)
    RUN/run.log                log of every run and resume
    RUN/metrics.json           accuracy matrix + AA / F.Ra / BWT, rewritten after each task
    RUN/tasks/NN-dataset/      one per finished task: adapter/ (PEFT), sparse_delta.safetensors
                               (pruned or collision-free updates, nlora.sparse) or the
                               method's own files, predictions.jsonl, done.json (written
                               last: marks the task finished); a joint method (mtl) has one
                               01-joint/
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from nlora.adapters import read_lora_updates
from nlora.config import RunConfig
from nlora.data import Task
from nlora.errors import ConfigError
from nlora.io import write_text_atomic
from nlora.metrics import summarize
from nlora.param_metrics import TaskUpdate
from nlora.sparse import SPARSE_DELTA_FILE, read_sparse_delta


def task_folder(out_dir: Path, index: int, task: Task) -> Path:
    return out_dir / "tasks" / f"{index + 1:02d}-{task.dataset}"


def step_folders(out_dir: Path, tasks: list[Task], joint: bool = False) -> list[Path]:
    """One folder per training step: one per task, or a single one for joint training."""
    if joint:
        return [out_dir / "tasks" / "01-joint"]
    return [task_folder(out_dir, j, task) for j, task in enumerate(tasks)]


def prepare_run_dir(config: RunConfig, out_dir: Path) -> None:
    """Create ``out_dir`` with config.yaml, or check that it was made by the same config."""
    saved = out_dir / "config.yaml"
    if saved.is_file():
        previous = RunConfig.from_yaml(saved)
        changed = previous.differences(config)
        if changed:
            raise ConfigError(
                f"{out_dir} holds a run with a different config ({', '.join(changed)} differ); "
                "use another --out or the same options to resume"
            )
        return
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"{out_dir} is not empty and holds no nlora run; choose another --out")
    write_text_atomic(saved, config.to_yaml())


def finished_tasks(out_dir: Path, tasks: list[Task], joint: bool = False) -> int:
    """How many steps, from the first, have their done.json (the finished prefix)."""
    count = 0
    for j, folder in enumerate(step_folders(out_dir, tasks, joint)):
        if not (folder / "done.json").is_file():
            break
        count = j + 1
    return count


def collect_metrics(
    out_dir: Path, tasks: list[Task], joint: bool = False, eval_mode: str = "generate"
) -> dict[str, Any]:
    """metrics.json content from the done.json of every finished step (joint: one column)."""
    names = [t.name for t in tasks]
    folders = step_folders(out_dir, tasks, joint)
    matrix: list[list[float | None]] = [[None] * len(folders) for _ in tasks]
    finished = finished_tasks(out_dir, tasks, joint)
    for j, folder in enumerate(folders[:finished]):
        record = json.loads((folder / "done.json").read_text(encoding="utf-8"))
        for name, acc in record["accuracy"].items():
            matrix[names.index(name)][j] = acc
    metrics: dict[str, Any] = {
        "tasks": names, "finished": finished, "eval_mode": eval_mode, "accuracy": matrix
    }
    if finished == len(folders):
        metrics["summary"] = summarize(matrix)
    return metrics


# --------------------------------------------------------------------------------------------
# Reading a run folder back (report, analysis)
# --------------------------------------------------------------------------------------------


def task_dirs(run_dir: Path | str) -> list[Path]:
    """tasks/NN-name folders in training order."""
    root = Path(run_dir) / "tasks"
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and re.match(r"^\d+-", p.name)]
    return sorted(dirs, key=lambda p: int(p.name.split("-", 1)[0]))


def finished_task_dirs(run_dir: Path | str) -> list[Path]:
    """The task folders of the finished prefix: in order, up to the first without done.json."""
    finished = []
    for folder in task_dirs(run_dir):
        if not (folder / "done.json").is_file():
            break
        finished.append(folder)
    return finished


def load_task_updates(run_dir: Path | str) -> list[dict[str, TaskUpdate]]:
    """Every finished task's update, in training order, up to the first without one: its
    sparse delta (``sparse_delta.safetensors``) where it saved one, else its LoRA adapter."""
    updates: list[dict[str, TaskUpdate]] = []
    for folder in finished_task_dirs(run_dir):
        adapter = folder / "adapter"
        if (folder / SPARSE_DELTA_FILE).is_file():
            updates.append(dict(read_sparse_delta(folder / SPARSE_DELTA_FILE)))
        elif (adapter / "adapter_model.safetensors").is_file():
            updates.append(dict(read_lora_updates(adapter)))
        else:
            break
    return updates


def load_run_info(run_dir: Path | str) -> dict[str, Any]:
    """config.yaml and metrics.json of a run folder, as plain dicts (empty where absent)."""
    run_dir = Path(run_dir)
    config: dict[str, Any] = {}
    if (run_dir / "config.yaml").is_file():
        config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
    metrics: dict[str, Any] = {}
    if (run_dir / "metrics.json").is_file():
        metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    return {"config": config, "metrics": metrics}
