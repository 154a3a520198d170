"""What the released code runs: each method's script settings per task order, and what every
released run shares. ``nlora.presets.make_config`` reads these tables; docs/reproduction.md
and docs/methods.md explain every value.

Sources (read, never copied; paths inside each repository):

- N-LoRA release, github.com/PKU-YuanGroup/N-LoRA: ``scripts/order_{1..6}.sh`` (T5-large),
  ``scripts_llama/order_{1..3}.sh``, ``src/uie_trainer_lora.py`` (the ℓ1 term),
  ``configs/ds_configs/stage2*.config``.
- O-LoRA release, github.com/cmnfriend/O-LoRA: ``scripts/order_{1..3}.sh``, ``scripts/long.sh``
  (the 15-task sequence of order 6), ``scripts_llama/order_{1..3}.sh``,
  ``src/uie_trainer_lora.py`` (the orthogonality and ℓ2 terms), and the released logs
  ``logs_and_outputs/{order1,long}_{olora,icrlora,seqlora}/`` (IncLoRA and SeqLoRA are that
  code at λ = 0, one epoch per task) and ``logs_and_outputs/order1_seqft/hyparam.sh``.
- Shared by both (the two repositories hold identical copies): ``src/uie_collator.py``,
  ``src/uie_dataset_lora.py``, ``src/compute_metrics.py``, ``src/run_uie_lora.py`` /
  ``src/run_N_lora.py``.
- SuperNI orders (``superni1``, ``superni2``): the GainLoRA release,
  github.com/liangyanshuo/gainlora: ``gen_script_superni_order{1,2}_t5_inflora.sh`` and
  ``gen_script_superni_order{1,2}_t5_gainlora_inflora.sh`` (T5-large, one GPU, no DeepSpeed),
  ``src/run_t5.py``, ``src/cl_collator.py``, ``src/cl_dataset.py``. Neither N-LoRA nor O-LoRA
  released SuperNI scripts.

``batch_size`` is the global batch of one optimiser step, as nlora counts it: per-device
batch × gradient-accumulation steps × GPUs of the script's ``CUDA_VISIBLE_DEVICES``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

N_LORA = "N-LoRA release"
O_LORA = "O-LoRA release"
GAINLORA = "GainLoRA release"


@dataclass(frozen=True)
class Script:
    """One method's released settings for one task order."""

    source: str  # the release file the values come from
    learning_rate: float | tuple[float, ...]
    epochs: int | tuple[int, ...]
    batch_size: int  # global: per-device x accumulation x GPUs
    grad_accum: int = 1  # the script's gradient_accumulation_steps
    gpus: int = 1  # GPUs of the script's CUDA_VISIBLE_DEVICES
    precision: str = "fp32"  # T5 configs leave bf16/fp16 "auto" (off); LLaMA's enable bf16
    options: dict[str, Any] = field(default_factory=dict)  # method knobs (λ, penalty forms)
    note: str | None = None

    def hyperparameters(self) -> dict[str, Any]:
        """The training schedule and the method's knobs (not the training mechanics)."""
        values = {"learning_rate": self.learning_rate, "epochs": self.epochs,
                  "batch_size": self.batch_size, **self.options}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}

    def mechanics(self) -> dict[str, Any]:
        # every GPU's micro-batch mean loss weighs the same: GPUs x accumulation steps parts
        return {"grad_accum": self.grad_accum, "precision": self.precision,
                "loss_parts": self.gpus * self.grad_accum}


