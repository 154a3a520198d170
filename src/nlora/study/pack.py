"""``nlora study pack STUDY --out DIR``: the study without its weights, small enough to commit.

A study that spans several sittings (or machines whose disks do not survive) keeps its
finished cells as numbers: for every finished cell its ``config.yaml``, ``metrics.json``,
the tasks' ``done.json`` and ``parameters.json`` (the parameter-space summary, computed from
the adapters before they are left behind); for the study its ``spec.yaml``, ``study.json``,
``selection.json`` and ``report/``. Unfinished cells are left out (they start again).

``nlora study report DIR`` reads a pack as it reads the study, and ``nlora study SPEC --out
COPY`` on a copy of the pack continues the study: its finished cells count as finished, the
selection is recomputed from the tune cells' metrics (the same choice), and only the missing
cells run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from nlora.errors import ConfigError
from nlora.study.aggregate import PARAMETERS, parameter_summary
from nlora.study.plan import INDEX, is_finished
from nlora.study.spec import PARAMETER_METRICS, read_spec

STUDY_FILES = ("spec.yaml", INDEX, "selection.json")
CELL_FILES = ("config.yaml", "metrics.json", PARAMETERS)
REPORT = "report"


def pack_study(study: Path | str, out: Path | str) -> dict[str, Any]:
    """Copy ``study``'s numbers (no adapters, predictions or logs) into ``out``; what was
    packed: cells packed, cells left out (not finished), bytes."""
    study, out = Path(study).resolve(), Path(out).resolve()
    if not (study / INDEX).is_file():
        raise ConfigError(f"{study} is not an nlora study folder (no {INDEX})")
    if out == study or study in out.parents:
        raise ConfigError(f"--out {out} must lie outside the study folder {study}")
    if out.exists() and any(out.iterdir()) and not (out / INDEX).is_file():
        raise ConfigError(f"--out {out} is not empty and holds no packed study")
    spec = read_spec(study / "spec.yaml", check=False)
    analyse = any(m in PARAMETER_METRICS for m in spec.report_metrics)
    index = json.loads((study / INDEX).read_text(encoding="utf-8"))
    packed, left = [], []
    for cell_id, cell in index["cells"].items():
        source = study / cell_id
        if not is_finished(source):
            left.append(cell_id)
            continue
        if analyse and cell["stage"] == "final":
            parameter_summary(source)  # from the adapters, while they are here
        target = out / cell_id
        target.mkdir(parents=True, exist_ok=True)
        for name in CELL_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, target / name)
        for done in sorted(source.glob("tasks/*/done.json")):
            (target / done.parent.relative_to(source)).mkdir(parents=True, exist_ok=True)
            shutil.copy2(done, target / done.relative_to(source))
        packed.append(cell_id)
    for name in STUDY_FILES:
        if (study / name).is_file():
            shutil.copy2(study / name, out / name)
    if (study / REPORT).is_dir():
        shutil.copytree(study / REPORT, out / REPORT, dirs_exist_ok=True)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"packed": packed, "left_out": left, "bytes": size, "folder": str(out)}
