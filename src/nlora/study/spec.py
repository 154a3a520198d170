"""A study's YAML spec, read and checked completely before anything runs.

Keys (docs/studies.md has an example of each)::

    name: quick                  # optional label
    options: {...}               # run options shared by every cell (keys of config.yaml)
    methods:                     # label -> {method, options, grid}; method defaults to label
      nlora: {grid: {l1_lambda: [0.001, 0.01]}}
      seqlora: {}
    orders: [order1, {mine: [sst-2, agnews]}, {o1: {order: order1, substitute: {yahoo: yelp}}}]
    seeds: [1, 2, 3]
    select: {metric: AA, validation_per_task: 50, seeds: [1], orders: [order1]}
    report: {metrics: [AA, F.Ra, BWT, FWT], reference: seqlora, groups: {avg: [order1]}}
    resources: {gpus_per_run: 0, cpus_per_run: 1, retries: 1, ray: {...}, slurm: {...}}

Every option key and value is checked through the run options' declarations
(``nlora.config``), and every cell's config is built with ``make_config`` here, so an unknown
method, option, order or task fails with one line naming the key and the file.
"""

from __future__ import annotations

import difflib
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nlora.config import EXTRA_OPTIONS, FIELDS, coerce_options
from nlora.errors import ConfigError, NloraError
from nlora.methods import METHODS
from nlora.orders import ORDERS, get_order

# metric -> which end is better (selection), as printed; "" where neither end is (a measure)
METRICS: dict[str, str] = {
    "AA": "max", "AA_pooled": "max", "F.Ra": "min", "BWT": "max", "FWT": "max",
    "ACR": "min", "ACR_exact": "min", "density": "min", "density_exact": "min", "OO": "min",
    "subspace_use": "", "minutes": "min",
    "EM": "max",  # mean final exact match, in runs with a ROUGE-L task (docs/benchmarks.md)
}
# from the saved adapters (nlora.analysis); ACR and density at 1 % of each matrix's max and
# at exactly zero (_exact); subspace_use: Σσ/σ_max of ΔW (docs/metrics.md)
PARAMETER_METRICS = ("ACR", "ACR_exact", "density", "density_exact", "OO", "subspace_use")
SELECTABLE = ("AA", "AA_pooled", "F.Ra", "BWT", "FWT", "EM")  # scored on validation rows
# set by the study itself for each cell, never by the spec's options
STUDY_KEYS = ("method", "order", "tasks", "seed", "eval_split", "validation_per_task")
TOP = ("name", "options", "methods", "orders", "seeds", "select", "report", "resources")


@dataclass(frozen=True)
class OrderSpec:
    name: str
    options: dict[str, Any]  # {"order": ..., "substitute": ...} or {"tasks": [...]}


@dataclass(frozen=True)
class MethodSpec:
    label: str
    method: str
    options: dict[str, Any]
    grid: dict[str, list[Any]]

    def points(self) -> list[dict[str, Any]]:
        """The grid's Cartesian product, in the spec's order (one empty point without grid)."""
        keys = list(self.grid)
        return [dict(zip(keys, values, strict=True))
                for values in itertools.product(*(self.grid[k] for k in keys))]


@dataclass
class Resources:
    gpus_per_run: float = 0
    cpus_per_run: int = 1
    retries: int = 1  # a cell whose worker died (signal, lost node) is started again
    ray: dict[str, Any] = field(default_factory=dict)  # address, init (ray.init keywords)
    slurm: dict[str, Any] = field(default_factory=dict)  # partition, time_min, ...


@dataclass
class StudySpec:
    path: Path
    name: str
    options: dict[str, Any]
    methods: list[MethodSpec]
    orders: list[OrderSpec]
    seeds: list[int]
    select_metric: str
    validation_per_task: int | None
    select_seeds: list[int]
    select_orders: list[str]
    report_metrics: list[str]
    reference: str | None
    groups: dict[str, list[str]]
    resources: Resources

    def method(self, label: str) -> MethodSpec:
        return next(m for m in self.methods if m.label == label)

    def order(self, name: str) -> OrderSpec:
        return next(o for o in self.orders if o.name == name)


SLURM_KEYS = ("partition", "time_min", "array_parallelism", "cluster", "mem_gb", "account",
              "qos", "constraint")
RAY_KEYS = ("address", "init")


def _fail(path: Path, key: str, message: str) -> ConfigError:
    return ConfigError(f"{path}: {key}: {message}")


