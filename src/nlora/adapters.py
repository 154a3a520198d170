"""LoRA adapters through PEFT: add a fresh one, walk its factors, save, merge, reload, and
read a saved one back as factored updates for the parameter-space metrics."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import PreTrainedModel

from nlora.errors import ConfigError
from nlora.io import write_dir_atomic
from nlora.param_metrics import LoraUpdate

if TYPE_CHECKING:  # nlora.config imports the methods, which import this module
    from nlora.config import RunConfig


@dataclass
class LoraFactors:
    """One adapted module: ΔW = scaling · B @ A, with A (r, in) and B (out, r) as in PEFT."""

    name: str
    A: torch.Tensor
    B: torch.Tensor
    scaling: float


def lora_config(config: RunConfig, is_seq2seq: bool) -> LoraConfig:
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.target_modules,  # None: PEFT's query/value default per model type
        task_type=TaskType.SEQ_2_SEQ_LM if is_seq2seq else TaskType.CAUSAL_LM,
    )


def add_adapter(model: PreTrainedModel, config: RunConfig, is_seq2seq: bool) -> PeftModel:
    """Wrap ``model`` with a fresh trainable LoRA adapter; everything else is frozen."""
    return get_peft_model(model, lora_config(config, is_seq2seq))


def check_adapter(
    model: PreTrainedModel,
    config: RunConfig,
    is_seq2seq: bool,
    inspect: Callable[[PeftModel], None] | None = None,
) -> None:
    """Build the run's adapter on ``model`` (and let ``inspect`` look at it), then remove it:
    a bad ``--target-modules`` or adapter option fails here, before any run folder exists."""
    try:
        peft_model = add_adapter(model, config, is_seq2seq)
    except ValueError as err:
        if config.target_modules is None:
            raise ConfigError(f"cannot add a LoRA adapter to this model: {err}") from None
        names = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                        if isinstance(module, torch.nn.Linear)})
        raise ConfigError(
            f"--target-modules {','.join(config.target_modules)} matches no module of the "
            f"model; its linear layers are named {', '.join(names)}"
        ) from None
    try:
        for f in lora_factors(peft_model):  # a rank above min(out, in) adds nothing but size
            out_features, in_features = f.B.shape[0], f.A.shape[1]
            if config.lora_r > min(out_features, in_features):
                raise ConfigError(
                    f"--lora-r {config.lora_r} exceeds the rank {f.name} can have "
                    f"({out_features}x{in_features}, out x in); use at most "
                    f"{min(out_features, in_features)}"
                )
        if inspect is not None:
            inspect(peft_model)
    finally:
        peft_model.unload()  # the base model as it was, without LoRA layers


def module_key(name: str) -> str:
    """A module's name without PEFT's wrapper prefix, the same before and after merging."""
    return name.removeprefix("base_model.model.")


def lora_factors(model: torch.nn.Module) -> Iterator[LoraFactors]:
    """The active adapter's factors in every adapted module of ``model``."""
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter in module.active_adapters:
            if adapter in module.lora_A:
                yield LoraFactors(
                    name=name,
                    A=module.lora_A[adapter].weight,
                    B=module.lora_B[adapter].weight,
                    scaling=float(module.scaling[adapter]),
                )


def save_adapter(model: PeftModel, folder: Path, **options: Any) -> None:
    """PEFT's own format (safetensors), so plain ``PeftModel.from_pretrained`` reads it."""

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True, **options)
        for path in tmp.rglob("adapter_config.json"):
            sort_config_lists(path)

    write_dir_atomic(folder, fill)


def save_lora_factors(
    folder: Path, config: LoraConfig, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> None:
    """Factors {module name: (A, B)} written as a PEFT LoRA adapter (PEFT's own key names and
    file layout, so plain ``PeftModel.from_pretrained`` reads it), by methods whose layers are
    not PEFT's."""
    tensors = {}
    for name, (a, b) in factors.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.detach().cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.detach().cpu().contiguous()

    def fill(tmp: Path) -> None:
        config.save_pretrained(tmp)
        save_file(tensors, tmp / "adapter_model.safetensors")
        sort_config_lists(tmp / "adapter_config.json")

    write_dir_atomic(folder, fill)


def sort_config_lists(path: Path) -> None:
    """PEFT writes ``target_modules`` (a set) in hash order, which changes from process to
    process; sorted, the same run writes the same bytes every time (resume checks)."""
    config = json.loads(path.read_text(encoding="utf-8"))
    for key in ("target_modules", "modules_to_save", "exclude_modules"):
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    path.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")


def merge(model: PeftModel) -> PreTrainedModel:
    """Fold the adapter into the base weights and drop the LoRA layers."""
    return model.merge_and_unload()


def load_and_merge(model: PreTrainedModel, folder: Path) -> PreTrainedModel:
    return PeftModel.from_pretrained(model, folder).merge_and_unload()


_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.[^.]+)?\.weight$"
)


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    # PEFT matches rank_pattern/alpha_pattern keys as suffixes of the module name
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_lora_updates(adapter_dir: Path | str) -> dict[str, LoraUpdate]:
    """A saved PEFT LoRA adapter as {module name: LoraUpdate}; safetensors only (never pickle)."""
    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    factors: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            match = _KEY.match(key)
            if match:
                factors.setdefault(match["module"], {})[match["factor"]] = f.get_tensor(key)
    updates = {}
    for module, pair in factors.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"{adapter_dir}: module {module} lacks lora_A or lora_B")
        a, b = pair["A"].float(), pair["B"].float()
        r = a.shape[0]  # the tensor's own rank already reflects any rank_pattern
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module,
                                     config.get("lora_alpha", r)))
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        updates[module] = LoraUpdate(A=a, B=b, scaling=scaling)
    return updates
