"""Continual-learning methods, each one small file behind ``ContinualMethod``.

Adding a method is adding one file: ``methods/NAME.py`` with a ``ContinualMethod`` subclass
decorated with ``@register``, its options dataclass and its facts (docs/methods.md, "Adding a
method"). Every module of this package is imported here, so a new file registers itself.
"""

from __future__ import annotations

import importlib
import pkgutil

from nlora.errors import ConfigError
from nlora.methods.base import METHODS, ContinualMethod

# The paper's methods first (help and docs list them in registration order), then the rest.
_FIRST = ("nlora", "olora", "olora_nlora", "inclora", "seqlora")
for _module in sorted((m.name for m in pkgutil.iter_modules(__path__)),
                      key=lambda name: (name not in _FIRST, _FIRST.index(name)
                                        if name in _FIRST else 0, name)):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["METHODS", "ContinualMethod", "get_method"]


def get_method(name: str) -> type[ContinualMethod]:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]
