"""One run's resolved settings: what the CLI builds, the run folder records, resume checks."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nlora.errors import ConfigError

# Default sparsity weight of the ΔW-form penalty (sum of |entries| of scaling·B·A over all
# adapted modules). Chosen from the sweep recorded in docs/method.md.
DEFAULT_L1_LAMBDA = 1e-4

# Where the ℓ1 penalty goes (paper Fig. 6 ablations, plus the released code's r x r form).
L1_PLACEMENTS = ("deltaw", "a", "b", "a+b", "reference")

# Per-method defaults that replace the order's preset when the option is not given: full
# fine-tuning at the LoRA learning rate (1e-3) destroys a pretrained model; prompt tuning needs
# a far larger one. Sources in docs/methods.md.
METHOD_DEFAULTS: dict[str, dict[str, float]] = {
    **{name: {"learning_rate": 1e-5} for name in ("seqft", "replay", "ewc", "lwf")},
    "progprompt": {"learning_rate": 0.3},  # ProgPrompt T5 code (AdamW)
    "lfpt5": {"learning_rate": 0.5},  # LFPT5 code (Adafactor there)
    "l2p": {"learning_rate": 0.03},  # L2P released config (Adam)
    "osf": {"learning_rate": 1e-5},  # PEFT OSF docs: 1e-5 to 1e-4
    "inflora": {"learning_rate": 3e-4},  # InfLoRA T5 scripts (GainLoRA release)
}

OSF_PROJECTIONS = ("parameter", "gradient")
INFLORA_VARIANTS = ("paper", "released")

PerTask = float | list[float]


@dataclass
class RunConfig:
    # what to learn
    model: str = "smollm2-135m"
    data_dir: str = ""
    tasks: list[str] = field(default_factory=list)  # resolved "CATEGORY/DATASET" names
    order: str | None = None
    method: str = "nlora"
    # LoRA adapter (paper: rank 8, dropout 0.1, query and value projections)
    lora_r: int = 8
    lora_alpha: float = 32.0
    lora_dropout: float = 0.1
    target_modules: list[str] | None = None  # None: PEFT's query/value default for the model
    # N-LoRA sparsity
    l1_lambda: PerTask = DEFAULT_L1_LAMBDA
    l1_on: str = "deltaw"
    # other methods' knobs; meaning, defaults and their sources: docs/methods.md
    olora_lambda1: float = 0.5  # O-LoRA orthogonality weight (O-LoRA code default)
    olora_lambda2: float = 0.0  # O-LoRA ℓ2 weight on the new adapter (O-LoRA code default)
    replay_fraction: float = 0.02  # share of each earlier task's training set replayed
    ewc_lambda: float = 5000.0  # EWC penalty weight (our choice; the paper gives none)
    lwf_alpha: float = 1.0  # LwF distillation weight (Li and Hoiem, 2017)
    lwf_temperature: float = 2.0  # LwF softmax temperature (Li and Hoiem, 2017)
    l2p_pool_size: int = 10  # L2P prompt pool size M (Wang et al., 2022)
    l2p_prompt_length: int = 5  # L2P length L_p of each prompt (Wang et al., 2022)
    l2p_top_k: int = 5  # L2P prompts chosen per input N (Wang et al., 2022)
    l2p_key_weight: float = 1.0  # L2P weight λ of the key-query pull term (released config)
    progprompt_length: int = 10  # ProgPrompt soft prompt length per task (T5 code)
    lfpt5_prompt_length: int = 300  # LFPT5 soft prompt length (LFPT5 code)
    lfpt5_lm_weight: float = 0.25  # LFPT5 weight λ of the generation (LM) loss (LFPT5 code)
    lfpt5_kd_weight: float = 0.01  # LFPT5 weight of the distillation term (LFPT5 code)
    lfpt5_pseudo_per_label: int = 2  # LFPT5 pseudo samples kept per label (LFPT5 code)
    osf_preserve: list[float] | None = None  # OSF preserved share per task (None: t/T schedule)
    osf_projection: str = "parameter"  # OSF: keep the update outside the preserved subspace
    inflora_threshold: float = 0.995  # InfLoRA base energy threshold ε (InfLoRA T5 scripts)
    inflora_variant: str = "paper"  # InfLoRA A design and memory criterion (docs/methods.md)
    # optimisation (paper orders 1-3 defaults)
    learning_rate: PerTask = 1e-3
    epochs: int | list[int] = 10
    batch_size: int = 32
    weight_decay: float = 0.0
    max_source_length: int = 512
    group_by_length: bool = True  # training batches of similar length (less padding)
    # data subsampling and evaluation
    train_per_task: int | None = None
    test_per_task: int | None = None
    eval_batch_size: int = 64
    eval_on: str = "seen"  # "seen": tasks trained so far; "all": every task after every step
    eval_mode: str = "generate"  # "generate": greedy exact match; "rank": best label log-lik
    seed: int = 42

    def per_task(self, name: str, index: int) -> Any:
        """The value of a per-task option for task ``index`` (0-based)."""
        value = getattr(self, name)
        if isinstance(value, list):
            if len(value) != len(self.tasks):
                flag = "--lr" if name == "learning_rate" else f"--{name.replace('_', '-')}"
                raise ConfigError(f"{flag} lists {len(value)} values for {len(self.tasks)} tasks")
            return value[index]
        return value

    def validate(self) -> None:
        if not self.tasks:
            raise ConfigError("no tasks: pass --order NAME or --tasks a,b,c")
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"a task appears twice in {', '.join(self.tasks)}")
        for name in ("l1_lambda", "learning_rate", "epochs"):
            for i in range(len(self.tasks)):
                self.per_task(name, i)
        if self.lora_r < 1:
            raise ConfigError(f"--lora-r must be at least 1, got {self.lora_r}")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ConfigError("batch sizes must be at least 1")
        if self.l1_on not in L1_PLACEMENTS:
            raise ConfigError(
                f"--l1-on must be one of {', '.join(L1_PLACEMENTS)}, got {self.l1_on!r}"
            )
        if not 0 < self.replay_fraction <= 1:
            raise ConfigError(f"--replay-fraction must be in (0, 1], got {self.replay_fraction}")
        if self.lwf_temperature <= 0:
            raise ConfigError(f"--lwf-temperature must be positive, got {self.lwf_temperature}")
        for name in ("olora_lambda1", "olora_lambda2", "ewc_lambda", "lwf_alpha",
                     "l2p_key_weight", "lfpt5_lm_weight", "lfpt5_kd_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be non-negative")
        for name in ("l2p_pool_size", "l2p_prompt_length", "l2p_top_k", "progprompt_length",
                     "lfpt5_prompt_length", "lfpt5_pseudo_per_label"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.l2p_top_k > self.l2p_pool_size:
            raise ConfigError(
                f"--l2p-top-k ({self.l2p_top_k}) cannot exceed --l2p-pool-size "
                f"({self.l2p_pool_size})"
            )
        if self.osf_preserve is not None:
            if len(self.osf_preserve) != len(self.tasks):
                raise ConfigError(
                    f"--osf-preserve lists {len(self.osf_preserve)} values for "
                    f"{len(self.tasks)} tasks"
                )
            if not all(0 <= f < 1 for f in self.osf_preserve):
                raise ConfigError("--osf-preserve values must be in [0, 1)")
        if self.osf_projection not in OSF_PROJECTIONS:
            raise ConfigError(f"--osf-projection must be one of {', '.join(OSF_PROJECTIONS)}")
        if not 0 < self.inflora_threshold <= 1:
            raise ConfigError(
                f"--inflora-threshold must be in (0, 1], got {self.inflora_threshold}"
            )
        if self.inflora_variant not in INFLORA_VARIANTS:
            raise ConfigError(f"--inflora-variant must be one of {', '.join(INFLORA_VARIANTS)}")
        if self.eval_on not in ("seen", "all"):
            raise ConfigError(f"--eval-on must be 'seen' or 'all', got {self.eval_on!r}")
        if self.eval_mode not in ("generate", "rank"):
            raise ConfigError(f"--eval-mode must be generate or rank, got {self.eval_mode!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, path: Path) -> RunConfig:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"{path}: unknown keys {', '.join(sorted(unknown))}")
        return cls(**data)

    def differences(self, other: RunConfig) -> list[str]:
        mine, theirs = self.to_dict(), other.to_dict()
        return [k for k in mine if mine[k] != theirs[k]]
