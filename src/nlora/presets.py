"""From a user's options to a run's full settings: what every option not given defaults to.

``make_config(**options)`` is the one place where defaults are decided, whoever asks: the
``nlora`` command (its flags), a YAML config file, or Python code. An option not given takes,
from the first source that has it:

1. ``protocol="release"``: the released code's value (``nlora.release``): what every released
   run shares (truncation, clipping, scorer, seeds, ...) and the method's own script for the
   order (schedule, batch and accumulation, precision, penalty form and weights);
2. the method's own source under either protocol: O-LoRA's scripts for ``olora``, ``inclora``
   and ``seqlora`` (baselines run as their authors ran them);
3. the method's default (its class's ``defaults``), then the task order's preset from the
   N-LoRA paper (``nlora.orders``), then ``RunConfig``'s own default.

Where each such value came from is kept in ``RunConfig.preset_sources`` (config.yaml) and
printed by the run (``describe_presets``). Task names are resolved against the data folder,
and a task whose data is absent fails here, before anything runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from nlora.config import (
    EXTRA_OPTIONS,
    FIELDS,
    PROTOCOLS,
    RECORDS,
    RunConfig,
    coerce_options,
    read_options,
)
from nlora.data import KNOWN_CATEGORIES, data_dir_from, read_instructions, resolve_task
from nlora.errors import ConfigError, DataError
from nlora.families import task_is_available
from nlora.methods import get_method
from nlora.methods.base import release_facts
from nlora.methods.nlora import DEFAULT_L1_LAMBDA
from nlora.orders import PAPER_BASE_LAMBDA, Order, get_order, substitute
from nlora.release import common_settings, method_script

__all__ = ["make_config", "read_options", "describe_presets", "combine_options"]

ORDER_PRESETS = ("learning_rate", "epochs", "batch_size")

Layer = dict[str, tuple[Any, str]]  # field -> (value, where it comes from)


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
    options = coerce_options(options)
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
            merged[field] = (_plain(getattr(order, field)), f"{order.source} ({order.name})")
    facts = get_method(method)
    for field, value in facts.defaults.items():
        merged[field] = (value, f"nlora default for {method} (docs/methods.md)")
    scripts, own_schedule, note = release_facts(facts)
    release, script = method_script(scripts, order.name if order else None, note)
    where = f"{release} {script.source}" if script else ""
    own_source = script is not None and own_schedule
    if own_source:  # baselines as their authors ran them, under either protocol
        merged.update({f: (v, where) for f, v in script.hyperparameters().items()})
    if protocol == "release":
        common = common_settings(order.name if order else None)
        merged.update({f: (v, f"release: {src}") for f, (v, src) in common.items()})
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
    if "l1_lambda" not in merged and facts.uses_l1:
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
    if not isinstance(value, str | list | tuple):
        raise ConfigError(f"--substitute expects OLD=NEW pairs, got {value!r}")
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