# Every released run: what the shared code and the scripts' common flags do.
COMMON: dict[str, tuple[Any, str]] = {
    # uie_collator.py: an over-long prompt keeps its first max_source_length tokens
    "truncation": ("head", "src/uie_collator.py"),
    "max_source_length": (512, "scripts: --max_source_length 512"),
    # HF TrainingArguments.max_grad_norm = 1.0, passed to DeepSpeed ("gradient_clipping": auto)
    "max_grad_norm": (1.0, "HF Trainer default via configs/ds_configs/stage2.config"),
    # HF Trainer default group_by_length=False: batches are random rows
    "group_by_length": (False, "HF Trainer default (no --group_by_length)"),
    "weight_decay": (0.0, "HF Trainer default (no --weight_decay)"),
    # no --seed in any script: HF's default 42, the same for every task's process
    "seed": (42, "HF Trainer default (no --seed)"),
    "task_seed": ("same", "each task is its own process with HF's default seed 42"),
    # compute_metrics.py normalize_answer; run_uie_lora.py scores the text after "Answer:"
    "scorer": ("normalised", "src/compute_metrics.py"),
    # uie_dataset_lora.py keeps every row; MNLI's "-" rows stay in the denominator
    "count_unlabelled": (True, "src/uie_dataset_lora.py"),
    "lora_r": (8, "src/run_uie_lora.py: lora_dim 8"),
    "lora_alpha": (32.0, "src/run_uie_lora.py: lora_alpha=32"),
    "lora_dropout": (0.1, "src/run_uie_lora.py: lora_dropout=0.1"),
    # the DeepSpeed configs' own scheduler overrides --lr_scheduler_type constant: WarmupLR
    # with warmup_num_steps "auto" (= 0), which DeepSpeed 0.15.4 raises to 2; its log warm-up
    # sets lr 0 at creation and after the first step, full lr from the third step on
    "zero_lr_steps": (2, "configs/ds_configs/stage2.config: DeepSpeed WarmupLR"),
}

# ---------------------------------------------------------------- N-LoRA (PKU-YuanGroup/N-LoRA)
# The released ℓ1 term is ‖loranew_A @ loranew_B‖₁ (src/uie_trainer_lora.py): l1_on="reference",
# with the script's λ as it is.
_NL = {"l1_on": "reference"}
N_LORA_SCRIPTS: dict[str, Script] = {
    "order1": Script("scripts/order_1.sh", 1e-3, 10, 48, options={**_NL, "l1_lambda": 0.4}),
    "order2": Script("scripts/order_2.sh", 1e-3, 10, 32, options={**_NL, "l1_lambda": 0.4}),
    "order3": Script("scripts/order_3.sh", 1e-3, 10, 32, options={**_NL, "l1_lambda": 0.4}),
    "order4": Script("scripts/order_4.sh", 5e-4, 10, 32, options={**_NL, "l1_lambda": (
        0.4, 0.4, 1.2, 0.4, 0.4, 0.4, 1.2, 1.2, 1.2, 0.4, 1.2, 1.2, 0.4, 0.4, 1.2)}),
    "order5": Script("scripts/order_5.sh", 8e-4, 10, 32, options={**_NL, "l1_lambda": 0.55}),
    "order6": Script("scripts/order_6.sh", 1e-3, 10, 32, options={**_NL, "l1_lambda": 1.8}),
    # LLaMA-7B: 1 GPU x 6 x 8 steps; 1 x 4 x 8; 4 GPUs x 1 x 8 (CUDA_VISIBLE_DEVICES=0,1,2,3)
    "order1-llama": Script("scripts_llama/order_1.sh", (1e-3, 1e-4, 1e-4, 1e-4), (1, 10, 1, 1),
                           48, grad_accum=8, gpus=1, precision="bf16",
                           options={**_NL, "l1_lambda": 0.46}),
    "order2-llama": Script("scripts_llama/order_2.sh", (1e-4, 5e-5, 5e-5, 5e-5), (1, 5, 1, 1),
                           32, grad_accum=8, precision="bf16",
                           options={**_NL, "l1_lambda": 0.38}),
    "order3-llama": Script("scripts_llama/order_3.sh", 1e-4, (5, 10, 1, 1), 32, grad_accum=8,
                           gpus=4, precision="bf16", options={**_NL, "l1_lambda": 0.4}),
}
N_LORA_NO_ORDER = N_LORA_SCRIPTS["order2"]  # custom --tasks: the standard T5 setting

