"""Continual-learning methods, each one small file behind ``ContinualMethod``."""

from __future__ import annotations

from nlora.errors import ConfigError
from nlora.methods.base import ContinualMethod
from nlora.methods.nlora import NLoRA

METHODS: dict[str, type[ContinualMethod]] = {m.name: m for m in [NLoRA]}


def get_method(name: str) -> type[ContinualMethod]:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]
