"""The tune stage's choice: each grid point scored on validation rows carved from training
data (never test.json), mean ± 95 % t interval over seeds, the best mean chosen.

A point's score per seed is the metric averaged over the selection's orders (orders are
fixed effects); the interval is over seeds. Ties go to the point listed first in the spec.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nlora.data import VALIDATION_SEED
from nlora.errors import ConfigError
from nlora.io import write_json_atomic
from nlora.study.aggregate import run_metrics
from nlora.study.plan import Cell
from nlora.study.spec import METRICS, StudySpec
from nlora.study.stats import mean_interval

SELECTION = "selection.json"


def select(spec: StudySpec, cells: list[Cell], study: Path) -> dict[str, dict[str, Any]]:
    """label -> chosen point for every method (its only point when it has no grid); writes
    ``STUDY/selection.json``. Every tune cell must be finished."""
    metric = spec.select_metric
    best = max if METRICS[metric] == "max" else min
    chosen: dict[str, dict[str, Any]] = {}
    record: dict[str, Any] = {
        "rule": {
            "metric": metric, "better": METRICS[metric],
            "split": "validation: rows carved from each task's train.json, stratified by "
                     f"label, seed {VALIDATION_SEED} (nlora.data.carve_validation); test.json "
                     "is never opened in the tune stage",
            "validation_per_task": spec.validation_per_task,
            "seeds": spec.select_seeds, "orders": spec.select_orders,
            "score": "per seed: the metric averaged over the orders; then mean ± half-width "
                     "of the 95 % t interval over seeds; ties: the point listed first",
        },
        "methods": {},
    }
    for method in spec.methods:
        points = method.points()
        if len(points) < 2:
            chosen[method.label] = points[0]
            record["methods"][method.label] = {"points": [], "chosen": points[0],
                                               "why": "one point: nothing to tune"}
            continue
        rows = []
        for point in points:
            mine = [c for c in cells if c.label == method.label and c.point == point]
            by_seed: dict[int, float] = {}
            for seed in spec.select_seeds:
                values = []
                for order in spec.select_orders:
                    cell = next(c for c in mine if c.seed == seed and c.order == order)
                    value = run_metrics(cell.dir, [metric]).get(metric)
                    if value is None:
                        raise ConfigError(f"{cell.dir}: {metric} is undefined for this run; "
                                          f"choose another select.metric in {spec.path}")
                    values.append(value)
                by_seed[seed] = sum(values) / len(values)
            interval = mean_interval(list(by_seed.values()))
            rows.append({"point": point, "mean": interval.mean,
                         "half_width": interval.half_width, "n": interval.n,
                         "per_seed": {str(s): v for s, v in by_seed.items()},
                         "cells": [c.id for c in mine]})
        top = best(r["mean"] for r in rows)
        pick = next(r for r in rows if r["mean"] == top)
        chosen[method.label] = pick["point"]
        record["methods"][method.label] = {"points": rows, "chosen": pick["point"],
                                           "why": f"{'highest' if best is max else 'lowest'} "
                                                  f"mean validation {metric}"}
    write_json_atomic(study / SELECTION, record)
    return chosen
