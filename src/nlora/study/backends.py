"""Where a study's cells run: a local pool of worker slots, Ray core tasks, or a SLURM job
array through submitit. Every backend runs a cell the same way, ``run_cell``: an ordinary
``nlora run --config CELL/config.yaml --out CELL`` in a subprocess, its output appended to
the cell's own log. A run resumes after its last finished task, so a cell started again
after a worker died continues where it stopped.

Ray and submitit are optional extras (``nlora[ray]``, ``nlora[slurm]``).
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nlora.errors import ConfigError
from nlora.study.plan import Cell
from nlora.study.spec import Resources

BACKENDS = ("local", "ray", "slurm")
Done = Callable[[Cell, dict[str, Any]], None]  # called in the driver as each cell ends


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL it when the process that started it dies (Linux),
    so a worker or driver killed with -9 leaves no orphan run holding the cell's lock."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: orphans finish their cell, then exit
        pass


def _command(argv: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "nlora.cli", *argv]


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {**os.environ, **extra}
    env.setdefault("TQDM_MININTERVAL", "30")  # progress bars in a log file: a line now and then
    return env


def _header(log: Path, env: dict[str, str]) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as handle:
        devices = env.get("CUDA_VISIBLE_DEVICES", "(unset)")
        # a fresh line: a killed run's last progress bar may have left none
        handle.write(f"\n== {time.strftime('%Y-%m-%dT%H:%M:%S')} nlora study: pid "
                     f"{os.getpid()} on {socket.gethostname()}, CUDA_VISIBLE_DEVICES "
                     f"{devices}, threads {env.get('OMP_NUM_THREADS', '(unset)')}\n")


def run_cell(argv: Sequence[str], log: str, extra_env: dict[str, str]) -> dict[str, Any]:
    """Run one cell to its end (in whatever process a backend gives it); what happened.

    Module-level and plain-typed, so Ray and submitit can ship it to their workers."""
    env = _env(extra_env)
    path = Path(log)
    _header(path, env)
    start = time.time()
    with open(path, "a", encoding="utf-8") as handle:
        code = subprocess.call(_command(argv), stdout=handle, stderr=subprocess.STDOUT,
                               env=env, preexec_fn=_die_with_parent)
    return {"returncode": code, "host": socket.gethostname(), "worker_pid": os.getpid(),
            "cuda_visible_devices": env.get("CUDA_VISIBLE_DEVICES"),
            "started": start, "ended": time.time()}


def missing_extra(module: str, extra: str) -> ConfigError:
    return ConfigError(f"--backend {extra} needs the {module} package: "
                       f"pip install 'nlora[{extra}]'")


# --------------------------------------------------------------------------------------------
# local: N worker slots on this machine
# --------------------------------------------------------------------------------------------


@dataclass
class Slot:
    index: int
    env: dict[str, str]
    cell: Cell | None = None
    process: subprocess.Popen | None = None
    handle: Any = None
    started: float = 0.0
    tries: int = 0


def local_slots(workers: int, resources: Resources) -> list[dict[str, str]]:
    """Each slot's environment: its own GPUs (CUDA_VISIBLE_DEVICES) where there are GPUs,
    else its share of the CPU cores as the thread count."""
    import torch

    gpus = torch.cuda.device_count()
    per = resources.gpus_per_run
    if gpus and per:
        if int(per) != per:
            raise ConfigError(f"resources.gpus_per_run {per} must be whole for --backend local")
        per = int(per)
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = [d.strip() for d in visible.split(",")] if visible else [str(i) for i in
                                                                       range(gpus)]
        if workers * per > len(ids):
            raise ConfigError(f"--workers {workers} x resources.gpus_per_run {per} needs "
                              f"{workers * per} GPUs; this machine shows {len(ids)}")
        return [{"CUDA_VISIBLE_DEVICES": ",".join(ids[i * per:(i + 1) * per])}
                for i in range(workers)]
    threads = max(1, (os.cpu_count() or 1) // workers)
    return [{"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
            for _ in range(workers)]


def run_local(cells: list[Cell], workers: int, resources: Resources, done: Done,
              started: Callable[[Cell, dict[str, Any]], None]) -> None:
    """Run cells on ``workers`` slots, one run per slot; a cell whose process was killed by a
    signal is started again up to ``resources.retries`` times (it resumes)."""
    from tqdm.auto import tqdm

    slots = [Slot(i, env) for i, env in enumerate(local_slots(workers, resources))]
    queue = list(cells)
    tries: dict[str, int] = {}
    bar = tqdm(total=len(cells), desc="cells", unit="cell")
    try:
        while queue or any(s.process for s in slots):
            for slot in slots:
                if slot.process is None and queue:
                    cell = queue.pop(0)
                    env = _env({**slot.env, **cell.env()})
                    _header(cell.log, env)
                    slot.handle = open(cell.log, "a", encoding="utf-8")  # noqa: SIM115
                    slot.cell, slot.started = cell, time.time()
                    slot.process = subprocess.Popen(
                        _command(cell.argv()), stdout=slot.handle, stderr=subprocess.STDOUT,
                        env=env, preexec_fn=_die_with_parent)
                    started(cell, {"host": socket.gethostname(), "slot": slot.index,
                                   "cuda_visible_devices": env.get("CUDA_VISIBLE_DEVICES"),
                                   "worker_pid": slot.process.pid})
            time.sleep(0.2)
            for slot in slots:
                if slot.process is None or slot.process.poll() is None:
                    continue
                code, cell = slot.process.returncode, slot.cell
                slot.handle.close()
                slot.process, slot.cell = None, None
                tries[cell.id] = tries.get(cell.id, 0) + 1
                if code < 0 and tries[cell.id] <= resources.retries:  # killed: resume it
                    queue.insert(0, cell)
                    continue
                done(cell, {"returncode": code, "host": socket.gethostname(),
                            "started": slot.started, "ended": time.time()})
                bar.update(1)
    finally:
        for slot in slots:  # an interrupted driver stops its runs (they resume next time)
            if slot.process is not None:
                slot.process.terminate()
                slot.process.wait()
                slot.handle.close()
        bar.close()


# --------------------------------------------------------------------------------------------
# ray: one Ray core task per cell
# --------------------------------------------------------------------------------------------


def run_ray(cells: list[Cell], resources: Resources, done: Done, address: str | None = None
            ) -> None:
    """One Ray task per cell with ``num_gpus``/``num_cpus`` from the spec; Ray sets each
    task's CUDA_VISIBLE_DEVICES and reruns a task whose worker died (``max_retries``)."""
    try:
        import ray
    except ImportError:
        raise missing_extra("ray", "ray") from None
    from tqdm.auto import tqdm

    settings = resources.ray
    address = address or settings.get("address")
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:  # a local Ray for this study; init's keywords from resources.ray.init
            ray.init(**{"include_dashboard": False, "log_to_driver": False,
                        **(settings.get("init") or {})})
    threads = str(max(1, int(resources.cpus_per_run)))
    task = ray.remote(num_gpus=resources.gpus_per_run, num_cpus=resources.cpus_per_run,
                      max_retries=resources.retries)(run_cell)
    pending = {task.remote(cell.argv(), str(cell.log),
                           {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
                            **cell.env()}): cell
               for cell in cells}
    bar = tqdm(total=len(cells), desc="cells", unit="cell")
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            cell = pending.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except Exception as err:  # the task failed beyond its retries
                result = {"returncode": None, "error": f"{type(err).__name__}: {err}"}
            done(cell, result)
            bar.update(1)
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
        bar.close()


