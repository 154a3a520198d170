"""From a user's options to a run's full settings: what every option not given defaults to.

``make_config(**options)`` is the one place where defaults are decided, whoever asks: the
``nlora`` command (its flags), a YAML config file, or Python code. An option not given takes,
from the first source that has it:

1. ``protocol="release"``: the released code's value (``nlora.release``): what every released
   run shares (truncation, clipping, scorer, seeds, ...) and the method's own script for the
   order (schedule, batch and accumulation, precision, penalty form and weights);
2. the method's own source under either protocol: O-LoRA's scripts for ``olora``, ``inclora``
   and ``seqlora`` (baselines run as their authors ran them);
3. the method's default (``METHOD_DEFAULTS``), then the task order's preset from the N-LoRA
   paper (``nlora.orders``), then ``RunConfig``'s own default.

Where each such value came from is kept in ``RunConfig.preset_sources`` (config.yaml) and
printed by the run (``describe_presets``). Task names are resolved against the data folder,
and a task whose data is absent fails here, before anything runs.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from nlora.config import DEFAULT_L1_LAMBDA, METHOD_DEFAULTS, PROTOCOLS, RunConfig
from nlora.data import (
    KNOWN_CATEGORIES,
    data_dir_from,
    read_instructions,
    resolve_task,
    task_is_available,
)
from nlora.errors import ConfigError, DataError
from nlora.orders import PAPER_BASE_LAMBDA, Order, get_order, substitute
from nlora.release import COMMON, method_script

FIELDS = tuple(f.name for f in dataclasses.fields(RunConfig))
EXTRA_OPTIONS = ("substitute",)  # options that shape the config but are not stored in it
ORDER_PRESETS = ("learning_rate", "epochs", "batch_size")
FLAG_KEYS = {"lr": "learning_rate", "data": "data_dir"}  # flags named unlike their key
RECORDS = ("preset_sources", "preset_notes")  # written by make_config, never given
L1_METHODS = ("nlora", "olora+nlora")  # the methods whose loss has the ℓ1 term
# Baselines whose schedule comes from their authors' scripts under either protocol.
OWN_SOURCE = ("olora", "inclora", "seqlora")

Layer = dict[str, tuple[Any, str]]  # field -> (value, where it comes from)
COMMON_LAYER: Layer = {f: (v, f"release: {src}") for f, (v, src) in COMMON.items()}


def make_config(**options: Any) -> RunConfig:
    """A validated ``RunConfig`` from user options.

    Keyword names are ``RunConfig`` fields, plus ``substitute`` ({"yahoo": "yelp"} or
    ["yahoo=yelp"]) to swap tasks of ``order``. ``tasks`` given explicitly win over the
    order's list (the order then only brings its hyperparameters); ``data_dir`` defaults to
    ``$NLORA_DATA``. Unknown names are an error naming them.
    """
    unknown = sorted(set(options) - set(FIELDS) - set(EXTRA_OPTIONS))
    if unknown:
        raise ConfigError(f"unknown option {', '.join(unknown)}")
    given = {k: v for k, v in options.items() if v is not None and k not in RECORDS}
    protocol = given.get("protocol", RunConfig.protocol)
    if protocol not in PROTOCOLS:
        raise ConfigError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    if "instructions" in given:
        given["instructions"] = _instructions(given["instructions"])
    substitutions = parse_substitutions(given.pop("substitute", None) or {})
    data_dir = data_dir_from(given.get("data_dir"))
    order = get_order(given["order"]) if given.get("order") else None
    if "tasks" in given:
        if substitutions:
            raise ConfigError("--substitute applies to --order; edit --tasks instead")
        names = _task_list(given["tasks"])
    elif order is not None:
        names = substitute(order.tasks, substitutions)
    else:
        raise ConfigError("no tasks: pass --order NAME or --tasks a,b,c")
    method = given.get("method", RunConfig.method)
    from nlora.methods import get_method  # heavy (torch, PEFT): only once options parse

    get_method(method)  # an unknown method fails here, before anything runs
    values = dict(given)
    values["data_dir"] = str(data_dir)
    values["tasks"] = [
        _available_task(data_dir, name, order.name if order else None) for name in names
    ]
    values["order"] = order.name if order else None
    presets, notes = preset_layers(method, order, protocol, given)
    for field, (value, _source) in presets.items():
        if field not in given:
            values[field] = value
    values["preset_sources"] = {f: src for f, (_, src) in presets.items() if f not in given}
    values["preset_notes"] = notes
    # a run's own config.yaml given back: where its values came from stays recorded
    recorded = options.get("preset_sources") or {}
    for field in FIELDS:
        if field in recorded and field in given and field not in values["preset_sources"]:
            values["preset_sources"][field] = recorded[field]
    if not notes and options.get("preset_notes"):
        values["preset_notes"] = list(options["preset_notes"])
    config = RunConfig(**values)
    config.validate()
    return config


def read_options(path: str | Path) -> dict[str, Any]:
    """The options of a YAML config file, for ``make_config(**options)``.

    Its keys are those of a run folder's ``config.yaml`` (``RunConfig`` fields, plus
    ``substitute``), so a finished run's config reruns as it is. An unknown key, a file that
    is not a mapping or malformed YAML is a one-line error naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        options = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: malformed YAML{where}") from None
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value, got "
                          f"{type(options).__name__}")
    known = set(FIELDS) | set(EXTRA_OPTIONS)
    for key in options:
        if key not in known:
            close = _closest_key(str(key), known)
            hint = f" (did you mean {close!r}?)" if close else ""
            raise ConfigError(f"{path}: unknown key {key!r}{hint}; keys are those of a run's "
                              "config.yaml")
    return options


