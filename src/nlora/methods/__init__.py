"""Continual-learning methods, each one small file behind ``ContinualMethod``.

Adding a method: write ``methods/NAME.py`` with a ``ContinualMethod`` subclass and list it
below. Their options and defaults are documented in docs/methods.md.
"""

from __future__ import annotations

from nlora.errors import ConfigError
from nlora.methods.base import ContinualMethod
from nlora.methods.ewc import EWC
from nlora.methods.inclora import IncLoRA
from nlora.methods.inflora import InfLoRA
from nlora.methods.l2p import L2P
from nlora.methods.lfpt5 import LFPT5
from nlora.methods.lwf import LwF
from nlora.methods.mtl import MTL
from nlora.methods.nlora import NLoRA
from nlora.methods.olora import OLoRA
from nlora.methods.olora_nlora import OLoRANLoRA
from nlora.methods.osf import OSF
from nlora.methods.pertaskft import PerTaskFT
from nlora.methods.progprompt import ProgPrompt
from nlora.methods.replay import Replay
from nlora.methods.seqft import SeqFT
from nlora.methods.seqlora import SeqLoRA

METHODS: dict[str, type[ContinualMethod]] = {
    m.name: m
    for m in [
        NLoRA, OLoRA, OLoRANLoRA, IncLoRA, SeqLoRA, SeqFT, Replay, EWC, LwF, MTL, PerTaskFT,
        L2P, LFPT5, ProgPrompt, OSF, InfLoRA,
    ]
}


def get_method(name: str) -> type[ContinualMethod]:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]