# ---------------------------------------------------------------- O-LoRA (cmnfriend/O-LoRA)
# T5-large: 8 GPUs x 8 rows, no accumulation, 1 epoch, lr 1e-3, λ1 0.5, λ2 0.
_OL = {"olora_orth": "abs", "olora_l2": "norm"}  # src/uie_trainer_lora.py
_OL_STANDARD = {**_OL, "olora_lambda1": 0.5, "olora_lambda2": 0.0}
# scripts/long.sh, the 15 tasks of order 6, per task:
_LONG_LAMBDA1 = (0.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0)
_LONG_LAMBDA2 = (0.0, 0.0, 0.0, 0.0, 0.1, 0.1, 0.3, 0.0, 0.1, 0.0, 0.0, 0.1, 0.0, 0.1, 0.3)
_LONG_EPOCHS = (1, 1, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1)  # MNLI (3rd) trains 2 epochs
_LONG = {**_OL, "olora_lambda1": _LONG_LAMBDA1, "olora_lambda2": _LONG_LAMBDA2}
_BORROWED = (
    "O-LoRA released no script for {order}; its λ1/λ2 are scripts/long.sh's (order 6) task by "
    "task position, one epoch per task"
)
# LLaMA-7B: 8 GPUs x 1 row x 8 steps = 64, bf16 (configs/ds_configs/stage2_llama.config)
_OL_LLAMA = dict(learning_rate=(1e-3, 1e-4, 1e-4, 1e-4), epochs=1, batch_size=64, grad_accum=8,
                 gpus=8, precision="bf16", options=_OL_STANDARD)
O_LORA_SCRIPTS: dict[str, Script] = {
    "order1": Script("scripts/order_1.sh", 1e-3, 1, 64, gpus=8, options=_OL_STANDARD),
    "order2": Script("scripts/order_2.sh", 1e-3, 1, 64, gpus=8, options=_OL_STANDARD),
    "order3": Script("scripts/order_3.sh", 1e-3, 1, 64, gpus=8, options=_OL_STANDARD),
    "order4": Script("scripts/long.sh", 1e-3, 1, 64, gpus=8, options=_LONG,
                     note=_BORROWED.format(order="order4")),
    "order5": Script("scripts/long.sh", 1e-3, 1, 64, gpus=8, options=_LONG,
                     note=_BORROWED.format(order="order5")),
    "order6": Script("scripts/long.sh", 1e-3, _LONG_EPOCHS, 64, gpus=8, options=_LONG),
    "order1-llama": Script("scripts_llama/order_1.sh", **_OL_LLAMA),
    "order2-llama": Script("scripts_llama/order_2.sh", **_OL_LLAMA),
    "order3-llama": Script("scripts_llama/order_3.sh", **_OL_LLAMA),
}
O_LORA_NO_ORDER = O_LORA_SCRIPTS["order1"]  # custom --tasks: the orders 1-3 setting

# IncLoRA and SeqLoRA: O-LoRA's code at λ1 = λ2 = 0 with O-LoRA's schedule; the released logs
# logs_and_outputs/{order1,long}_{icrlora,seqlora} train one epoch per task (MNLI included)
# at batch 64 (e.g. 5000 yelp rows in 79 steps).

# SeqFT: only a hyperparameter file of order 1 is released (its code is not).
SEQFT_SCRIPTS: dict[str, Script] = {
    "order1": Script("logs_and_outputs/order1_seqft/hyparam.sh", (1e-3, 1e-4, 1e-4, 1e-4), 1,
                     64, grad_accum=4, gpus=2,
                     note="SeqFT's code is not released: only this log's hyperparameter file"),
}


# ---------------------------------------------------------------- SuperNI (liangyanshuo/gainlora)
SUPERNI_ORDERS = ("superni1", "superni2")

# What every released SuperNI run shares: the GainLoRA release's code and its scripts' flags
# (plain `python src/run_t5.py`: HF Trainer, no DeepSpeed, so no warm-up steps at lr 0).
SUPERNI_COMMON: dict[str, tuple[Any, str]] = {
    # cl_collator.py: the source cut to its first max_source_length tokens
    "truncation": ("head", "src/cl_collator.py"),
    "max_source_length": (512, "scripts: --max_source_length 512"),
    "max_grad_norm": (1.0, "HF Trainer default (no --max_grad_norm)"),
    "group_by_length": (False, "HF Trainer default (no --group_by_length)"),
    "weight_decay": (0.0, "HF Trainer default (no --weight_decay)"),
    "seed": (42, "HF Trainer default (no --seed; set_seed in src/run_t5.py)"),
    "task_seed": ("same", "each task is its own process with HF's default seed 42"),
    # cl_dataset.py keeps one of a row's references, drawn at load; compute_metrics.py scores it
    "references": ("drawn", "src/cl_dataset.py: one reference drawn per row"),
    "lora_r": (4, "scripts: --lora_r 4"),
    "lora_alpha": (32.0, "scripts: --lora_alpha 32"),
    "lora_dropout": (0.0, "scripts: --lora_dropout 0.0"),
    "zero_lr_steps": (0, "scripts: --lr_scheduler_type constant --warmup_steps 0"),
}