def _closest_key(key: str, known: set[str]) -> str | None:
    """The key a flag-like or misspelt ``key`` probably means (``lr``, ``lora-r``, ...)."""
    spelled = key.lstrip("-").replace("-", "_")
    spelled = FLAG_KEYS.get(spelled, spelled)
    if spelled in known:
        return spelled
    close = difflib.get_close_matches(spelled, sorted(known), n=1)
    return close[0] if close else None


def combine_options(from_file: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
    """A config file's options overridden by those given (e.g. flags).

    A new task sequence replaces the file's: ``order`` given without ``tasks`` drops the
    file's resolved ``tasks`` (and its ``substitute`` goes with a new ``tasks`` list).
    """
    base = dict(from_file)
    if "order" in given and "tasks" not in given:
        base.pop("tasks", None)
    if "tasks" in given:
        base.pop("substitute", None)
    if isinstance(base.get("preset_sources"), Mapping):  # a value given anew has no preset
        base["preset_sources"] = {
            k: v for k, v in base["preset_sources"].items() if k not in given
        }
    return {**base, **given}


def preset_layers(
    method: str, order: Order | None, protocol: str, given: Mapping[str, Any]
) -> tuple[Layer, list[str]]:
    """Every preset value for ``method`` on ``order`` under ``protocol``, with its source,
    lowest precedence first (later layers win); and notes worth printing."""
    merged: Layer = {}
    notes: list[str] = []
    if order is not None:  # the N-LoRA paper's settings of the order (Appendix 7.5)
        for field in ORDER_PRESETS:
            merged[field] = (_plain(getattr(order, field)), f"paper Appendix 7.5 ({order.name})")
    for field, value in METHOD_DEFAULTS.get(method, {}).items():
        merged[field] = (value, f"nlora default for {method} (docs/methods.md)")
    release, script = method_script(method, order.name if order else None)
    where = f"{release} {script.source}" if script else ""
    own_source = script is not None and method in OWN_SOURCE
    if own_source:  # baselines as their authors ran them, under either protocol
        merged.update({f: (v, where) for f, v in script.hyperparameters().items()})
    if protocol == "release":
        merged.update(COMMON_LAYER)
        if script is None:
            notes.append(
                f"{method} has no released script for "
                f"{order.name if order else 'custom tasks'}: its schedule is nlora's "
                "(docs/methods.md)"
            )
        else:
            merged.update({f: (v, where) for f, v in script.mechanics().items()})
            hyper = script.hyperparameters()
            if "l1_on" in given and given["l1_on"] != hyper.get("l1_on", given["l1_on"]):
                hyper.pop("l1_lambda", None)  # the released λ belongs to the released form
            merged.update({f: (v, where) for f, v in hyper.items()})
    if script is not None and script.note and (protocol == "release" or own_source):
        notes.append(script.note)
    if "l1_lambda" not in merged and method in L1_METHODS:
        l1_on = given.get("l1_on", merged.get("l1_on", (RunConfig.l1_on, ""))[0])
        source = (
            f"paper Appendix 7.5 λ ({order.name})" if order and l1_on == "reference"
            else "nlora default λ" + (f" x the paper's λ of {order.name} / 0.4" if order else "")
        )
        merged["l1_lambda"] = (default_l1_lambda(order, l1_on), source)
    return merged, notes



def describe_presets(config: RunConfig) -> list[str]:
    """Lines saying which protocol ran and every value it or a preset set (with sources)."""
    lines = [f"protocol {config.protocol}: options not given were set as follows"]
    for field, source in config.preset_sources.items():
        lines.append(f"  {field} = {getattr(config, field)!r}  ({source})")
    lines += [f"  note: {note}" for note in config.preset_notes]
    return lines


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _instructions(value: Any) -> dict[str, str]:
    """--instructions: a JSON/YAML file path, or a mapping given from Python or config.yaml."""
    if isinstance(value, Mapping):
        return {str(k): str(v) for k, v in value.items()}
    return read_instructions(value)


def default_l1_lambda(order: Order | None, l1_on: str) -> float | list[float]:
    """The ℓ1 weight when none is given: nlora's default, scaled by the order's paper λ.

    The paper tuned λ for the released code's r × r form (``l1_on="reference"``), which then
    takes the paper's values as they are; the ΔW form keeps the order's relative pattern.
    """
    if order is None:
        return DEFAULT_L1_LAMBDA
    paper = order.paper_lambda
    if l1_on == "reference":
        return list(paper) if isinstance(paper, tuple) else paper
    if isinstance(paper, tuple):
        return [DEFAULT_L1_LAMBDA * p / PAPER_BASE_LAMBDA for p in paper]
    return DEFAULT_L1_LAMBDA * paper / PAPER_BASE_LAMBDA


def parse_substitutions(value: Mapping[str, str] | Iterable[str] | str) -> dict[str, str]:
    """{"yahoo": "yelp"} from a mapping, "yahoo=yelp,wic=sst-2" or a list of such strings."""
    if isinstance(value, Mapping):
        return {str(k): str(v) for k, v in value.items()}
    items = [value] if isinstance(value, str) else list(value)
    pairs = {}
    for item in items:
        for part in _task_list(item):
            old, sep, new = part.partition("=")
            if not sep or not old.strip() or not new.strip():
                raise ConfigError(f"--substitute expects OLD=NEW, got {part!r}")
            pairs[old.strip()] = new.strip()
    return pairs


def _task_list(value: str | Iterable[str]) -> list[str]:
    items = value.split(",") if isinstance(value, str) else list(value)
    return [str(x).strip() for x in items if str(x).strip()]


def _available_task(data_dir: Path, name: str, order: str | None) -> str:
    if task_is_available(data_dir, name):
        return "/".join(resolve_task(data_dir, name))
    category = KNOWN_CATEGORIES.get(name.lower())
    label = f"{category}/{name}" if category else name
    where = f"{order} needs" if order else "--tasks names"
    hint = f"--substitute {name}=OTHER (e.g. {name}=yelp)" if order else "drop or replace it"
    raise DataError(
        f"{where} {label}, which has no train.json/test.json in {data_dir}; substitute another "
        f"task: {hint}"
    )