# --------------------------------------------------------------------------------------------
# slurm: one submitit job array
# --------------------------------------------------------------------------------------------


def run_slurm(cells: list[Cell], resources: Resources, done: Done, folder: Path) -> None:
    """One job array (``map_array``) with ``slurm_array_parallelism`` as the cap; partition,
    time and GPUs from ``resources``. ``resources.slurm.cluster``: None (SLURM when there,
    else submitit's local executor), "slurm", "local" or "debug"."""
    try:
        import submitit
    except ImportError:
        raise missing_extra("submitit", "slurm") from None
    from tqdm.auto import tqdm

    settings = resources.slurm
    executor = submitit.AutoExecutor(folder=str(folder), cluster=settings.get("cluster"))
    params: dict[str, Any] = {
        "name": "nlora-study", "timeout_min": int(settings.get("time_min", 24 * 60)),
        "nodes": 1, "tasks_per_node": 1, "cpus_per_task": int(resources.cpus_per_run),
        "gpus_per_node": int(resources.gpus_per_run),
        "slurm_array_parallelism": int(settings.get("array_parallelism", 16)),
    }
    for key in ("partition", "account", "qos", "constraint"):
        if settings.get(key):
            params[f"slurm_{key}"] = settings[key]
    if settings.get("mem_gb"):
        params["mem_gb"] = settings["mem_gb"]
    executor.update_parameters(**params)
    threads = str(max(1, int(resources.cpus_per_run)))
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    jobs = executor.map_array(run_cell, [c.argv() for c in cells], [str(c.log) for c in cells],
                              [{**env, **c.env()} for c in cells])
    pending = dict(zip(jobs, cells, strict=True))
    bar = tqdm(total=len(cells), desc="cells", unit="cell")
    try:
        while pending:
            for job in [j for j in pending if j.done()]:
                cell = pending.pop(job)
                try:
                    result = job.result()
                    result["job_id"] = job.job_id
                except Exception as err:
                    result = {"returncode": None, "job_id": job.job_id,
                              "error": f"{type(err).__name__}: {err}"}
                done(cell, result)
                bar.update(1)
            if pending:
                time.sleep(1.0)
    finally:
        bar.close()
