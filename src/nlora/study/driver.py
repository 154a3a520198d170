"""``run_study``: the tune stage, the selection, the final stage, the report; resumable.

Run again with the same spec, a study skips its finished cells and starts the others, which
resume from their last finished task. The driver alone writes study.json, and holds a lock
(flock on STUDY/.study.lock) while it runs, so two drivers never share a study.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from nlora.errors import ConfigError, NloraError
from nlora.study import backends
from nlora.study.plan import Cell, Index, final_cells, is_finished, tune_cells
from nlora.study.select import select
from nlora.study.spec import StudySpec, read_spec
from nlora.tracking import check_report_to

log = logging.getLogger("nlora")
STAGES = ("tune", "all")
RUN_FIELDS = ("host", "slot", "worker_pid", "cuda_visible_devices", "job_id", "error",
              "returncode", "started", "ended")


class CellsFailed(NloraError):
    """Cells ended without finishing; rerunning the study retries them."""


def _lock(study: Path) -> int:
    study.mkdir(parents=True, exist_ok=True)
    fd = os.open(study / ".study.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise ConfigError(f"{study} is in use by another nlora study driver; wait for it or "
                          "choose another --out") from None
    return fd


def run_cells(cells: list[Cell], index: Index, backend: str, workers: int, spec: StudySpec,
              study: Path, ray_address: str | None = None) -> None:
    """Run the unfinished cells on ``backend``; CellsFailed lists those that did not finish."""
    todo = [c for c in cells if not is_finished(c.dir)]
    for cell in cells:
        if cell not in todo and index.cells[cell.id]["status"] != "finished":
            index.update(cell.id, status="finished")
    if not todo:
        return
    log.info("%d of %d %s cells to run (%s backend)", len(todo), len(cells), todo[0].stage,
             backend)

    def started(cell: Cell, info: dict[str, Any]) -> None:
        index.update(cell.id, status="running", started=time.time(), **info)

    def done(cell: Cell, result: dict[str, Any]) -> None:
        ok = result.get("returncode") == 0 and is_finished(cell.dir)
        record = {k: v for k, v in result.items() if k != "returncode"}
        index.update(cell.id, status="finished" if ok else "failed",
                     returncode=result.get("returncode"), **record)

    for cell in todo:  # what an earlier attempt recorded no longer describes the cell
        for key in RUN_FIELDS:
            index.cells[cell.id].pop(key, None)
        index.update(cell.id, status="pending")
    if backend == "local":
        backends.run_local(todo, workers, spec.resources, done, started)
    elif backend == "ray":
        backends.run_ray(todo, spec.resources, done, ray_address)
    elif backend == "slurm":
        backends.run_slurm(todo, spec.resources, done, study / "slurm")
    else:
        raise ConfigError(f"--backend must be one of {', '.join(backends.BACKENDS)}")
    failed = [c for c in cells if not is_finished(c.dir)]
    if failed:
        names = "; ".join(f"{c.id} (log {c.log})" for c in failed[:3])
        more = f" and {len(failed) - 3} more" if len(failed) > 3 else ""
        raise CellsFailed(f"{len(failed)} {failed[0].stage} cell(s) did not finish: {names}"
                          f"{more}; rerun the same command to resume them")


def plan_summary(spec_path: Path | str, out: Path | str) -> list[str]:
    """What the study would run (``--dry-run``): its cells, stage by stage; creates nothing."""
    spec = read_spec(spec_path)
    study = Path(out).resolve()
    tune = tune_cells(spec, study)
    finals = len(spec.methods) * len(spec.orders) * len(spec.seeds)
    lines = [f"study {spec.name}: {len(tune)} tune cells, then {finals} final cells "
             f"({len(spec.methods)} methods x {len(spec.orders)} orders x {len(spec.seeds)} "
             "seeds, each at its chosen grid point)"]
    lines += [f"  {c.id}: {len(c.config.tasks)} tasks" for c in tune]
    for method in spec.methods:
        points = method.points()
        lines.append(f"  final/{method.label}: {len(points)} grid point(s)"
                     + (" -> chosen on validation" if len(points) > 1 else ""))
    return lines


def run_study(spec_path: Path | str, out: Path | str, backend: str = "local",
              workers: int = 1, stage: str = "all", ray_address: str | None = None,
              report_to: str | None = None) -> dict[str, Any]:
    """Run (or resume) the study of ``spec_path`` in ``out``; returns the report's tables.

    ``report_to``: a tracker every cell also logs to (``nlora.tracking``; for W&B: run = cell,
    group = the spec's name)."""
    if backend not in backends.BACKENDS:
        raise ConfigError(f"--backend must be one of {', '.join(backends.BACKENDS)}, "
                          f"got {backend!r}")
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    if stage not in STAGES:
        raise ConfigError(f"--stage must be one of {', '.join(STAGES)}, got {stage!r}")
    check_report_to(report_to)  # here, not in every cell's log
    spec = read_spec(spec_path)  # everything checked before anything runs
    study = Path(out).resolve()
    if study.exists() and not study.is_dir():
        raise ConfigError(f"--out {study} is a file, not a folder")
    if study.is_dir() and any(study.iterdir()) and not (study / "study.json").is_file():
        raise ConfigError(f"{study} is not empty and holds no nlora study; choose another --out")
    fd = _lock(study)
    try:
        index = Index(study)
        tune = tune_cells(spec, study, report_to)
        index.check_against(tune)
        index.check_removed("tune", tune)
        shutil.copyfile(spec.path, study / "spec.yaml")  # the spec of the latest invocation
        index.data["spec"] = str(spec.path.resolve())
        index.add(tune)
        run_cells(tune, index, backend, workers, spec, study, ray_address)
        chosen = select(spec, tune, study)
        if stage == "tune":
            return {}
        final = final_cells(spec, study, chosen, report_to)
        index.check_against(final)
        index.check_removed("final", final)
        index.add(final)
        run_cells(final, index, backend, workers, spec, study, ray_address)
    finally:
        os.close(fd)
    from nlora.study.report import write_study_report

    return write_study_report(study)
