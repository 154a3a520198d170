"""One run's resolved settings: what the CLI builds, the run folder records, resume checks."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nlora.errors import ConfigError
from nlora.scoring import SCORERS

# Default sparsity weight of the ΔW-form penalty (sum of |entries| of scaling·B·A over all
# adapted modules). Chosen from the sweep recorded in docs/method.md.
DEFAULT_L1_LAMBDA = 1e-4

PRECISIONS = ("fp32", "bf16", "fp16")
TRUNCATIONS = ("text", "head", "tail")
MIN_SOURCE_LENGTH = 8  # room for a BOS, a few text tokens and "Answer:"
# "paper": the paper's equations where it is explicit; "release": every choice as the released
# O-LoRA / N-LoRA code makes it (nlora.release, docs/reproduction.md).
PROTOCOLS = ("paper", "release")
OLORA_ORTH_FORMS = ("abs", "fro")  # O-LoRA's Σ|A_i A_tᵀ| as released, or eq. 1's ‖A_iᵀA_t‖²_F
OLORA_L2_FORMS = ("norm", "squared")  # Σ‖θ‖₂ per tensor as released, or ‖θ‖²
TASK_SEEDS = ("offset", "same")  # task j seeded with seed + j, or every task with seed

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
# Options that take one value or one per task (the released scripts vary them per task).
PER_TASK_OPTIONS = ("l1_lambda", "learning_rate", "epochs", "olora_lambda1", "olora_lambda2")


def _check(
    flag: str,
    value: Any,
    low: float,
    above: bool = False,
    high: float | None = None,
    high_inclusive: bool = False,
) -> None:
    """A finite number >= low (> low when ``above``), < high (<= when ``high_inclusive``)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if above else value >= low)
    if ok and high is not None:
        ok = value <= high if high_inclusive else value < high
    if not ok:
        bounds = f"{'>' if above else '>='} {low:g}"
        if high is not None:
            bounds += f" and {'<=' if high_inclusive else '<'} {high:g}"
        raise ConfigError(f"{flag} must be a finite number {bounds}, got {value}")


