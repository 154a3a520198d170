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
import math
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Any

import yaml

from nlora.adapters import read_lora_updates
from nlora.config import RunConfig, read_options
from nlora.data import Task
from nlora.errors import ConfigError, NloraError
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
# nlora writes tensors as safetensors only; a pickle file in a run folder was put there by
# someone else, and unpickling can run code
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


# --------------------------------------------------------------------------------------------
# Reading a run folder's own files: a damaged or crafted one is a line naming it
# --------------------------------------------------------------------------------------------


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is not finite")
    return value


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number nlora writes")


def read_run_json(path: Path) -> dict[str, Any]:
    """A JSON object nlora wrote into a run folder (done.json, metrics.json). Malformed,
    truncated, too deeply nested, not an object, or holding NaN or an infinity: a ConfigError
    naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"), parse_float=_finite,
                          parse_constant=_no_constant)
    except FileNotFoundError:
        raise ConfigError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        why = "nested too deeply" if isinstance(err, RecursionError) else str(err).split("\n")[0]
        raise ConfigError(f"{path} is damaged ({why})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is damaged (a JSON {type(data).__name__}, not an object)")
    return data


def read_done(folder: Path) -> dict[str, Any]:
    """A finished step's done.json, checked: its accuracies (percent per task) and, for a
    training step, its step count. Damage is one line naming the file and the way out."""
    path = folder / "done.json"
    record = read_run_json(path)
    accuracy = record.get("accuracy")
    ok = isinstance(accuracy, dict) and all(
        isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool)
        for k, v in accuracy.items())
    if ok and folder.name != "zero_shot":
        steps = (record.get("train") or {}).get("steps") if isinstance(
            record.get("train"), dict) else None
        ok = isinstance(steps, int) and not isinstance(steps, bool) and steps >= 0
    if not ok:
        raise ConfigError(f"{path} is incomplete (no accuracies or step count); delete "
                          f"{folder} and rerun the run's command to redo that step")
    return record


def inside_run(run_dir: Path, path: Path) -> Path:
    """``path`` resolved (symlinks followed); a ConfigError if it leads outside ``run_dir``."""
    try:
        root, target = Path(run_dir).resolve(strict=True), Path(path).resolve()
    except (OSError, RuntimeError) as err:  # a symlink loop
        raise ConfigError(f"cannot read {path}: {err}") from None
    if not target.is_relative_to(root):
        raise ConfigError(f"{path} leads outside the run folder {run_dir} (to {target}); "
                          "nlora reads a run's files from inside it only")
    return target


def check_step_folder(run_dir: Path, folder: Path) -> None:
    """Refuse a finished step's folder that leads outside the run folder (a symlink, a ``..``
    in a task name of a crafted config.yaml) or that holds a pickle file."""
    inside_run(run_dir, folder)
    for parent, dirs, files in os.walk(folder):  # not into symlinked folders: checked here
        for name in dirs + files:
            path = Path(parent) / name
            if path.is_symlink():
                inside_run(run_dir, path)
            if name.endswith(PICKLE_SUFFIXES):
                raise ConfigError(f"{path} is a pickle file; nlora writes and reads "
                                  "safetensors only (unpickling can run code)")


def restore_step(run_dir: Path, method: Any, model: Any, index: int, task: Task,
                 folder: Path) -> Any:
    """``method.restore_task`` for a finished step, after ``check_step_folder``; a damaged
    file there (truncated, not what the method wrote) is one line naming the folder."""
    check_step_folder(run_dir, folder)
    read_done(folder)  # the mark of a finished step, written last: whole, or the step is not
    try:
        return method.restore_task(model, index, task, folder)
    except NloraError:
        raise
    except Exception as err:  # any library's error on a damaged file: name the folder
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise ConfigError(f"{folder} is damaged: task {index + 1} cannot be restored "
                          f"({type(err).__name__}: {first}); delete that folder and rerun "
                          "the run's command to train the task again") from None


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


def _holds_a_run(folder: Path) -> bool:
    """config.yaml beside what only a run writes (a project's own config.yaml is no run)."""
    return (folder / "config.yaml").is_file() and (
        (folder / "tasks").is_dir() or (folder / "metrics.json").is_file())


def refuse_output_in_run(out: Path, runs: list[Path]) -> None:
    """Refuse an output folder (report, export) that is, or is inside, a run folder: one of
    ``runs`` or any other. Writing there would overwrite or mix with the run's own files."""
    try:
        target = Path(out).resolve()
        roots = [Path(r).resolve() for r in runs]
    except (OSError, RuntimeError) as err:  # a symlink loop
        raise ConfigError(f"--out {out}: {err}") from None
    for folder in (target, *target.parents):
        if folder in roots or _holds_a_run(folder):
            where = "is the run folder" if folder == target else "is inside the run folder"
            raise ConfigError(f"--out {out} {where} {folder}; writing there would overwrite "
                              "the run's own files: choose a folder outside any run")


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
        record = read_done(folder)
        for name, acc in record["accuracy"].items():
            if name not in names:
                raise ConfigError(f"{folder / 'done.json'} scores task {name!r}, which the "
                                  "run does not have")
            matrix[names.index(name)][j] = acc
        last_counts = record.get("counts") or {}
        versions[folder.name] = record.get("versions")
    metrics: dict[str, Any] = {
        "tasks": names, "finished": finished, "eval_mode": eval_mode, "scorer": scorer,
        "accuracy": matrix,
        # the metric of each task's row of the matrix ("accuracy" keeps its key for every
        # metric, so earlier runs read alike): nlora.scoring.METRICS
        "metrics": [t.metric for t in tasks],
    }
    if any(t.metric == "rougeL" for t in tasks):  # exact match (%) beside ROUGE-L
        metrics["exact_match"] = exact = [[None] * len(folders) for _ in tasks]
        for j, folder in enumerate(folders[:finished]):
            for name, value in (read_done(folder).get("exact_match") or {}).items():
                if name in names:
                    exact[names.index(name)][j] = value
    zero = zero_shot_folder(out_dir) / "done.json"
    if zero.is_file():
        record = read_done(zero.parent)
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
        if "exact_match" in metrics:  # mean final exact match, beside AA (mean final ROUGE-L)
            final = [row[-1] for row in metrics["exact_match"]]
            if all(v is not None for v in final):
                metrics["summary"]["EM"] = sum(final) / len(final)
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
        check_step_folder(Path(run_dir), folder)
        adapter = folder / "adapter"
        try:
            if (folder / SPARSE_DELTA_FILE).is_file():
                updates.append(dict(read_sparse_delta(folder / SPARSE_DELTA_FILE)))
            elif (adapter / "adapter_model.safetensors").is_file():
                updates.append(dict(read_lora_updates(adapter)))
            elif len(named := sorted(adapter.glob("*/adapter_model.safetensors"))) == 1:
                updates.append(dict(read_lora_updates(named[0].parent)))  # a named adapter
            elif updates:  # the earlier tasks saved one: this one's is missing
                raise ConfigError(
                    f"{folder} is finished (done.json) but holds no adapter/"
                    f"adapter_model.safetensors or {SPARSE_DELTA_FILE}, which tasks before it "
                    "have; its update cannot be read"
                )
            else:  # a method without weight updates (prompts, full fine-tuning)
                break
        except NloraError:
            raise
        except Exception as err:  # a truncated or foreign file: name it
            first = (str(err).strip().splitlines() or [""])[0][:200]
            raise ConfigError(f"{folder}: its saved update cannot be read "
                              f"({type(err).__name__}: {first})") from None
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
    return _checked_metrics(path, read_run_json(path))


def _number_or_none(value: Any) -> bool:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


def _checked_metrics(path: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    """metrics.json's fields that reports read, each of the shape nlora writes."""
    tasks, accuracy = metrics.get("tasks"), metrics.get("accuracy")
    summary, zero = metrics.get("summary"), metrics.get("zero_shot")
    problems = []
    if tasks is not None and not (isinstance(tasks, list)
                                  and all(isinstance(t, str) for t in tasks)):
        problems.append("tasks is not a list of names")
    if accuracy is not None and not (isinstance(accuracy, list) and all(
            isinstance(row, list) and all(map(_number_or_none, row)) for row in accuracy)):
        problems.append("accuracy is not a matrix of numbers")
    if summary is not None and not (isinstance(summary, dict)
                                    and all(map(_number_or_none, summary.values()))):
        problems.append("summary is not a mapping of numbers")
    if zero is not None and not (isinstance(zero, list) and all(map(_number_or_none, zero))):
        problems.append("zero_shot is not a list of numbers")
    unseen = metrics.get("unseen")
    if unseen is not None and not (isinstance(unseen, dict) and all(
            isinstance(c, list) and all(map(_number_or_none, c)) for c in unseen.values())):
        problems.append("unseen is not a mapping of accuracy curves")
    if problems:
        raise ConfigError(f"{path} is damaged: {'; '.join(problems)}")
    return metrics


def load_run_info(run_dir: Path | str) -> dict[str, Any]:
    """config.yaml and metrics.json of a run folder, as plain dicts (empty where absent)."""
    run_dir = Path(run_dir)
    config: dict[str, Any] = {}
    if (run_dir / "config.yaml").is_file():
        config = read_options(run_dir / "config.yaml")  # the one reader of config files
    metrics: dict[str, Any] = {}
    if (run_dir / "metrics.json").is_file():
        metrics = _checked_metrics(run_dir / "metrics.json",
                                   read_run_json(run_dir / "metrics.json"))
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