# The scripts' batch is 32 rows per step for every task, split per task into per-device rows x
# accumulation steps (4 x 8 ... 32 x 1); nlora takes the step's 32 rows as one part.
_SUPERNI_NOTE = (
    "the scripts train up to 100 epochs and keep the checkpoint best on ROUGE-L over dev.json, "
    "which is test.json: nlora keeps the last checkpoint (no choice on test answers); their "
    "per-task split of the 32-row batch into accumulation steps (1-8) is not reproduced"
)


def _superni(script: str, options: dict[str, Any]) -> Script:
    return Script(script, 3e-4, 100, 32, options=options, note=_SUPERNI_NOTE)


# InfLoRA's T5 code in this release designs A at random, projected (inflora_variant released)
INFLORA_SUPERNI_SCRIPTS: dict[str, Script] = {
    order: _superni(f"gen_script_superni_order{order[-1]}_t5_inflora.sh",
                    {"inflora_variant": "released", "inflora_threshold": 0.995})
    for order in SUPERNI_ORDERS
}
# the gates' input as the code computes it: (mask · E).mean over the padded width
GAINLORA_SUPERNI_SCRIPTS: dict[str, Script] = {
    order: _superni(f"gen_script_superni_order{order[-1]}_t5_gainlora_inflora.sh",
                    {"gainlora_threshold": 0.995, "gainlora_gate_threshold": 0.995,
                     "gainlora_gate_hidden": 100, "gainlora_pool": "padded"})
    for order in SUPERNI_ORDERS
}


def common_settings(order: str | None) -> dict[str, tuple[Any, str]]:
    """What every released run of ``order`` shares: the GainLoRA release's code for the SuperNI
    orders, the O-LoRA/N-LoRA releases' for every other order and for custom tasks."""
    return SUPERNI_COMMON if order in SUPERNI_ORDERS else COMMON


def _custom(script: Script, orders: str) -> Script:
    return replace(script, note=f"custom tasks (no --order): the released orders {orders} "
                                "setting")


def _baseline(script: Script) -> Script:
    return Script(
        f"{script.source} at λ = 0, one epoch (released icrlora/seqlora logs)",
        script.learning_rate, 1,
        script.batch_size, script.grad_accum, script.gpus, script.precision, options={},
        note=script.note,
    )


SCRIPT_SETS = ("n-lora", "o-lora", "o-lora-baseline", "seqft", "inflora", "gainlora")


def method_script(
    scripts: str | None, order: str | None, note: str | None = None
) -> tuple[str | None, Script | None]:
    """(release, script) for ``order`` (None: custom tasks) from the set of released scripts
    a method names (``ContinualMethod.released_scripts``), or (None, None).

    ``n-lora``: the N-LoRA release's scripts; ``o-lora``: O-LoRA's own; ``o-lora-baseline``:
    O-LoRA's at λ = 0 and one epoch (IncLoRA, SeqLoRA); ``seqft``: the SeqFT log of order 1;
    ``inflora`` and ``gainlora``: the GainLoRA release's SuperNI scripts (SuperNI orders only).
    ``note`` replaces the script's note (e.g. a method without a script of its own).
    """
    if scripts not in SCRIPT_SETS:
        return None, None
    if scripts in ("inflora", "gainlora"):
        table = INFLORA_SUPERNI_SCRIPTS if scripts == "inflora" else GAINLORA_SUPERNI_SCRIPTS
        release, script = GAINLORA, table.get(order) if order else None
    elif scripts == "n-lora":
        release, script = N_LORA, (N_LORA_SCRIPTS.get(order) if order
                                   else _custom(N_LORA_NO_ORDER, "2-3"))
    elif scripts == "seqft":
        release, script = O_LORA, SEQFT_SCRIPTS.get(order) if order else None
    else:
        release, script = O_LORA, (O_LORA_SCRIPTS.get(order) if order
                                   else _custom(O_LORA_NO_ORDER, "1-3"))
        if script is not None and scripts == "o-lora-baseline":
            script = _baseline(script)
    if script is None:
        return None, None
    return release, replace(script, note=note) if note else script
