"""Report figures (paper Figs. 2-5 and the accuracy matrix), one function per figure.

Figures are built on ``matplotlib.figure.Figure`` directly and saved through the Agg canvas, so
nothing touches pyplot's global state or needs a display. Inputs are the dicts returned by
``nlora.analysis.analyse_run``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from nlora.param_metrics import ThresholdMode, nonzero_mask  # noqa: E402
from nlora.scoring import METRIC_TITLES  # noqa: E402

# Fig. 2's palette: gray near zero, green task i, blue task j, red collisions
COLLISION_COLOURS = ["#d9d9d9", "#2ca02c", "#1f77b4", "#d62728"]
DPI = 120


def _save(fig: Figure, path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def _short(task: str) -> str:
    return task.split("/")[-1]


def accuracy_heatmap(run: dict[str, Any], path: Path | str) -> Path:
    """a[i][j], the score of task i after training task j (accuracy, or the task's own
    metric: ROUGE-L, exact match); blank where not measured."""
    acc = run["accuracy"] or [[None]]
    t = len(acc)
    data = np.array([[math.nan if v is None else v for v in row] for row in acc], dtype=float)
    columns = data.shape[1]  # t, or 1 for a joint (mtl) run: one step trained on every task
    size = max(3.5, 0.6 * t + 2)
    fig = Figure(figsize=(size + 1, size))
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(data), cmap="viridis", vmin=0, vmax=100)
    labels = [f"{k + 1}. {_short(name)}" for k, name in enumerate(run["tasks"][:t])]
    ax.set_xticks(range(columns),
                  [str(k + 1) for k in range(columns)] if columns == t else ["all (joint)"])
    ax.set_yticks(range(t), labels)
    ax.set_xlabel("after training task j (blank: not measured)")
    ax.set_ylabel("evaluated task i")
    if t <= 16:
        for i in range(t):
            for j in range(columns):
                if not math.isnan(data[i, j]):
                    colour = "black" if data[i, j] > 60 else "white"
                    ax.text(j, i, f"{data[i, j]:.1f}", ha="center", va="center",
                            fontsize=8, color=colour)
    kinds = sorted(set(run.get("metrics") or ["accuracy"]))
    what = "score (each task's metric)" if len(kinds) > 1 else METRIC_TITLES.get(kinds[0],
                                                                                  kinds[0])
    fig.colorbar(im, ax=ax, label=what, fraction=0.046, pad=0.04)
    aa = run["scores"].get("AA")
    title = "accuracy" if what == "accuracy (%)" else "score"
    ax.set_title(f"{run['name']}: {title} matrix" + (f" (AA {aa:.1f})" if aa is not None else ""))
    return _save(fig, path)


def collision_categories(
    dw_i: torch.Tensor, dw_j: torch.Tensor, threshold: float, mode: ThresholdMode
) -> np.ndarray:
    """0 neither, 1 task-i only, 2 task-j only, 3 both (a collision)."""
    nz_i = nonzero_mask(dw_i, threshold, mode)
    nz_j = nonzero_mask(dw_j, threshold, mode)
    return (nz_i.int() + 2 * nz_j.int()).numpy()


def collision_map(
    dw_i: torch.Tensor,
    dw_j: torch.Tensor,
    path: Path | str,
    threshold: float,
    mode: ThresholdMode,
    labels: tuple[str, str] = ("task 1", "task 2"),
    title: str = "",
    crop: int | None = 96,
) -> Path:
    """Fig. 2: where ΔW_i and ΔW_j are non-zero, alone or together, for one module.

    Large matrices are cropped to their top-left ``crop``×``crop`` block so that single entries
    stay visible; the rates in the legend are over the whole matrix.
    """
    cats = collision_categories(dw_i, dw_j, threshold, mode)
    full = cats.size
    rates = [float((cats == k).sum()) / full for k in range(4)]
    shown = cats[:crop, :crop] if crop else cats
    fig = Figure(figsize=(6.4, 5.2))
    ax = fig.add_subplot()
    ax.imshow(shown, cmap=ListedColormap(COLLISION_COLOURS), vmin=-0.5, vmax=3.5,
              interpolation="nearest")
    ax.set_xlabel("input index")
    ax.set_ylabel("output index")
    names = ["neither (≈0)", f"{labels[0]} only", f"{labels[1]} only", "both (collision)"]
    handles = [Patch(color=c, label=f"{n}: {100 * r:.1f}%")
               for c, n, r in zip(COLLISION_COLOURS, names, rates, strict=True)]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8)
    rule = f"|x| > {threshold:g}" + ("·max|ΔW|" if mode == "relative" else "")
    cropped = shown.shape != cats.shape
    sub = f"{rule}; shape {cats.shape[0]}×{cats.shape[1]}" + (
        f", top-left {shown.shape[0]}×{shown.shape[1]} shown" if cropped else "")
    ax.set_title(f"{title}\n{sub}" if title else sub, fontsize=9)
    return _save(fig, path)


def subspace_use_per_layer(
    runs: Sequence[dict[str, Any]], path: Path | str, task: int = 0
) -> Path:
    """Fig. 3: subspaces used per layer by task ``task`` (0-based), one panel per run.

    Bars: normalised use ‖ΔW‖_*/‖ΔW‖_2 (≤ r), averaged over the layer's modules; dots (right
    axis): the raw nuclear norm ‖ΔW‖_* the paper plots. Dashed: averages over layers.
    """
    runs = [r for r in runs if r["parameter"]]
    colours = _method_colours(runs)
    fig = Figure(figsize=(8, 2.8 * max(1, len(runs))), layout="constrained")
    for k, run in enumerate(runs):
        ax = fig.add_subplot(len(runs), 1, k + 1)
        layers: dict[int, list[tuple[float, float]]] = {}
        per_module = run["parameter"]["per_module"]
        for order, m in enumerate(per_module.values()):
            layer = m["layer"] if m["layer"] is not None else order
            if task < len(m["subspace_use"]):
                pair = (m["subspace_use"][task], m["nuclear_norm"][task])
                layers.setdefault(layer, []).append(pair)
        xs = sorted(layers)
        use = [float(np.mean([u for u, _ in layers[x]])) for x in xs]
        nuc = [float(np.mean([n for _, n in layers[x]])) for x in xs]
        # this task's factor width bounds its subspace use (2r for SeqLoRA's differences)
        rank = max((m["rank"][task] for m in per_module.values()
                    if task < len(m["rank"]) and m["rank"][task] is not None),
                   default=None) or run["parameter"]["summary"]["rank"] or 1
        ax.bar(xs, use, color=colours[str(run["method"])], alpha=0.75,
               label="normalised ‖ΔW‖*/‖ΔW‖₂")
        if use:
            ax.axhline(float(np.mean(use)), ls="--", color="black", lw=1,
                       label=f"mean {np.mean(use):.2f} of rank ≤ {rank}")
        ax.set_ylim(0, rank * 1.05)
        ax.set_ylabel("subspaces used")
        ax2 = ax.twinx()
        ax2.plot(xs, nuc, "o", color="dimgray", ms=4, label="raw ‖ΔW‖*")
        if nuc:
            ax2.axhline(float(np.mean(nuc)), ls=":", color="dimgray", lw=1)
        ax2.set_ylim(0, max(nuc + [1e-12]) * 1.15)
        ax2.set_ylabel("raw nuclear norm", color="dimgray")
        tname = _short(run["tasks"][task]) if task < len(run["tasks"]) else str(task + 1)
        ax.set_title(f"{run['name']} ({run['method']}): task {task + 1} ({tname})",
                     fontsize=9, loc="left")
        lines = ax.get_legend_handles_labels()
        lines2 = ax2.get_legend_handles_labels()
        ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7, ncol=3,
                  loc="lower right", bbox_to_anchor=(1.0, 1.0), frameon=False,
                  borderaxespad=0.1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if k == len(runs) - 1:
            ax.set_xlabel("layer")
    return _save(fig, path)


def _method_colours(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    methods = sorted({str(r["method"]) for r in runs})
    cmap = matplotlib.colormaps["tab10"]
    return {m: cmap(k % 10) for k, m in enumerate(methods)}


def gsr_vs_acr(runs: Sequence[dict[str, Any]], path: Path | str) -> Path:
    """Fig. 5: generalized sparsity rate (x) against average collision rate (y), one point per
    run, labelled with its forgetting rate F.Ra."""
    runs = [r for r in runs if r["parameter"]]
    colours = _method_colours(runs)
    markers = "osD^vP*Xh<>"
    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.add_subplot()
    for k, run in enumerate(runs):
        s = run["parameter"]["summary"]
        x, y = s["GSR"], s["ACR"]
        if x is None or y is None:
            continue
        fra = run["scores"].get("F.Ra")
        tag = f"F.Ra {fra:.2f}" if fra is not None else "F.Ra n/a"
        # points are numbered; the legend names them, so close points stay readable
        ax.scatter([x], [y], s=60, color=colours[str(run["method"])], marker=markers[k % 11],
                   label=f"{k + 1}. {run['name']} ({run['method']}), {tag}", zorder=3)
        ax.annotate(str(k + 1), (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("generalized sparsity rate GSR (eq. 9; lower = sparser)")
    thr = runs[0]["parameter"]["threshold"] if runs else {"value": "", "mode": ""}
    ax.set_ylabel(f"ACR (eq. 10; threshold {thr['value']:g} {thr['mode']})" if runs else "ACR")
    ax.set_xlim(0, 1.05)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    if runs:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))
    ax.set_title("Sparsity, collisions and forgetting (Fig. 5)")
    return _save(fig, path)


def acr_curves(runs: Sequence[dict[str, Any]], path: Path | str) -> Path:
    """ACR as a function of the "non-zero" threshold, one line per run."""
    runs = [r for r in runs if r["parameter"]]
    methods = sorted({str(r["method"]) for r in runs})
    styles = {m: ["-", "--", ":", "-."][k % 4] for k, m in enumerate(methods)}
    method_colour = _method_colours(runs)  # same colours as Fig. 5 when methods tell runs apart
    one_per_method = len(methods) == len(runs)
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    for k, run in enumerate(runs):
        curve = run["parameter"]["acr_curve"]
        ys = [math.nan if v is None else v for v in curve["acr"]]
        # line style per method; colour per method, or per run when methods repeat
        colour = method_colour[str(run["method"])] if one_per_method else f"C{k % 10}"
        ax.plot(curve["thresholds"], ys, marker="o", ms=3, color=colour,
                ls=styles[str(run["method"])], label=f"{run['name']} ({run['method']})")
    if runs:
        thr = runs[0]["parameter"]["threshold"]
        ax.axvline(thr["value"], color="gray", ls="--", lw=1,
                   label=f"τ = {thr['value']:g} (used in tables)")
        unit = "× max|ΔW| (relative)" if thr["mode"] == "relative" else "(absolute)"
        ax.set_xlabel(f"threshold τ: non-zero means |x| > τ {unit}")
        ax.legend(fontsize=8)
    ax.set_xscale("log")
    ax.set_ylabel("ACR")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3, which="both")
    ax.set_title("Average collision rate vs. threshold")
    return _save(fig, path)


def unseen_tasks(runs: Sequence[dict[str, Any]], path: Path | str) -> Path:
    """Fig. 4: accuracy on a task not trained yet, after the last task before it, per run;
    beside them the base model's zero-shot accuracy when a run measured it."""
    runs = [r for r in runs if r["unseen"]]
    tasks = sorted({t for r in runs for t in r["unseen"]})
    base = next((r for r in runs if r.get("zero_shot")), None)
    series = [(f"{r['name']} ({r['method']})",
               [(r["unseen"].get(t) or {}).get("final") for t in tasks]) for r in runs]
    if base is not None:
        zero = dict(zip(base["tasks"], base["zero_shot"], strict=False))
        series.append(("base model (zero-shot)", [zero.get(t) for t in tasks]))
    fig = Figure(figsize=(max(5.0, 1.2 * len(tasks) * max(1, len(series)) + 2), 4))
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(series))
    for k, (label, ys) in enumerate(series):
        xs = [i + k * width for i in range(len(tasks))]
        ax.bar(xs, [math.nan if y is None else y for y in ys], width=width, label=label)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))], tasks)
    ax.set_ylabel("accuracy before the task is trained (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.set_title("Unseen-task generalisation (Fig. 4)")
    return _save(fig, path)
