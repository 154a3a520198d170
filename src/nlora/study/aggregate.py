"""The one place where a run folder's numbers are read for comparisons (study, compare)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nlora.io import write_json_atomic
from nlora.metrics import forward_transfer
from nlora.study.spec import PARAMETER_METRICS

ACCURACY_METRICS = ("AA", "AA_pooled", "F.Ra", "BWT", "FWT")
PARAMETERS = "parameters.json"


def run_metrics(run_dir: Path | str, names: Sequence[str] = ACCURACY_METRICS
                ) -> dict[str, float | None]:
    """The metrics ``names`` of a finished run folder (None where undefined, e.g. F.Ra of a
    joint method, FWT without the zero-shot row, ACR without adapters); ``minutes``: training
    plus evaluation time."""
    run_dir = Path(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    summary = metrics.get("summary") or {}
    out: dict[str, float | None] = {}
    for name in names:
        if name == "minutes":
            out[name] = run_seconds(run_dir) / 60
        elif name == "FWT":
            zero = metrics.get("zero_shot")
            out[name] = forward_transfer(metrics["accuracy"], zero) if zero else None
        elif name not in PARAMETER_METRICS:
            out[name] = summary.get(name)
    wanted = [n for n in names if n in PARAMETER_METRICS]
    if wanted:
        summary_p = parameter_summary(run_dir)
        for name in wanted:  # ACR and density as percentages, as the tables print them
            value = summary_p.get(name)
            scale = 100.0 if name.startswith(("ACR", "density")) else 1.0
            out[name] = None if value is None or value != value else value * scale
    return out


def parameter_summary(run_dir: Path) -> dict[str, Any]:
    """The run's parameter-space summary (ACR, density, OO, ... at the default threshold),
    computed from its adapters once and kept in ``RUN/parameters.json``: a study packed
    without adapters (``nlora study pack``) still reports it."""
    cache = run_dir / PARAMETERS
    if cache.is_file():
        return json.loads(cache.read_text(encoding="utf-8"))["summary"]
    from nlora.analysis import analyse_run

    parameter = analyse_run(run_dir, progress=False).get("parameter")
    summary = (parameter or {}).get("summary") or {}
    summary = {k: None if isinstance(v, float) and math.isnan(v) else v  # undefined: null
               for k, v in summary.items()}
    record = {"summary": summary, "threshold": (parameter or {}).get("threshold")}
    write_json_atomic(cache, record)
    return summary


def run_seconds(run_dir: Path | str) -> float:
    """Training plus evaluation time of every finished step (survives resumes)."""
    total = 0.0
    for done in sorted(Path(run_dir).glob("tasks/*/done.json")):
        record: dict[str, Any] = json.loads(done.read_text(encoding="utf-8"))
        total += record["train"]["seconds"] + record["eval_seconds"]
    return total
