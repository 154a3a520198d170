"""A study's cells and its index file.

A cell is one ordinary run folder: ``STUDY/tune/<method>/<order>/<point>/seed<N>`` (a grid
point scored on validation rows) or ``STUDY/final/<method>/<order>/seed<N>`` (the chosen
point, on test). Its ``config.yaml`` is written before it runs, so ``nlora run --config
CELL/config.yaml --out CELL`` reruns or resumes it alone.

``STUDY/study.json`` (written atomically, by the driver only) records every cell planned so
far: its resolved options, stage, status, host, start and end times. A spec read again must
plan the same cells with the same configs; it may only add cells (``check_against``).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nlora.config import RunConfig
from nlora.errors import ConfigError
from nlora.io import write_json_atomic, write_text_atomic
from nlora.study.spec import StudySpec, cell_options

INDEX = "study.json"
LOGS = "logs"
STATUSES = ("pending", "running", "finished", "failed")


@dataclass
class Cell:
    stage: str  # "tune" or "final"
    label: str  # the spec's method label
    order: str
    seed: int
    point: dict[str, Any]
    config: RunConfig
    study: Path
    report_to: str | None = None  # a tracker each run also logs to (nlora.tracking)
    group: str = ""  # the study's name: the tracker's group

    @property
    def id(self) -> str:
        parts = [self.stage, self.label, self.order]
        if self.stage == "tune":
            parts.append(point_name(self.point))
        return "/".join([*parts, f"seed{self.seed}"])

    @property
    def dir(self) -> Path:
        return self.study / self.id

    @property
    def log(self) -> Path:
        return self.study / LOGS / (self.id.replace("/", "__") + ".log")

    def argv(self) -> list[str]:
        """The command that runs (or resumes) this cell: an ordinary ``nlora run``."""
        tracker = ["--report-to", self.report_to] if self.report_to else []
        return ["run", "--config", str(self.dir / "config.yaml"), "--out", str(self.dir),
                *tracker]

    def env(self) -> dict[str, str]:
        """Environment for its run: the W&B run's name and group (the tracker reads them)."""
        if self.report_to != "wandb":
            return {}
        return {"WANDB_NAME": self.id, "WANDB_RUN_GROUP": self.group}

    def record(self) -> dict[str, Any]:
        return {"stage": self.stage, "method": self.label, "order": self.order,
                "seed": self.seed, "point": self.point, "dir": str(self.dir),
                "log": str(self.log), "options": _plain(self.config.to_dict())}


def point_name(point: dict[str, Any]) -> str:
    """A grid point as a folder name, e.g. ``l1_lambda=0.01,learning_rate=0.001``."""
    if not point:
        return "default"
    text = ",".join(f"{k}={_value(v)}" for k, v in point.items())
    return re.sub(r"[^A-Za-z0-9_.,=+-]", "_", text)


def _value(value: Any) -> str:
    if isinstance(value, list):
        return "+".join(_value(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value))


def make_cell(spec: StudySpec, study: Path, stage: str, label: str, order: str, seed: int,
              point: dict[str, Any], report_to: str | None = None) -> Cell:
    from nlora.presets import make_config

    config = make_config(**cell_options(spec, label, order, seed, point, stage == "tune"))
    return Cell(stage, label, order, seed, point, config, study, report_to, spec.name)


def tune_cells(spec: StudySpec, study: Path, report_to: str | None = None) -> list[Cell]:
    """Every grid point of every method with more than one, on the selection's seeds and
    orders (a method with one point needs no tuning)."""
    cells = []
    for method in spec.methods:
        points = method.points()
        if len(points) < 2:
            continue
        for order in spec.select_orders:
            for point in points:
                for seed in spec.select_seeds:
                    cells.append(make_cell(spec, study, "tune", method.label, order, seed, point,
                                           report_to))
    return cells


def final_cells(spec: StudySpec, study: Path, chosen: dict[str, dict[str, Any]],
                report_to: str | None = None) -> list[Cell]:
    """Each method at its chosen point (``chosen[label]``) on every order and seed, on test."""
    return [make_cell(spec, study, "final", m.label, o.name, seed, chosen[m.label], report_to)
            for m in spec.methods for o in spec.orders for seed in spec.seeds]


def is_finished(run_dir: Path) -> bool:
    """A run folder whose every task is done (metrics.json has its summary)."""
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        return False
    metrics = json.loads(path.read_text(encoding="utf-8"))
    return metrics.get("summary") is not None


class Index:
    """study.json: the spec it was made from and every cell planned so far."""

    def __init__(self, study: Path) -> None:
        self.study = Path(study)
        self.path = self.study / INDEX
        self.data: dict[str, Any] = {"spec": None, "cells": {}}
        if self.path.is_file():
            try:
                self.data = json.loads(self.path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise ConfigError(f"{self.path}: not readable JSON ({err}); the run folders "
                                  "are intact: move the file away to plan again") from None

    @property
    def cells(self) -> dict[str, dict[str, Any]]:
        return self.data["cells"]

    def check_against(self, cells: list[Cell]) -> None:
        """Refuse a spec that changes or removes a cell already planned. An option the
        record lacks (added to nlora since, e.g. by a new method) counts at its default, as
        ``nlora run`` reads an older config.yaml."""
        defaults = _plain(RunConfig().to_dict())
        for cell in cells:
            old = self.cells.get(cell.id)
            if old is None:
                continue
            new = cell.record()["options"]
            changed = sorted(k for k in set(old["options"]) | set(new)
                             if k not in ("preset_sources", "preset_notes")
                             and old["options"].get(k, defaults.get(k))
                             != new.get(k, defaults.get(k)))
            if changed:
                raise ConfigError(
                    f"{self.study}: the spec changes cell {cell.id} ({', '.join(changed)} "
                    "differ) that this study already planned; a study's spec may only add "
                    "cells: use another --out")

    def check_removed(self, stage: str, cells: list[Cell]) -> None:
        planned = {c.id for c in cells}
        gone = [cid for cid, rec in self.cells.items()
                if rec["stage"] == stage and cid not in planned]
        if gone:
            raise ConfigError(f"{self.study}: the spec drops cells this study planned "
                              f"({', '.join(gone[:3])}{' ...' if len(gone) > 3 else ''}); a "
                              "study's spec may only add cells: use another --out")

    def add(self, cells: list[Cell]) -> None:
        """Plan cells: their folder and config.yaml (``nlora run --config`` reruns them)."""
        for cell in cells:
            record = self.cells.get(cell.id, {"status": "pending"})
            self.cells[cell.id] = {**record, **cell.record()}
            config_file = cell.dir / "config.yaml"
            if not config_file.is_file():
                cell.dir.mkdir(parents=True, exist_ok=True)
                write_text_atomic(config_file, cell.config.to_yaml())
            if is_finished(cell.dir):
                self.cells[cell.id]["status"] = "finished"
        self.save()

    def update(self, cell_id: str, **fields: Any) -> None:
        self.cells[cell_id].update(fields)
        self.save()

    def save(self) -> None:
        self.data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        write_json_atomic(self.path, self.data)
