"""The run folder: its layout, the config check on resume, the lock, what is finished, reading
it back.

Layout::

    RUN/config.yaml            resolved settings (a different config is refused on resume)
    RUN/.nlora.lock            held (flock) by the run using the folder; holds its PID
    RUN/run.log                log of every run and resume
    RUN/metrics.json           accuracy matrix + AA (mean and pooled) / F.Ra / BWT, the
                               zero-shot row and unseen-task curves, rewritten after each task
    RUN/zero_shot/             the base model on every task before task 1 (when made):
                               predictions.jsonl, done.json
    RUN/tasks/NN-dataset/      one per finished task: adapter/ (PEFT, with loads_on.json:
                               what it must be loaded on), sparse_delta.safetensors (pruned or
                               collision-free updates, nlora.sparse) or the method's own
                               files, predictions.jsonl, done.json (written last: marks the
                               task finished); a joint method (mtl) has one 01-joint/

Every done.json records the versions of the software stack that made it (``versions``), and
metrics.json gathers them per step, so a result can be traced to its stack even when a run
was resumed under another one.
"""

from __future__ import annotations

import errno
import fcntl
import importlib.metadata
import json
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Any

import yaml

from nlora.adapters import read_lora_updates
from nlora.config import RunConfig
from nlora.data import Task
from nlora.errors import ConfigError
from nlora.io import write_json_atomic, write_text_atomic
from nlora.methods.base import ContinualMethod
from nlora.metrics import summarize
from nlora.param_metrics import LoraUpdate, TaskUpdate, update_difference
from nlora.sparse import SPARSE_DELTA_FILE, read_sparse_delta

STACK = ("nlora", "torch", "transformers", "peft", "accelerate")


def software_versions() -> dict[str, str]:
    """The installed versions of nlora and the libraries its numbers depend on."""
    return {name: importlib.metadata.version(name) for name in STACK}


def task_folder(out_dir: Path, index: int, task: Task) -> Path:
    return out_dir / "tasks" / f"{index + 1:02d}-{task.dataset}"


def zero_shot_folder(out_dir: Path) -> Path:
    return out_dir / "zero_shot"


def step_folders(out_dir: Path, tasks: list[Task], joint: bool = False) -> list[Path]:
    """One folder per training step: one per task, or a single one for joint training."""
    if joint:
        return [out_dir / "tasks" / "01-joint"]
    return [task_folder(out_dir, j, task) for j, task in enumerate(tasks)]


LOCK = ".nlora.lock"
LOADS_ON = "loads_on.json"  # in a task's adapter/: what the adapter must be loaded on


def _is_leftover(path: Path) -> bool:
    """nlora's own bookkeeping: the lock, or a temporary file/folder of an atomic write."""
    return path.name == LOCK or (path.name.startswith(".") and path.name.endswith(".tmp"))


def check_out_dir(config: RunConfig, out_dir: Path) -> None:
    """Refuse an unusable ``--out`` before any work (creates nothing).

    A file, a folder holding something other than an nlora run, a run of another config, or
    a place that cannot be written are refused with a line naming the folder.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file, not a folder; choose another --out")
    if out_dir.is_dir():
        _check_config(config, out_dir)
        if not os.access(out_dir, os.W_OK | os.X_OK):
            raise ConfigError(f"cannot write to --out {out_dir}: permission denied")
        return
    parent = out_dir.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"cannot create --out {out_dir}: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot create --out {out_dir}: {parent} is not writable")


def _check_config(config: RunConfig, out_dir: Path) -> None:
    saved = out_dir / "config.yaml"
    if saved.is_file():
        try:
            previous = RunConfig.from_yaml(saved)
        except (ConfigError, TypeError, ValueError, yaml.YAMLError) as err:
            raise ConfigError(f"{saved} is not a readable nlora config ({err})") from None
        changed = previous.differences(config)
        if changed:
            raise ConfigError(
                f"{out_dir} holds a run with a different config ({', '.join(changed)} differ); "
                "use another --out or the same options to resume"
            )
        return
    if any(not _is_leftover(p) for p in out_dir.iterdir()):
        raise ConfigError(f"{out_dir} is not empty and holds no nlora run; choose another --out")


class RunLock:
    """An exclusive lock on a run folder: ``flock`` on RUN/.nlora.lock, which holds the PID.

    The kernel drops a flock when its process dies (even by kill -9), so the lock of a dead
    run is simply taken over; a live holder makes ``acquire`` refuse, naming its PID.
    """

    def __init__(self, out_dir: Path) -> None:
        self.path = Path(out_dir) / LOCK
        self.fd: int | None = None
        self.taken_over_from = ""  # the PID line of a dead holder whose lock this took over
        self.removed: list[str] = []  # temporary files of interrupted runs, removed

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown PID"
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ConfigError(
                    f"{self.path.parent} is in use by another nlora run (PID {holder}); "
                    "wait for it to finish or choose another --out"
                ) from None
            raise ConfigError(f"cannot lock {self.path}: {err.strerror}") from None
        self.taken_over_from = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # an empty lock file: nobody to take over from
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def open_run_dir(config: RunConfig, out_dir: Path) -> RunLock:
    """Create (or reopen) ``out_dir``, lock it, check its config, remove the temporary files
    an interrupted run left, and write config.yaml if it is new. Returns the held lock."""
    out_dir = Path(out_dir)
    check_out_dir(config, out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create --out {out_dir}: {err.strerror}") from None
    lock = RunLock(out_dir)
    lock.acquire()
    try:
        _check_config(config, out_dir)  # again, now that nobody else can write here
        for leftover in sorted(out_dir.rglob(".*.tmp")):
            if not leftover.exists() and not leftover.is_symlink():
                continue  # inside a leftover folder already removed
            lock.removed.append(str(leftover.relative_to(out_dir)))
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover)
            else:
                leftover.unlink(missing_ok=True)
        if not (out_dir / "config.yaml").is_file():
            write_text_atomic(out_dir / "config.yaml", config.to_yaml())
    except BaseException:
        lock.release()
        raise
    return lock


def is_run_dir(path: Path | str) -> bool:
    return (Path(path) / "config.yaml").is_file()


def require_run_dir(path: Path | str) -> Path:
    """``path`` if it is an nlora run folder, else a one-line error."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path} is not a folder (expected an nlora run folder)")
    if not is_run_dir(path):
        raise ConfigError(f"{path} is not an nlora run folder (no config.yaml)")
    return path


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
    versions: dict[str, dict[str, str]] = {}
    for j, folder in enumerate(folders[:finished]):
        record = json.loads((folder / "done.json").read_text(encoding="utf-8"))
        for name, acc in record["accuracy"].items():
            matrix[names.index(name)][j] = acc
        last_counts = record.get("counts") or {}
        versions[folder.name] = record.get("versions")
    metrics: dict[str, Any] = {
        "tasks": names, "finished": finished, "eval_mode": eval_mode, "scorer": scorer,
        "accuracy": matrix,
    }
    zero = zero_shot_folder(out_dir) / "done.json"
    if zero.is_file():
        record = json.loads(zero.read_text(encoding="utf-8"))
        metrics["zero_shot"] = [record["accuracy"].get(name) for name in names]
        versions = {zero.parent.name: record.get("versions"), **versions}
    metrics["versions"] = versions  # per step: a resume may have run under another stack
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


