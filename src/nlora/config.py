"""One run's resolved settings: what the CLI builds, the run folder records, resume checks.

``RunConfig`` is the core options below plus every registered method's own options class
(declared in the method's file, flattened under the method's prefix: ``olora_lambda1``,
``l2p_top_k``, ...), so one ``config.yaml`` holds every setting under the keys it always had.
Each option is declared once, with ``nlora.options.option``: flag, type, default, help,
choices and bounds; the CLI, the checks, typed YAML reading and docs/options.md come from it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nlora.batching import MIN_SOURCE_LENGTH, TRUNCATIONS
from nlora.errors import ConfigError
from nlora.methods import METHODS, get_method
from nlora.options import check, coerce, flag_of, option, specs
from nlora.orders import ORDERS
from nlora.scoring import REFERENCE_CHOICES, SCORERS

PRECISIONS = ("fp32", "bf16", "fp16", "auto")
# "paper": the paper's equations where it is explicit; "release": every choice as the released
# O-LoRA / N-LoRA code makes it (nlora.release, docs/reproduction.md).
PROTOCOLS = ("paper", "release")
TASK_SEEDS = ("offset", "same")  # task j seeded with seed + j, or every task with seed
EXTRA_OPTIONS = ("substitute",)  # options that shape the config but are not stored in it
RECORDS = ("preset_sources", "preset_notes")  # written by make_config, never given

WHAT = "what to learn"
ADAPTER = "adapter"
OPTIMISATION = "optimisation (defaults: the order's, else paper orders 1-3)"
EVALUATION = "data and evaluation"


@dataclass
class CoreOptions:
    """The options every run has; a method's own options live in the method's file."""

    model: str = option("smollm2-135m", "HF model id or local folder (seq2seq or causal)",
                        "str", WHAT)
    data_dir: str = option("", "CL_Benchmark folder (default: $NLORA_DATA, else the sample "
                           "shipped in the package)", "str", WHAT, flag="--data", metavar="DIR",
                           show_default=False)
    tasks: list[str] = option([], "custom order, e.g. agnews,SC/yelp,MNLI (resolved to "
                              "CATEGORY/DATASET names)", "names", WHAT)
    order: str | None = option(None, f"paper task order: {', '.join(ORDERS)}", "str", WHAT,
                               nullable=True)
    method: str = option("nlora", "continual-learning method (docs/methods.md)", "str", WHAT,
                         choices=tuple(METHODS))
    protocol: str = option("paper", "who decides every option not given: the paper's equations "
                           "(paper) or the released O-LoRA/N-LoRA code's choices, each method's "
                           "own script (release); the run prints what it set "
                           "(docs/reproduction.md)", "str", WHAT, choices=PROTOCOLS)
    instructions: dict[str, str] = option(
        {}, "JSON/YAML category -> instruction (or the release's instruction_config.json): adds "
        "or replaces prompt instructions (the flag takes the file; config.yaml keeps the mapping)",
        "mapping", WHAT, cli=False)
    # LoRA adapter (paper: rank 8, dropout 0.1, query and value projections)
    lora_r: int = option(8, "LoRA rank", "int", ADAPTER, low=1, high=65536)
    lora_alpha: float = option(32.0, "LoRA alpha", "float", ADAPTER, low=0, low_open=True)
    lora_dropout: float = option(0.1, "LoRA dropout", "float", ADAPTER, low=0, high=1,
                                 high_open=True)
    target_modules: list[str] | None = option(
        None, "modules to adapt (default: the model type's query and value)", "names", ADAPTER,
        nullable=True)
    # optimisation (paper orders 1-3 defaults)
    learning_rate: float | list[float] = option(
        1e-3, "learning rate, one or one per task", "float", OPTIMISATION, flag="--lr",
        metavar="LR", low=0, low_open=True, per_task=True)
    epochs: int | list[int] = option(10, "epochs, one or one per task", "int", OPTIMISATION,
                                     low=1, high=100000, per_task=True)
    batch_size: int = option(32, "global batch per optimiser step, whatever the number of "
                             "processes", "int", OPTIMISATION, low=1, high=2**20)
    weight_decay: float = option(0.0, "AdamW weight decay", "float", OPTIMISATION, low=0)
    max_source_length: int = option(512, "prompt tokens kept", "int", OPTIMISATION,
                                    low=MIN_SOURCE_LENGTH, high=2**20)
    seed: int = option(42, "random seed", "int", OPTIMISATION, low=0, high=2**31 - 1)
    task_seed: str = option("offset", "task j seeded with seed + j (offset) or every task with "
                            "the seed (same, as the released scripts)", "str", OPTIMISATION,
                            choices=TASK_SEEDS)
    group_by_length: bool = option(True, "training batches of similar length, still shuffled "
                                   "(less padding)", "bool", OPTIMISATION)
    # Training mechanics. batch_size is the global batch of one optimiser step, whatever the
    # number of processes: each process runs batch_size / (grad_accum * processes) rows per
    # forward pass and gradients accumulate over grad_accum of those (docs/reproduction.md).
    grad_accum: int = option(1, "micro-batches per optimiser step; --batch-size stays the "
                             "global batch", "int", OPTIMISATION, low=1, high=2**20)
    max_grad_norm: float | None = option(1.0, "clip the gradient norm (0 or null: off)",
                                         "float", OPTIMISATION, low=0, nullable=True)
    precision: str = option("fp32", "training precision: bf16/fp16 through torch autocast "
                            "(weights and optimiser state stay fp32); auto: bf16 where the "
                            "hardware multiplies bf16 natively (AMX, AVX512-BF16, CUDA >= 8.0), "
                            "else fp32; the run log says which", "str", OPTIMISATION,
                            choices=PRECISIONS)
    # The releases average per-GPU / per-micro-batch mean losses (docs/reproduction.md)
    loss_parts: int = option(1, "the step's loss as the mean of N equal parts' mean losses, as "
                             "the released code averages its GPUs' and micro-batches' means "
                             "(release: the script's GPUs x accumulation steps); 1: every answer "
                             "token of the global batch weighs the same (paper; the result does "
                             "not depend on the process count)", "int", OPTIMISATION, low=1,
                             high=2**20)
    zero_lr_steps: int = option(0, "each task's first N optimiser steps at learning rate 0, "
                                "Adam's moments still taking their gradients (release: 2, the "
                                "releases' DeepSpeed WarmupLR); 0: none (paper)", "int",
                                OPTIMISATION, low=0, high=2**20)
    truncation: str = option("text", "over-long prompts: shorten the example text and keep the "
                             "header, instruction, options and Answer: (text), keep the first "
                             "tokens (head, as the released code) or the last (tail)", "str",
                             OPTIMISATION, choices=TRUNCATIONS)
    # data subsampling and evaluation
    train_per_task: int | None = option(None, "stratified training subsample per task", "int",
                                        EVALUATION, low=1, nullable=True)
    test_per_task: int | None = option(None, "stratified test subsample per task", "int",
                                       EVALUATION, low=1, nullable=True)
    # Hyperparameters are chosen on rows carved from train.json, never on test.json (in
    # CL_Benchmark and SuperNI dev.json is test.json): a study's tune stage sets "validation".
    eval_split: str = option("test", "evaluate on test.json (test), or on a validation split "
                             "carved from each task's train.json, stratified by label and "
                             "seeded, which training then never sees (validation; test.json "
                             "is not opened)", "str", EVALUATION, choices=("test", "validation"))
    validation_per_task: int | None = option(
        None, "rows of each task's train.json held out as its validation split with "
        "--eval-split validation (default: --test-per-task, else 10% of the training rows)",
        "int", EVALUATION, low=1, nullable=True)
    eval_batch_size: int = option(64, "evaluation batch size", "int", EVALUATION, low=1,
                                  high=2**20)
    eval_on: str = option("seen", "evaluate seen tasks after each task, or all tasks (full "
                          "matrix, unseen-task curves, FWT)", "str", EVALUATION,
                          choices=("seen", "all"))
    eval_mode: str = option("generate", "greedy generation scored by each task's metric, or the "
                            "most likely label (classification tasks only)", "str", EVALUATION,
                            choices=("generate", "rank"))
    prefix_cache: bool = option(True, "run the prompts' shared prefix once in evaluation; same "
                                "predictions (causal models)", "bool", EVALUATION)
    # scoring (nlora.scoring): normalised exact match as the field reports it, or strict
    scorer: str = option("normalised", "exact match after lower-casing and removing "
                         "punctuation and extra spaces, as the field reports (normalised), or "
                         "strict", "str", EVALUATION, choices=SCORERS)
    references: str = option("all", "generation tasks (SuperNI, a user's): score an answer "
                             "against every reference of its row, the best counting, as "
                             "Super-NaturalInstructions' evaluation (all), or against the one "
                             "reference drawn per row at load, seeded, as the post-N-LoRA "
                             "releases (drawn); training always uses the drawn one", "str",
                             EVALUATION, choices=REFERENCE_CHOICES)
    count_unlabelled: bool = option(False, "keep test rows whose label is not in labels.json "
                                    "(MNLI's '-') in the denominator as wrong answers, as the "
                                    "release", "bool", EVALUATION)
    zero_shot: bool | None = option(None, "evaluate the base model on every task before task 1 "
                                    "(FWT); default: when it adds at most 25% to the run's "
                                    "estimated work", "bool", EVALUATION, nullable=True)


@dataclass
class Records:
    """Where each value not given by the user came from (field -> source), and notes; kept in
    config.yaml, never options."""

    preset_sources: dict[str, str] = field(default_factory=dict)
    preset_notes: list[str] = field(default_factory=list)


def _method_options() -> list[type]:
    """Every registered method's own options class, once each, in registration order."""
    seen: list[type] = []
    for method in METHODS.values():
        if method.options is not None and method.options not in seen:
            seen.append(method.options)
    return seen


