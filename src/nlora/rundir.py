"""The run folder: its layout, the config check on resume, what is finished, reading it back.

Layout::

    RUN/config.yaml            resolved settings (a different config is refused on resume)
    RUN/run.log                log of every run and resume
    RUN/metrics.json           accuracy matrix + AA (mean and pooled) / F.Ra / BWT, the
                               zero-shot row and unseen-task curves, rewritten after each task
    RUN/zero_shot/             the base model on every task before task 1 (when made):
                               predictions.jsonl, done.json
    RUN/tasks/NN-dataset/      one per finished task: adapter/ (PEFT) or the method's own
                               files, predictions.jsonl, done.json (written last: marks
                               the task finished); a joint method (mtl) has one 01-joint/
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
from nlora.param_metrics import LoraUpdate


def task_folder(out_dir: Path, index: int, task: Task) -> Path:
    return out_dir / "tasks" / f"{index + 1:02d}-{task.dataset}"


def zero_shot_folder(out_dir: Path) -> Path:
    return out_dir / "zero_shot"


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
    out_dir: Path,
    tasks: list[Task],
    joint: bool = False,
    eval_mode: str = "generate",
    scorer: str | None = None,
) -> dict[str, Any]:
    """metrics.json content from the done.json of every finished step (joint: one column).

    Besides the matrix: ``zero_shot`` (the base model's accuracy per task, when the run made
    that row), ``unseen`` (each task's accuracy after every step before it was trained, when
    tasks were evaluated before training: ``--eval-on all``), and in the summary
    ``AA_pooled``, the share of all final test rows answered correctly (the released code's
    headline figure), next to ``AA`` (per-task mean, paper eq. 5).
    """
    names = [t.name for t in tasks]
    folders = step_folders(out_dir, tasks, joint)
    matrix: list[list[float | None]] = [[None] * len(folders) for _ in tasks]
    finished = finished_tasks(out_dir, tasks, joint)
    last_counts: dict[str, list[int]] = {}
    for j, folder in enumerate(folders[:finished]):
        record = json.loads((folder / "done.json").read_text(encoding="utf-8"))
        for name, acc in record["accuracy"].items():
            matrix[names.index(name)][j] = acc
        last_counts = record.get("counts") or {}
    metrics: dict[str, Any] = {
        "tasks": names, "finished": finished, "eval_mode": eval_mode, "scorer": scorer,
        "accuracy": matrix,
    }
    zero = zero_shot_folder(out_dir) / "done.json"
    if zero.is_file():
        record = json.loads(zero.read_text(encoding="utf-8"))
        metrics["zero_shot"] = [record["accuracy"].get(name) for name in names]
    if not joint:
        unseen = {
            name: [matrix[i][j] if j < i else None for j in range(len(folders))]
            for i, name in enumerate(names)
        }
        unseen = {k: v for k, v in unseen.items() if any(x is not None for x in v)}
        if unseen:
            metrics["unseen"] = unseen
    if finished == len(folders):
        metrics["summary"] = summarize(matrix)
        if last_counts and all(name in last_counts for name in names):
            right = sum(last_counts[name][0] for name in names)
            rows = sum(last_counts[name][1] for name in names)
            metrics["summary"]["AA_pooled"] = 100.0 * right / rows
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


def load_task_updates(run_dir: Path | str) -> list[dict[str, LoraUpdate]]:
    """Every finished task's LoRA adapter, in training order, up to the first without one."""
    updates = []
    for folder in finished_task_dirs(run_dir):
        adapter = folder / "adapter"
        if not (adapter / "adapter_model.safetensors").is_file():
            break
        updates.append(read_lora_updates(adapter))
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