def load_task_updates(
    run_dir: Path | str, cumulative: bool = False
) -> list[dict[str, TaskUpdate]]:
    """Every finished task's update, in training order, up to the first without one: its
    sparse delta (``sparse_delta.safetensors``) where it saved one, else its LoRA adapter.

    ``cumulative``: each saved adapter holds all updates so far (SeqLoRA), so task t's own
    update is its adapter minus task t-1's (kept factored, rank 2r).
    """
    updates: list[dict[str, TaskUpdate]] = []
    for folder in finished_task_dirs(run_dir):
        adapter = folder / "adapter"
        if (folder / SPARSE_DELTA_FILE).is_file():
            updates.append(dict(read_sparse_delta(folder / SPARSE_DELTA_FILE)))
        elif (adapter / "adapter_model.safetensors").is_file():
            updates.append(dict(read_lora_updates(adapter)))
        elif len(named := sorted(adapter.glob("*/adapter_model.safetensors"))) == 1:
            updates.append(dict(read_lora_updates(named[0].parent)))  # a named adapter
        else:
            break
    if not cumulative:
        return updates
    adapters, updates = updates, updates[:1]
    for previous, current in zip(adapters, adapters[1:], strict=False):
        updates.append({m: update_difference(u, previous[m]) for m, u in current.items()
                        if isinstance(u, LoraUpdate)})
    return updates


def read_metrics(run_dir: Path | str) -> dict[str, Any]:
    """A run folder's metrics.json: tasks, accuracy matrix, and AA / F.Ra / BWT once finished."""
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        raise ConfigError(f"{run_dir} has no metrics.json (not an nlora run, or no task done)")
    return json.loads(path.read_text(encoding="utf-8"))


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


def write_record(folder: Path, lines: list[str], record: dict[str, Any]) -> None:
    """A finished step's predictions.jsonl and, last, its done.json (the mark of a finished
    step), stamped with the software versions that made it."""
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / "predictions.jsonl", "\n".join(lines) + "\n")
    record = {**record, "versions": software_versions()}
    write_json_atomic(folder / "done.json", record)  # last: marks the step finished


def record_adapter_base(
    out_dir: Path, folder: Path, index: int, tasks: list[Task], config: RunConfig,
    method: ContinualMethod,
) -> None:
    """Write ``adapter/loads_on.json``: what the task's adapter must be loaded on."""
    adapter = folder / "adapter"
    if not adapter.is_dir():
        return
    earlier = step_folders(out_dir, tasks, method.joint)[:index] if method.merges_earlier else []
    write_json_atomic(adapter / LOADS_ON, {
        "base_model": config.model,
        "merge_first": [str((f / "adapter").relative_to(out_dir)) for f in earlier],
        "method": config.method,
        "task": index + 1,
        "note": (
            "load on the base model with the adapters of merge_first merged in order"
            if earlier else "load on the base model"
        ) + f"; or: nlora load RUN --task {index + 1}",
    })