class Settings:
    """RunConfig's behaviour; its fields come from the option classes it is made of."""

    def for_task(self, index: int) -> RunConfig:
        """This config with every per-task option at task ``index``'s value (0-based)."""
        values = {}
        for name in PER_TASK:
            value = getattr(self, name)
            if isinstance(value, list):
                if len(value) != len(self.tasks):
                    check(name, OPTIONS[name], value, len(self.tasks))
                value = value[index]
            values[name] = value
        return dataclasses.replace(self, **values)

    def seed_for_task(self, index: int) -> int:
        """The seed of task ``index``: seed + index, or seed for every task (the release)."""
        return self.seed + index if self.task_seed == "offset" else self.seed

    def validate(self) -> None:
        """Refuse any out-of-range option with a line naming it (before anything runs)."""
        if not self.tasks:
            raise ConfigError("no tasks: pass --order NAME or --tasks a,b,c")
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"a task appears twice in {', '.join(self.tasks)}")
        for name, spec in OPTIONS.items():
            value = getattr(self, name)
            coerce(flag_of(name, spec), spec, value)  # of its declared type
            check(name, spec, value, len(self.tasks))
        if self.batch_size % self.loss_parts:
            raise ConfigError(f"--loss-parts {self.loss_parts} does not divide --batch-size "
                              f"{self.batch_size} into equal parts")
        get_method(self.method)
        for method in METHODS.values():  # each method's own cross-option checks
            if "check_options" in vars(method):
                method.check_options(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, path: Path) -> RunConfig:
        """A run folder's config.yaml, read as ``read_options`` reads any config file."""
        options = read_options(path)
        options.pop("substitute", None)
        return cls(**options)

    def differences(self, other: RunConfig) -> list[str]:
        """The settings that differ; where a value came from (preset records) is no setting:
        a run's own config.yaml, given back, resumes it."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [k for k in mine if k not in RECORDS and mine[k] != theirs[k]]


OPTION_CLASSES: list[type] = [CoreOptions, *_method_options()]
# Fields in config.yaml order: the core options, each method's, then the records.
RunConfig = dataclasses.make_dataclass(
    "RunConfig", [], bases=(Settings, Records, *reversed(OPTION_CLASSES))
)
RunConfig.__module__ = __name__  # pickles as nlora.config.RunConfig
RunConfig.__doc__ = __doc__
OPTIONS = {name: spec for cls in OPTION_CLASSES for name, spec in specs(cls).items()}
# one value or one per task (resolved by for_task); a "floats" option is a list either way
PER_TASK = tuple(n for n, spec in OPTIONS.items() if spec.per_task and spec.kind != "floats")
FIELDS = tuple(f.name for f in dataclasses.fields(RunConfig))


def coerce_options(options: dict[str, Any], where: str = "") -> dict[str, Any]:
    """Options given by a file (``where``) or by Python, each typed as declared (``1e-3``
    written as a string is a number; ``"no"`` is not a bool): a ConfigError naming the key
    otherwise. From Python, None means "not given"; in a file only where None is a value."""
    prefix = f"{where}: " if where else ""
    typed = dict(options)
    for key, value in options.items():
        if key == "instructions" and isinstance(value, str):
            continue  # a file of instructions, read by make_config
        if value is None and where and key in OPTIONS and not OPTIONS[key].nullable:
            raise ConfigError(f"{prefix}{key} needs a value (null is not one; leave the key "
                              "out for the default)")
        if key in OPTIONS and value is not None:
            try:
                typed[key] = coerce(key, OPTIONS[key], value)
            except ConfigError as err:
                raise ConfigError(f"{prefix}{err}") from None
    for key in RECORDS:
        value = options.get(key)
        if value is not None and not isinstance(value, dict if key == "preset_sources" else list):
            raise ConfigError(f"{prefix}{key} must be written by nlora, got {value!r}")
    return typed


def read_options(path: str | Path) -> dict[str, Any]:
    """The options of a YAML config file, typed, for ``make_config(**options)``.

    Its keys are those of a run folder's ``config.yaml`` (``RunConfig`` fields, plus
    ``substitute``), so a finished run's config reruns as it is. An unknown key, a value of
    the wrong type, a file that is not a mapping or malformed YAML is a one-line error naming
    the file.
    """
    import difflib

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        options = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text (save the file as UTF-8)") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path} is damaged (malformed YAML{where})") from None
    except (OSError, RecursionError) as err:
        why = "nested too deeply" if isinstance(err, RecursionError) else str(err)
        raise ConfigError(f"{path} is damaged ({why})") from None
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise ConfigError(f"{path} is damaged (a YAML {type(options).__name__}, not a mapping "
                          "of option: value)")
    known = set(FIELDS) | set(EXTRA_OPTIONS)
    for key in options:
        if key not in known:
            spelled = str(key).lstrip("-").replace("-", "_")
            spelled = {"lr": "learning_rate", "data": "data_dir"}.get(spelled, spelled)
            close = [spelled] if spelled in known else difflib.get_close_matches(
                spelled, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{path}: unknown key {key!r}{hint}; keys are those of a run's "
                              "config.yaml")
    return coerce_options(options, str(path))
