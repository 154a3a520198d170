"""The key/value cache argument under either of its transformers names.

transformers 5.24 renamed the cache a model's ``forward`` takes and returns from
``past_key_values`` to ``cache`` (the old name is deprecated, removal announced for 5.40).
nlora passes caches by hand (prefix cache, rank scoring, the shared-prefix training loss), so
it asks each model which name it takes instead of assuming one: the newest name where the
model has it, the old one on the older versions nlora supports.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

NAMES = ("cache", "past_key_values")  # newest first


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model inside a PEFT wrapper (whose own forward takes ``**kwargs``)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def cache_argument(model: torch.nn.Module) -> str | None:
    """The name under which ``model.forward`` takes a key/value cache, or None if it takes none."""
    accepted = inspect.signature(unwrap(model).forward).parameters
    return next((name for name in NAMES if name in accepted), None)


def with_cache(model: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """Keyword arguments that hand ``cache`` to ``model`` (nothing when ``cache`` is None)."""
    if cache is None:
        return {}
    name = cache_argument(model)
    if name is None:
        raise TypeError(f"{type(unwrap(model)).__name__}.forward takes no key/value cache")
    return {name: cache}


def returned_cache(outputs: Any) -> Any:
    """The cache a forward returned (``outputs.cache`` from 5.24 on, else ``past_key_values``)."""
    for name in NAMES:
        if name in outputs:  # ModelOutput is a dict of the fields that were set
            return outputs[name]
    return None
