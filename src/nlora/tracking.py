"""Experiment trackers a run logs its curves to, through Accelerate's trackers.

``run.log`` always keeps every number as text; ``--report-to`` adds one tracker:

- ``tensorboard``: event files in ``RUN/tensorboard/``;
- ``wandb``: Weights & Biases, **offline by default** (``RUN/wandb/offline-run-*``; upload later
  with ``wandb sync``; ``WANDB_MODE=online`` logs live). One W&B run per run folder: its id is
  drawn once and kept in ``RUN/wandb/nlora-run-id``, so a resumed run continues the same W&B
  run. Its name is the folder's name (``$WANDB_NAME`` wins), its group ``$WANDB_RUN_GROUP``
  (a study sets both: the cell's id and the study's name), its project ``$WANDB_PROJECT``,
  else ``nlora``.

The tracker is not part of a run's config: a run resumes with or without one.
"""

from __future__ import annotations

import importlib.util
import os
import uuid
from pathlib import Path
from typing import Any

from nlora.config import RunConfig
from nlora.errors import ConfigError

__all__ = ["REPORT_TO", "check_report_to", "tracker_setup"]

REPORT_TO = ("tensorboard", "wandb")
WANDB_ID_FILE = "nlora-run-id"


def check_report_to(report_to: str | None) -> None:
    """Refuse an unknown tracker, or one whose optional package is not installed."""
    if report_to is None:
        return
    if report_to not in REPORT_TO:
        raise ConfigError(f"--report-to must be one of {', '.join(REPORT_TO)}, got {report_to!r}")
    if not is_installed(report_to):
        raise ConfigError(f"--report-to {report_to} needs the {report_to} package: "
                          f"pip install 'nlora[{report_to}]'")


def is_installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def tracker_setup(report_to: str, config: RunConfig, out_dir: Path
                  ) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``Accelerator.init_trackers``' arguments: project name, hyperparameters, init kwargs.

    Runs on the main process only (it may write ``RUN/wandb/nlora-run-id``)."""
    hyper = _hyperparameters(config)
    if report_to == "tensorboard":
        return "tensorboard", hyper, {}  # RUN/tensorboard/ holds the event files
    folder = out_dir / "wandb"
    folder.mkdir(exist_ok=True)
    id_file = folder / WANDB_ID_FILE
    if not id_file.is_file():
        id_file.write_text(uuid.uuid4().hex[:16], encoding="utf-8")
    wandb = {
        "dir": str(out_dir),
        "id": id_file.read_text(encoding="utf-8").strip(),
        "resume": "allow",  # the same W&B run again after a resume
        "mode": os.environ.get("WANDB_MODE", "offline"),
        "name": os.environ.get("WANDB_NAME", out_dir.name),
        "group": os.environ.get("WANDB_RUN_GROUP"),
    }
    return os.environ.get("WANDB_PROJECT", "nlora"), hyper, {"wandb": wandb}


def _hyperparameters(config: RunConfig) -> dict[str, Any]:
    """The config as tracker hyperparameters (scalars and strings only, as TensorBoard's
    hparams accept)."""
    out = {}
    for key, value in config.to_dict().items():
        if isinstance(value, bool | int | float | str):
            out[key] = value
        else:
            out[key] = "none" if value is None else ",".join(str(v) for v in value)
    return out
