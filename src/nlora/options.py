"""Options declared once: type, default, help, bounds and choices in a dataclass field.

Every run option is a dataclass field made with ``option(...)`` (the core ones in
``nlora.config``, each method's own in its file). From that one declaration come the
command-line flag and its ``--help`` (``add_arguments``), the checks and their one-line
messages (``check``), typed reading of values from YAML or Python (``coerce``) and the option
table of docs/options.md (``option_table``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from nlora.errors import ConfigError

KINDS = ("int", "float", "bool", "str", "names", "floats", "mapping")


@dataclass(frozen=True)
class Spec:
    """What one option is. ``kind``: int, float, bool, str, names (list of strings, ``a,b``
    on the command line), floats (list of numbers) or mapping (str -> str)."""

    kind: str
    help: str
    group: str
    flag: str = ""  # default: --name-with-dashes
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is not allowed
    high_open: bool = False  # high itself is not allowed
    nullable: bool = False  # None is a value (off / decided later)
    # one value, or a list with one value per task; for kind "floats": a list, one per task
    per_task: bool = False
    words: tuple[str, ...] = ()  # strings accepted beside numbers (--l1-lambda auto)
    show_default: bool = True  # "(default X)" in --help
    cli: bool = True  # False: set from elsewhere (e.g. a file the flag names)


def option(default: Any, help: str, kind: str, group: str, **spec: Any) -> Any:
    """A dataclass field that is a run option (see ``Spec`` for the keywords)."""
    if kind not in KINDS:
        raise ValueError(f"unknown option kind {kind!r}")
    meta = {"option": Spec(kind=kind, help=help, group=group, **spec)}
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def specs(cls: type) -> dict[str, Spec]:
    """Field name -> Spec of every option of a dataclass (records are no options)."""
    return {f.name: f.metadata["option"] for f in dataclasses.fields(cls)
            if "option" in f.metadata}


def flag_of(name: str, spec: Spec) -> str:
    return spec.flag or "--" + name.replace("_", "-")


def defaults(cls: type) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


# --------------------------------------------------------------------------------------------
# Values: typed reading (YAML, Python) and checks
# --------------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _one(kind: str, value: Any) -> Any:
    """``value`` as one value of ``kind``, or raise TypeError. Numbers written as strings
    count (YAML reads ``1e-3`` as a string); a bool is never a number."""
    if kind in ("float", "floats"):
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise TypeError from None
        if not _is_number(value):
            raise TypeError
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise TypeError
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise TypeError
        return value
    raise TypeError


_EXPECTED = {"int": "a whole number", "float": "a number", "bool": "true or false",
             "str": "a string", "names": "a list of names", "floats": "a list of numbers",
             "mapping": "a mapping of names to strings"}


def coerce(name: str, spec: Spec, value: Any) -> Any:
    """A value given from YAML or Python, typed; ConfigError naming the option otherwise."""
    if value is None and spec.nullable:
        return None
    expected = _EXPECTED[spec.kind]
    try:
        if spec.words and isinstance(value, str) and value.strip().lower() in spec.words:
            return value.strip().lower()
        if spec.kind == "names":
            items = value.split(",") if isinstance(value, str) else value
            if not isinstance(items, list | tuple):
                raise TypeError
            return [_one("str", x).strip() for x in items if _one("str", x).strip()]
        if spec.kind == "floats":
            if not isinstance(value, list | tuple):
                raise TypeError
            return [_one("float", x) for x in value]
        if spec.kind == "mapping":
            if not isinstance(value, Mapping):
                raise TypeError
            return {_one("str", k): _one("str", v) for k, v in value.items()}
        if spec.per_task and isinstance(value, list | tuple):
            expected = f"{_EXPECTED[spec.kind]} or a list of them, one per task"
            return [_one(spec.kind, x) for x in value]
        if spec.per_task:
            expected = f"{_EXPECTED[spec.kind]} or a list of them, one per task"
        return _one(spec.kind, value)
    except TypeError:
        if spec.words:
            expected += " or " + " or ".join(repr(w) for w in spec.words)
        raise ConfigError(f"{name} must be {expected}, got {value!r}") from None


def _number(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _bounds_text(spec: Spec) -> str:
    if spec.kind == "int":
        text = f"a whole number of at least {_number(spec.low)}"
        return text + (f" and at most {_number(spec.high)}" if spec.high is not None else "")
    text = f"a finite number {'>' if spec.low_open else '>='} {_number(spec.low)}"
    if spec.high is not None:
        text += f" and {'<' if spec.high_open else '<='} {_number(spec.high)}"
    return text


def _within(spec: Spec, value: Any) -> bool:
    if not (_is_number(value) and math.isfinite(value)):
        return False
    if spec.kind == "int" and not isinstance(value, int):
        return False
    if spec.low is not None and (value <= spec.low if spec.low_open else value < spec.low):
        return False
    return spec.high is None or (value < spec.high if spec.high_open else value <= spec.high)


def check(name: str, spec: Spec, value: Any, tasks: int) -> None:
    """Refuse an option value out of its declared range, with one line naming its flag."""
    flag = flag_of(name, spec)
    if value is None:
        if spec.nullable:
            return
        raise ConfigError(f"{flag} needs a value")
    if isinstance(value, list) and spec.per_task and len(value) != tasks:
        raise ConfigError(f"{flag} lists {len(value)} values for {tasks} tasks")
    # each value on its own: per-task lists and "floats" lists; a "names" list is one value
    values = value if isinstance(value, list) and spec.kind != "names" else [value]
    for each in values:
        if spec.words and each in spec.words:
            continue
        if spec.choices is not None and each not in spec.choices:
            raise ConfigError(f"{flag} must be one of {', '.join(spec.choices)}, got {each!r}")
        if spec.kind == "names" and not each:
            raise ConfigError(f"{flag} must name at least one")
        if spec.kind in ("int", "float", "floats") and (
            spec.low is not None or spec.high is not None
        ) and not _within(spec, each):
            words = "".join(f" or {w!r}" for w in spec.words)
            raise ConfigError(f"{flag} must be {_bounds_text(spec)}{words}, got {each}")


# --------------------------------------------------------------------------------------------
# The command line and the docs
# --------------------------------------------------------------------------------------------


def _split(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """One value, or one per task separated by commas."""
    def read(text: str) -> Any:
        values = [parse(x) for x in text.split(",")]
        return values[0] if len(values) == 1 else values
    return read


def _cli_type(spec: Spec) -> Callable[[str], Any] | None:
    if spec.kind == "names":
        return lambda text: [x.strip() for x in text.split(",") if x.strip()]
    if spec.kind == "floats":
        return lambda text: [float(x) for x in text.split(",")]
    base = {"int": int, "float": float}.get(spec.kind)
    if base is None:
        return None
    parse = _split(base) if spec.per_task else base
    if spec.words:
        words = spec.words
        return lambda text: text.strip().lower() if text.strip().lower() in words else parse(text)
    return parse


def help_text(spec: Spec, default: Any) -> str:
    text = spec.help
    if spec.show_default and default is not None and default != [] and default != {}:
        shown = "on" if default is True else "off" if default is False else default
        text += f" (default {shown})"
    return text.replace("%", "%%")  # argparse formats help with %


def add_arguments(
    parser: argparse.ArgumentParser,
    classes: Iterable[type],
    skip: Iterable[str] = (),
    groups: dict[str, Any] | None = None,
) -> None:
    """A flag per option of ``classes``, in argument groups (``groups``: title -> group made
    already); destinations are field names and absent unless given (the parser must use
    ``argument_default=argparse.SUPPRESS``)."""
    groups = dict(groups or {})
    skip = set(skip)
    for cls in classes:
        values = defaults(cls)
        for name, spec in specs(cls).items():
            if name in skip or not spec.cli:
                continue
            if spec.group not in groups:
                groups[spec.group] = parser.add_argument_group(spec.group)
            kwargs: dict[str, Any] = {"dest": name, "help": help_text(spec, values.get(name))}
            if spec.kind == "bool":
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["metavar"] = spec.metavar
                if spec.choices is not None:
                    kwargs["choices"] = spec.choices
                if _cli_type(spec) is not None:
                    kwargs["type"] = _cli_type(spec)
            groups[spec.group].add_argument(flag_of(name, spec), **kwargs)


def option_table(classes: Iterable[type]) -> str:
    """docs/options.md's table: every option's key, flag, default, range and meaning."""
    lines = ["| config.yaml key | flag | default | values | meaning |", "|---|---|---|---|---|"]
    for cls in classes:
        values = defaults(cls)
        for name, spec in specs(cls).items():
            if spec.choices:
                allowed = " \\| ".join(spec.choices)
            elif spec.low is not None or spec.high is not None:
                allowed = _bounds_text(spec)
            else:
                allowed = _EXPECTED[spec.kind]
            if spec.per_task:
                allowed += "; or one per task"
            if spec.words:
                allowed += "; or " + ", ".join(spec.words)
            if spec.nullable and spec.kind != "bool":
                allowed += "; or null"
            flag = f"`{flag_of(name, spec)}`"
            default = values.get(name)
            shown = "–" if default in (None, [], {}, "") else f"`{default}`"
            meaning = spec.help.replace("|", "\\|")
            lines.append(f"| `{name}` | {flag} | {shown} | {allowed} | {meaning} |")
    return "\n".join(lines) + "\n"