def _mapping(path: Path, key: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(path, key, f"expected a mapping, got {type(value).__name__}")
    return value


def _known(path: Path, key: str, value: str, known: list[str] | tuple[str, ...], what: str):
    if value not in known:
        close = difflib.get_close_matches(str(value), list(known), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise _fail(path, key, f"unknown {what} {value!r}{hint}; known: {', '.join(known)}")


def _check_options(path: Path, key: str, options: Any, allow_extra: bool = True) -> dict:
    options = _mapping(path, key, options)
    for name in options:
        if name in STUDY_KEYS:
            raise _fail(path, f"{key}.{name}", "set by the study for each cell (use methods, "
                        "orders, seeds, select) and not an option here")
        known = [*FIELDS, *(EXTRA_OPTIONS if allow_extra else ())]
        _known(path, f"{key}.{name}", name, [k for k in known if k not in STUDY_KEYS],
               "option")
    try:
        return coerce_options(options, f"{path}: {key}")
    except ConfigError as err:
        raise ConfigError(str(err)) from None


def _ints(path: Path, key: str, value: Any) -> list[int]:
    if not isinstance(value, list) or not value or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise _fail(path, key, f"expected a non-empty list of whole numbers >= 0, got {value!r}")
    if len(set(value)) != len(value):
        raise _fail(path, key, f"a value appears twice in {value}")
    return list(value)


def _orders(path: Path, value: Any) -> list[OrderSpec]:
    if not isinstance(value, list) or not value:
        raise _fail(path, "orders", "expected a non-empty list of order names or "
                    "{name: [tasks]} entries")
    out: list[OrderSpec] = []
    for i, item in enumerate(value):
        key = f"orders[{i}]"
        if isinstance(item, str):
            try:
                get_order(item)
            except ConfigError:
                _known(path, key, item, list(ORDERS), "order")
            out.append(OrderSpec(item, {"order": get_order(item).name}))
            continue
        if not isinstance(item, dict) or len(item) != 1:
            raise _fail(path, key, "expected an order name or a one-key mapping "
                        "{name: [tasks]} / {name: {order: ..., substitute: ...}}")
        name, body = next(iter(item.items()))
        name = str(name)
        if isinstance(body, list) and body and all(isinstance(t, str) for t in body):
            if name in ORDERS:
                raise _fail(path, key, f"{name!r} is a preset order's name; name your task "
                            "list otherwise")
            out.append(OrderSpec(name, {"tasks": list(body)}))
        elif isinstance(body, dict):
            extra = sorted(set(body) - {"order", "substitute"})
            if extra:
                raise _fail(path, f"{key}.{name}", f"unknown key {extra[0]!r} (order, "
                            "substitute)")
            preset = str(body.get("order", name))
            _known(path, f"{key}.{name}.order", preset, list(ORDERS), "order")
            options = {"order": preset}
            if body.get("substitute"):
                options["substitute"] = body["substitute"]
            out.append(OrderSpec(name, options))
        else:
            raise _fail(path, f"{key}.{name}", "expected a list of task names or "
                        "{order: NAME, substitute: {OLD: NEW}}")
    names = [o.name for o in out]
    if len(set(names)) != len(names):
        raise _fail(path, "orders", f"an order appears twice in {', '.join(names)}")
    return out


def _methods(path: Path, value: Any) -> list[MethodSpec]:
    value = _mapping(path, "methods", value)
    if not value:
        raise _fail(path, "methods", "name at least one method")
    out = []
    for label, body in value.items():
        key = f"methods.{label}"
        body = _mapping(path, key, body)
        extra = sorted(set(body) - {"method", "options", "grid"})
        if extra:
            raise _fail(path, key, f"unknown key {extra[0]!r} (method, options, grid)")
        method = str(body.get("method", label))
        _known(path, f"{key}.method", method, list(METHODS), "method")
        options = _check_options(path, f"{key}.options", body.get("options"))
        grid_in = _mapping(path, f"{key}.grid", body.get("grid"))
        grid: dict[str, list[Any]] = {}
        for name, values in grid_in.items():
            gkey = f"{key}.grid.{name}"
            if not isinstance(values, list) or not values:
                raise _fail(path, gkey, "expected a non-empty list of values")
            _check_options(path, gkey, {name: values[0]}, allow_extra=False)
            grid[name] = [_check_options(path, gkey, {name: v}, False)[name] for v in values]
            if len({repr(v) for v in grid[name]}) != len(grid[name]):
                raise _fail(path, gkey, f"a value appears twice in {values}")
        out.append(MethodSpec(str(label), method, options, grid))
    return out


def read_spec(path: str | Path, check: bool = True) -> StudySpec:
    """The spec file, checked: structure, keys, values, and (``check``) every cell's config."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study spec {path} not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: malformed YAML{where}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with keys {', '.join(TOP)}")
    for key in raw:
        _known(path, str(key), key, TOP, "key")
    for key in ("methods", "orders", "seeds"):
        if key not in raw:
            raise _fail(path, key, "missing (every study names its methods, orders and seeds)")
    options = _check_options(path, "options", raw.get("options"))
    methods = _methods(path, raw["methods"])
    orders = _orders(path, raw["orders"])
    seeds = _ints(path, "seeds", raw["seeds"])
    order_names = [o.name for o in orders]

    select = _mapping(path, "select", raw.get("select"))
    extra = sorted(set(select) - {"metric", "validation_per_task", "seeds", "orders"})
    if extra:
        raise _fail(path, f"select.{extra[0]}", "unknown key (metric, validation_per_task, "
                    "seeds, orders)")
    metric = str(select.get("metric", "AA"))
    _known(path, "select.metric", metric, list(SELECTABLE), "metric")
    vpt = select.get("validation_per_task")
    if vpt is not None and (not isinstance(vpt, int) or isinstance(vpt, bool) or vpt < 1):
        raise _fail(path, "select.validation_per_task", f"expected a whole number >= 1, "
                    f"got {vpt!r}")
    select_seeds = _ints(path, "select.seeds", select["seeds"]) if "seeds" in select else seeds
    for s in select_seeds:
        if s not in seeds:
            raise _fail(path, "select.seeds", f"seed {s} is not in seeds {seeds}")
    select_orders = select.get("orders", order_names)
    if not isinstance(select_orders, list) or not select_orders:
        raise _fail(path, "select.orders", "expected a non-empty list of the spec's orders")
    for name in select_orders:
        _known(path, "select.orders", name, order_names, "order")

    report = _mapping(path, "report", raw.get("report"))
    extra = sorted(set(report) - {"metrics", "reference", "groups"})
    if extra:
        raise _fail(path, f"report.{extra[0]}", "unknown key (metrics, reference, groups)")
    report_metrics = report.get("metrics", ["AA", "F.Ra", "BWT", "FWT"])
    if not isinstance(report_metrics, list) or not report_metrics:
        raise _fail(path, "report.metrics", "expected a non-empty list")
    for m in report_metrics:
        _known(path, "report.metrics", m, list(METRICS), "metric")
    reference = report.get("reference")
    labels = [m.label for m in methods]
    if reference is not None:
        _known(path, "report.reference", reference, labels, "method")
    groups = _mapping(path, "report.groups", report.get("groups")) or {"avg": order_names}
    for gname, members in groups.items():
        if not isinstance(members, list) or not members:
            raise _fail(path, f"report.groups.{gname}", "expected a non-empty list of orders")
        for name in members:
            _known(path, f"report.groups.{gname}", name, order_names, "order")

    res = _mapping(path, "resources", raw.get("resources"))
    extra = sorted(set(res) - {"gpus_per_run", "cpus_per_run", "retries", "ray", "slurm"})
    if extra:
        raise _fail(path, f"resources.{extra[0]}", "unknown key (gpus_per_run, cpus_per_run, "
                    "retries, ray, slurm)")
    resources = Resources(
        gpus_per_run=_number(path, "resources.gpus_per_run", res.get("gpus_per_run", 0), 0),
        cpus_per_run=int(_number(path, "resources.cpus_per_run", res.get("cpus_per_run", 1), 1)),
        retries=int(_number(path, "resources.retries", res.get("retries", 1), 0)),
        ray=_sub(path, "resources.ray", res.get("ray"), RAY_KEYS),
        slurm=_sub(path, "resources.slurm", res.get("slurm"), SLURM_KEYS),
    )
    spec = StudySpec(
        path=path, name=str(raw.get("name") or path.stem), options=options, methods=methods,
        orders=orders, seeds=seeds, select_metric=metric, validation_per_task=vpt,
        select_seeds=select_seeds, select_orders=list(select_orders),
        report_metrics=list(report_metrics), reference=reference, groups=dict(groups),
        resources=resources,
    )
    if check:
        check_cells(spec)
    return spec


def _number(path: Path, key: str, value: Any, low: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < low:
        raise _fail(path, key, f"expected a number >= {low:g}, got {value!r}")
    return value


def _sub(path: Path, key: str, value: Any, known: tuple[str, ...]) -> dict[str, Any]:
    value = _mapping(path, key, value)
    for name in value:
        _known(path, f"{key}.{name}", name, known, "key")
    return dict(value)


def cell_options(spec: StudySpec, label: str, order: str, seed: int,
                 point: dict[str, Any], tune: bool) -> dict[str, Any]:
    """The options of one cell, for ``make_config``: shared < method < grid point < cell."""
    method = spec.method(label)
    options = {**spec.options, **method.options, **point, "method": method.method,
               "seed": seed, **spec.order(order).options}
    if tune:
        options["eval_split"] = "validation"
        if spec.validation_per_task is not None:
            options["validation_per_task"] = spec.validation_per_task
    return options


def check_cells(spec: StudySpec) -> None:
    """Build every cell's config the study may run (each grid point, order and seed), so a
    bad value or a missing task fails now, naming the method and order."""
    from nlora.presets import make_config

    for method in spec.methods:
        for order in spec.orders:
            for point in method.points():
                try:
                    make_config(**cell_options(spec, method.label, order.name, spec.seeds[0],
                                               point, tune=False))
                    if len(method.points()) > 1:
                        make_config(**cell_options(spec, method.label, order.name,
                                                   spec.seeds[0], point, tune=True))
                except NloraError as err:
                    where = f"methods.{method.label}, orders {order.name}"
                    if point:
                        where += f", grid {point}"
                    raise ConfigError(f"{spec.path}: {where}: {err}") from None