def _whole(flag: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{flag} must be a whole number of at least {low}, got {value}")

# Methods with a fresh adapter per task whose ΔW can be made exactly sparse (prox, pruning,
# collision-free mode): docs/method.md, "Exact sparsity".
SPARSE_METHODS = ("nlora", "inclora")
L1_AUTO = "auto"  # --l1-lambda auto: λ calibrated at the start of each task


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
    protocol: str = "paper"  # paper | release: who decides what the user did not give
    # N-LoRA sparsity
    l1_lambda: PerTask | str = DEFAULT_L1_LAMBDA  # or "auto" (l1_auto_ratio, l1_auto_steps)
    l1_on: str = "deltaw"
    # --l1-lambda auto: after l1_auto_steps optimiser steps without penalty, λ is set so that
    # λ·‖ΔW‖₁ = l1_auto_ratio × the mean task loss of those steps (docs/method.md)
    l1_auto_ratio: float = 1.0
    l1_auto_steps: int = 5
    # Exact sparsity (methods in SPARSE_METHODS; docs/method.md, "Exact sparsity")
    prox_lambda: float = 0.0  # after every step, shrink each entry of A and B by lr·prox_lambda
    prune_density: float | None = None  # at task end keep this share of each module's ΔW
    collision_free: bool = False  # a task never writes a position an earlier task wrote
    # other methods' knobs; meaning, defaults and their sources: docs/methods.md
    olora_lambda1: PerTask = 0.5  # O-LoRA orthogonality weight (O-LoRA scripts)
    olora_lambda2: PerTask = 0.0  # O-LoRA ℓ2 weight on the new adapter (O-LoRA scripts)
    olora_orth: str = "abs"  # abs: Σ|entries| of A_i A_tᵀ as released (λ₁ tuned for it); fro
    olora_l2: str = "norm"  # norm: Σ over new tensors of ‖θ‖₂ as released; squared: ‖θ‖²
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
    # Training mechanics. batch_size is the global batch of one optimiser step, whatever the
    # number of processes: each process runs batch_size / (grad_accum * processes) rows per
    # forward pass and gradients accumulate over grad_accum of those (docs/reproduction.md).
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0  # gradient-norm clipping as the released scripts; None: off
    precision: str = "fp32"  # fp32 | bf16 | fp16, through Accelerate's mixed precision
    # The step's loss as the mean of this many parts' mean losses (the releases' GPUs x
    # accumulation steps, each averaging its own rows); 1: every answer token of the global
    # batch weighs the same (paper; the result does not depend on the process count).
    loss_parts: int = 1
    # Each task's first optimiser steps at learning rate 0 (Adam's moments still take their
    # gradients): the releases' DeepSpeed WarmupLR does this for 2 steps; 0: none (paper).
    zero_lr_steps: int = 0
    # Over-long prompts: "text" shortens the example's own text so the header, instruction,
    # options and "Answer:" stay; "head" keeps the first max_source_length tokens (as the
    # released code); "tail" keeps the last ones.
    truncation: str = "text"
    # data subsampling and evaluation
    train_per_task: int | None = None
    test_per_task: int | None = None
    eval_batch_size: int = 64
    eval_on: str = "seen"  # "seen": tasks trained so far; "all": every task after every step
    eval_mode: str = "generate"  # "generate": greedy exact match; "rank": best label log-lik
    prefix_cache: bool = True  # evaluation runs the prompts' shared prefix once (causal LMs)
    seed: int = 42
    task_seed: str = "offset"  # offset: task j uses seed + j; same: every task uses seed
    # scoring (nlora.scoring): normalised exact match as the field reports it, or strict
    scorer: str = "normalised"
    count_unlabelled: bool = False  # keep test rows labelled outside labels.json, as wrong
    # the base model on every task before task 1 (FWT); None: when cheap (nlora.runner)
    zero_shot: bool | None = None
    instructions: dict[str, str] = field(default_factory=dict)  # category -> instruction
    # where each value not given by the user came from (field -> source), and notes
    preset_sources: dict[str, str] = field(default_factory=dict)
    preset_notes: list[str] = field(default_factory=list)

    def seed_for_task(self, index: int) -> int:
        """The seed of task ``index``: seed + index, or seed for every task (the release)."""
        return self.seed + index if self.task_seed == "offset" else self.seed

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
        """Refuse any out-of-range option with a line naming it (before anything runs)."""
        if not self.tasks:
            raise ConfigError("no tasks: pass --order NAME or --tasks a,b,c")
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"a task appears twice in {', '.join(self.tasks)}")
        for name in PER_TASK_OPTIONS:  # a per-task list must have one value per task
            for i in range(len(self.tasks)):
                self.per_task(name, i)
        if isinstance(self.l1_lambda, str) and self.l1_lambda != L1_AUTO:
            raise ConfigError(f"--l1-lambda must be numbers or 'auto', got {self.l1_lambda!r}")
        _check("--l1-auto-ratio", self.l1_auto_ratio, low=0, above=True)
        _whole("--l1-auto-steps", self.l1_auto_steps, 1)
        self._validate_sparsity()
        for i in range(len(self.tasks)):
            _check("--lr", self.per_task("learning_rate", i), low=0, above=True)
            if self.l1_lambda != L1_AUTO:
                _check("--l1-lambda", self.per_task("l1_lambda", i), low=0)
            epochs = self.per_task("epochs", i)
            if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
                raise ConfigError(f"--epochs must be a whole number of at least 1, got {epochs}")
        _whole("--lora-r", self.lora_r, 1)
        _check("--lora-alpha", self.lora_alpha, low=0, above=True)
        _check("--lora-dropout", self.lora_dropout, low=0, high=1)
        modules = self.target_modules
        if modules is not None and (not modules or not all(isinstance(m, str) and m
                                                           for m in modules)):
            raise ConfigError("--target-modules must name at least one module")
        _whole("--batch-size", self.batch_size, 1)
        _whole("--eval-batch-size", self.eval_batch_size, 1)
        _check("--weight-decay", self.weight_decay, low=0)
        _whole("--max-source-length", self.max_source_length, MIN_SOURCE_LENGTH)
        for flag, value in (("--train-per-task", self.train_per_task),
                            ("--test-per-task", self.test_per_task)):
            if value is not None:
                _whole(flag, value, 1)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not (
            0 <= self.seed < 2**31
        ):
            raise ConfigError(f"--seed must be a whole number in [0, 2^31), got {self.seed}")
        if self.l1_on not in L1_PLACEMENTS:
            raise ConfigError(
                f"--l1-on must be one of {', '.join(L1_PLACEMENTS)}, got {self.l1_on!r}"
            )
        _check("--replay-fraction", self.replay_fraction, low=0, above=True, high=1,
               high_inclusive=True)
        _check("--lwf-temperature", self.lwf_temperature, low=0, above=True)
        for name in ("olora_lambda1", "olora_lambda2", "ewc_lambda", "lwf_alpha",
                     "l2p_key_weight", "lfpt5_lm_weight", "lfpt5_kd_weight"):
            value = getattr(self, name)
            for each in value if isinstance(value, list) else [value]:
                _check(f"--{name.replace('_', '-')}", each, low=0)
        for name, allowed in (
            ("protocol", PROTOCOLS), ("scorer", SCORERS), ("olora_orth", OLORA_ORTH_FORMS),
            ("olora_l2", OLORA_L2_FORMS), ("task_seed", TASK_SEEDS),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                    f"got {getattr(self, name)!r}"
                )
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in
                   self.instructions.items()):
            raise ConfigError("instructions must map category names to instruction strings")
        _whole("--grad-accum", self.grad_accum, 1)
        _whole("--loss-parts", self.loss_parts, 1)
        if self.batch_size % self.loss_parts:
            raise ConfigError(f"--loss-parts {self.loss_parts} does not divide --batch-size "
                              f"{self.batch_size} into equal parts")
        _whole("--zero-lr-steps", self.zero_lr_steps, 0)
        if self.max_grad_norm is not None:
            _check("--max-grad-norm", self.max_grad_norm, low=0)
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}")
        if self.truncation not in TRUNCATIONS:
            raise ConfigError(f"--truncation must be one of {', '.join(TRUNCATIONS)}")
        for name in ("l2p_pool_size", "l2p_prompt_length", "l2p_top_k", "progprompt_length",
                     "lfpt5_prompt_length", "lfpt5_pseudo_per_label"):
            _whole(f"--{name.replace('_', '-')}", getattr(self, name), 1)
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

    @property
    def sparse_options(self) -> list[str]:
        """The exact-sparsity flags this config sets."""
        given = []
        if self.prox_lambda:
            given.append("--prox-lambda")
        if self.prune_density is not None:
            given.append("--prune-density")
        if self.collision_free:
            given.append("--collision-free")
        return given

    def _validate_sparsity(self) -> None:
        if self.prox_lambda < 0:
            raise ConfigError(f"--prox-lambda must be >= 0, got {self.prox_lambda}")
        if self.prune_density is not None and not 0 < self.prune_density <= 1:
            raise ConfigError(f"--prune-density must be in (0, 1], got {self.prune_density}")
        given = self.sparse_options
        if given and self.method not in SPARSE_METHODS:
            raise ConfigError(f"{', '.join(given)} apply to --method {' or '.join(SPARSE_METHODS)}"
                              f", not {self.method}")
        if self.collision_free and self.prune_density is None and not self.prox_lambda:
            raise ConfigError("--collision-free needs exact zeros, or the first task fills every "
                              "position: add --prune-density or --prox-lambda")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, path: Path) -> RunConfig:
        """A run folder's config.yaml; unreadable, not a mapping, or with unknown keys: a
        ConfigError naming it."""
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as err:
            why = "nested too deeply" if isinstance(err, RecursionError) else \
                str(err).strip().splitlines()[0]
            raise ConfigError(f"{path} is damaged ({why})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} is damaged (a YAML {type(data).__name__}, not a mapping "
                              "of option: value)")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = {str(k) for k in data} - known
        if unknown:
            raise ConfigError(f"{path}: unknown keys {', '.join(sorted(unknown))}")
        return cls(**data)

    def differences(self, other: RunConfig) -> list[str]:
        """The settings that differ; where a value came from (preset records) is no setting:
        a run's own config.yaml, given back, resumes it."""
        mine, theirs = self.to_dict(), other.to_dict()
        records = ("preset_sources", "preset_notes")
        return [k for k in mine if k not in records and mine[k] != theirs[k]]
