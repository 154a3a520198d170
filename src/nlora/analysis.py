"""Every metric of a finished run: accuracy-based scores and, when it saved LoRA adapters,
the parameter-space ones (``nlora.param_metrics``) per module, per task, per pair and summed.

``analyse_run`` reads a run folder; ``analyse_updates`` works on adapters already loaded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from nlora.errors import ConfigError
from nlora.metrics import forgetting, forward_transfer, unseen_generalisation
from nlora.param_metrics import (
    ABSOLUTE_GRID,
    DEFAULT_AWOM_NORM,
    DEFAULT_MODE,
    DEFAULT_THRESHOLD,
    RELATIVE_GRID,
    LoraUpdate,
    MatrixNorm,
    TaskUpdate,
    ThresholdMode,
    average_collision_rate,
    awom_pair,
    awom_pair_lowrank,
    collision_counts_over_thresholds,
    density,
    gsr,
    gsr_from_norms,
    layer_index,
    nonzero_mask,
    nuclear_norm,
    oo_pair,
    singular_values,
    singular_values_lowrank,
    subspace_use,
)
from nlora.rundir import load_run_info, load_task_updates, task_dirs


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return x


def _square(t: int, fill: float | None = None) -> list[list[float | None]]:
    return [[fill] * t for _ in range(t)]


def _singular_values(u: TaskUpdate, dw: Any) -> Any:
    return singular_values_lowrank(u) if isinstance(u, LoraUpdate) else singular_values(dw)


def _awom(u_t: TaskUpdate, u_i: TaskUpdate, dw_t: Any, dw_i: Any, norm: MatrixNorm) -> float:
    if isinstance(u_t, LoraUpdate) and isinstance(u_i, LoraUpdate):
        return awom_pair_lowrank(u_t, u_i, norm)
    return awom_pair(dw_t, dw_i, norm)


def _oo(u_i: TaskUpdate, u_t: TaskUpdate) -> float | None:
    """OO is defined on LoRA factors (eq. 7): None where an update is a sparse delta."""
    if isinstance(u_i, LoraUpdate) and isinstance(u_t, LoraUpdate):
        return oo_pair(u_i.A, u_t.A)
    return None


def analyse_updates(
    tasks: list[dict[str, TaskUpdate]],
    threshold: float = DEFAULT_THRESHOLD,
    mode: ThresholdMode = DEFAULT_MODE,
    awom_norm: MatrixNorm = DEFAULT_AWOM_NORM,
    curve_thresholds: Sequence[float] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """All parameter-space metrics of a sequence of task updates (see analyse_run).

    Updates are LoRA factors or sparse deltas. Density and collision rates come at the given
    threshold and at exactly zero (``*_exact``: |x| > 0), so exactly sparse updates are
    judged on their true zeros; OO needs LoRA factors and is None for sparse deltas.
    """
    t = len(tasks)
    grid = list(curve_thresholds or (RELATIVE_GRID if mode == "relative" else ABSOLUTE_GRID))
    # the curve, the chosen threshold, then 0 (exact zeros; in relative mode too, since
    # |x| > 0 · max|ΔW| is |x| > 0)
    all_thresholds = grid + [threshold, 0.0]
    modules = list(tasks[0]) if tasks else []
    for k, task in enumerate(tasks[1:], start=2):  # every task must cover the same modules
        if set(task) != set(modules):
            odd = sorted(set(modules) ^ set(task))
            raise ValueError(
                f"task {k}'s update and task 1's adapt different modules ({len(odd)} in one "
                f"only, e.g. {odd[0]}); the metrics compare the same modules across tasks"
            )
    per_module: dict[str, Any] = {}
    # pooled accumulators: the whole adapter seen as one long vector
    l1 = [0.0] * t
    l2sq = [0.0] * t
    numel = [0] * t
    nonzero = [0] * t
    nonzero_exact = [0] * t
    oo_sum: list[list[float | None]] = _square(t, 0.0)
    awom_sum = _square(t, 0.0)
    collisions = [[[0] * len(all_thresholds) for _ in range(t)] for _ in range(t)]
    for module in tqdm(modules, desc="modules", disable=not progress, leave=False):
        ups = [task[module] for task in tasks]
        dws = [u.delta() for u in ups]
        svs = [_singular_values(u, dw) for u, dw in zip(ups, dws, strict=True)]
        entry: dict[str, Any] = {
            "shape": list(ups[0].shape),
            "layer": layer_index(module),
            "gsr": [gsr(dw) for dw in dws],
            "density": [density(dw, threshold, mode) for dw in dws],
            "density_exact": [density(dw, 0.0, mode) for dw in dws],
            "nuclear_norm": [nuclear_norm(sv) for sv in svs],
            "spectral_norm": [float(sv.max()) for sv in svs],
            "subspace_use": [subspace_use(sv) for sv in svs],
            "rank": [u.A.shape[0] if isinstance(u, LoraUpdate) else None for u in ups],
        }
        oo, aw, cr, cr_exact = _square(t), _square(t), _square(t), _square(t)
        for i in range(t):
            l1[i] += float(dws[i].abs().sum())
            l2sq[i] += float(dws[i].double().pow(2).sum())
            numel[i] += dws[i].numel()
            nonzero[i] += int(nonzero_mask(dws[i], threshold, mode).sum())
            nonzero_exact[i] += int(torch.count_nonzero(dws[i]))
            for j in range(i + 1, t):
                oo[i][j] = oo[j][i] = _oo(ups[i], ups[j])
                aw[i][j] = aw[j][i] = _awom(ups[j], ups[i], dws[j], dws[i], awom_norm)
                counts = collision_counts_over_thresholds(dws[i], dws[j], all_thresholds, mode)
                cr[i][j] = cr[j][i] = counts[-2] / dws[i].numel()
                cr_exact[i][j] = cr_exact[j][i] = counts[-1] / dws[i].numel()
                oo_sum[i][j] = (
                    None if oo[i][j] is None or oo_sum[i][j] is None
                    else oo_sum[i][j] + oo[i][j]
                )
                awom_sum[i][j] += aw[i][j]
                for k, c in enumerate(counts):
                    collisions[i][j][k] += c
        entry.update({"oo": oo, "awom": aw, "cr": cr, "acr": average_collision_rate(cr),
                      "cr_exact": cr_exact, "acr_exact": average_collision_rate(cr_exact)})
        per_module[module] = entry
    for i in range(t):
        oo_sum[i][i] = awom_sum[i][i] = None  # a task against itself is not a pair
        for j in range(i + 1, t):
            oo_sum[j][i], awom_sum[j][i] = oo_sum[i][j], awom_sum[i][j]
    total = numel[0] if t else 0

    def cr_at(k: int) -> list[list[float | None]]:
        cr = _square(t)
        for i in range(t):
            for j in range(i + 1, t):
                cr[i][j] = cr[j][i] = collisions[i][j][k] / total
        return cr

    pooled_cr = cr_at(len(all_thresholds) - 2)
    pooled_cr_exact = cr_at(len(all_thresholds) - 1)
    task_gsr = [gsr_from_norms(l1[i], l2sq[i], numel[i]) for i in range(t)]
    task_use = [
        _mean([per_module[m]["subspace_use"][i] for m in modules]) for i in range(t)
    ]
    task_nuclear = [
        _mean([per_module[m]["nuclear_norm"][i] for m in modules]) for i in range(t)
    ]
    return _nan_to_none({
        "threshold": {"value": threshold, "mode": mode},
        "awom_norm": awom_norm,
        "modules": modules,
        "per_module": per_module,
        "per_task": {
            "gsr": task_gsr,
            "density": [nonzero[i] / numel[i] if numel[i] else math.nan for i in range(t)],
            "density_exact": [
                nonzero_exact[i] / numel[i] if numel[i] else math.nan for i in range(t)
            ],
            "subspace_use": task_use,
            "nuclear_norm": task_nuclear,
            # OO_t / AWOM_t: task t against every earlier task, summed over modules
            "oo": [_sum([oo_sum[i][j] for i in range(j)]) if j else None for j in range(t)],
            "awom": [sum(awom_sum[i][j] for i in range(j)) if j else None for j in range(t)],
        },
        "pairs": {"oo": oo_sum, "awom": awom_sum, "cr": pooled_cr, "cr_exact": pooled_cr_exact},
        "acr_curve": {
            "thresholds": grid,
            "acr": [average_collision_rate(cr_at(k)) for k in range(len(grid))],
        },
        "summary": {
            "OO": _sum([oo_sum[i][t - 1] for i in range(t - 1)]) if t > 1 else math.nan,
            "AWOM": sum(awom_sum[i][t - 1] for i in range(t - 1)) if t > 1 else math.nan,
            "GSR": _mean(task_gsr),
            "ACR": average_collision_rate(pooled_cr),
            "ACR_exact": average_collision_rate(pooled_cr_exact),
            "density": _mean([nonzero[i] / numel[i] for i in range(t) if numel[i]]),
            "density_exact": _mean([nonzero_exact[i] / numel[i] for i in range(t) if numel[i]]),
            "subspace_use": _mean(task_use),
            "nuclear_norm": _mean(task_nuclear),
            # the factors' inner dimension, an upper bound of rank(ΔW), over every task: r
            # for a fresh adapter, r_t + r_{t-1} for SeqLoRA's differences of one adapter
            "rank": max((r for m in modules for r in per_module[m]["rank"] if r is not None),
                        default=None),
        },
    })


def _sum(values: Sequence[float | None]) -> float | None:
    """A sum that is undefined (None) when any term is (OO of a sparse delta)."""
    return None if any(v is None for v in values) else sum(values)  # type: ignore[arg-type]


def _mean(values: Sequence[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def is_cumulative_adapter(method: str | None) -> bool:
    """Whether the method saves one adapter trained on and on (SeqLoRA)."""
    from nlora.methods import METHODS  # PEFT and the methods: only when a run is read

    return bool(method in METHODS and METHODS[method].cumulative_adapter)


def method_label(config: dict[str, Any]) -> str | None:
    """The method's name with the exact-sparsity options it ran with, e.g.
    ``nlora+prune0.05+cf`` (``nlora`` alone for the paper's method)."""
    method = config.get("method")
    if method is None:
        return None
    label = str(method)
    if config.get("l1_lambda") == "auto":
        label += "+λauto"
    if config.get("prox_lambda"):
        label += f"+prox{config['prox_lambda']:g}"
    if config.get("prune_density") is not None:
        label += f"+prune{config['prune_density']:g}"
    if config.get("collision_free"):
        label += "+cf"
    return label


def undefined_metrics(method: str | None) -> list[str]:
    """Parameter-space metrics that do not apply to a method's saved adapters (e.g. OO for
    OSF, whose saved A is a factorisation of ΔW, not a learned input subspace)."""
    from nlora.methods import METHODS  # the method classes say it; imported only when asked

    cls = METHODS.get(method or "")
    return list(cls.undefined_metrics) if cls is not None else []


def analyse_run(
    run_dir: Path | str,
    threshold: float = DEFAULT_THRESHOLD,
    mode: ThresholdMode = DEFAULT_MODE,
    awom_norm: MatrixNorm = DEFAULT_AWOM_NORM,
    curve_thresholds: Sequence[float] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Every metric of one run directory: accuracy-based ones and, when the run saved LoRA
    adapters, the parameter-space ones per module, per task, per pair and summed.

    ``parameter`` is None (with ``notes`` saying why) for runs without adapters, e.g. full
    fine-tuning baselines.
    """
    run_dir = Path(run_dir)
    info = load_run_info(run_dir)
    config, metrics = info["config"], info["metrics"]
    tasks = metrics.get("tasks") or config.get("tasks") or [p.name for p in task_dirs(run_dir)]
    accuracy = metrics.get("accuracy")
    summary = dict(metrics.get("summary") or {})
    notes: list[str] = []
    scores: dict[str, Any] = {
        "AA": summary.get("AA"),
        "AA_pooled": summary.get("AA_pooled"),
        "F.Ra": summary.get("F.Ra"),
        "BWT": summary.get("BWT"),
        "FWT": None,
    }
    if summary.get("EM") is not None:  # mean final exact match beside ROUGE-L
        scores["EM"] = summary["EM"]
    finished = metrics.get("finished")
    if accuracy and "summary" not in metrics and isinstance(finished, int) and finished > 1:
        # an unfinished run: forgetting so far, over the tasks trained and their steps
        so_far = [row[:finished] for row in accuracy[:finished]]
        try:
            scores["F.Ra"] = forgetting(so_far)
        except ValueError as err:  # a finished step without a score: damage, not a gap
            raise ConfigError(f"{run_dir / 'metrics.json'}: {err}") from None
        notes.append(f"unfinished run ({finished} of {len(accuracy)} tasks): F.Ra over the "
                     f"first {finished}")
    if accuracy:
        if metrics.get("zero_shot") is not None:
            scores["FWT"] = forward_transfer(accuracy, metrics["zero_shot"])
            if scores["FWT"] is None:
                notes.append("FWT needs a[i][i-1] (tasks evaluated before training); not measured")
    result: dict[str, Any] = {
        "name": run_dir.name,
        "dir": str(run_dir),
        "method": method_label(config),  # a display label, e.g. nlora+prune0.05
        "method_name": config.get("method"),  # the method itself
        "model": config.get("model"),
        "tasks": tasks,
        "accuracy": accuracy,  # the score matrix, each task's row by its metric
        "metrics": metrics.get("metrics") or ["accuracy"] * len(tasks),
        "zero_shot": metrics.get("zero_shot"),
        "scores": scores,
        "unseen": unseen_generalisation(metrics.get("unseen") or {}),
        "parameter": None,
        "notes": notes,
    }
    result["undefined"] = undefined_metrics(config.get("method"))
    updates = load_task_updates(run_dir, cumulative=is_cumulative_adapter(config.get("method")))
    if not updates:
        notes.append(
            "no LoRA adapters saved (full fine-tuning, or prompts with no weight update): "
            "parameter-space metrics n/a"
        )
        return result
    if len(updates) < len(tasks):
        notes.append(f"adapters found for the first {len(updates)} of {len(tasks)} tasks only")
    if is_cumulative_adapter(config.get("method")):
        notes.append("one adapter trained on every task: task t's update is its saved adapter "
                     "minus task t-1's")
    try:
        parameter = analyse_updates(updates, threshold, mode, awom_norm, curve_thresholds,
                                    progress)
    except ValueError as err:  # updates that do not fit together: say which run
        raise ConfigError(f"{run_dir}: {err}") from None
    if "OO" in result["undefined"]:  # no number where the metric does not exist
        parameter["summary"]["OO"] = None
        parameter["per_task"]["oo"] = [None] * len(updates)
        parameter["pairs"]["oo"] = _square(len(updates))
        for entry in parameter["per_module"].values():
            entry["oo"] = _square(len(updates))
    result["parameter"] = parameter
    return result
