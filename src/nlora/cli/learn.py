"""``nlora run`` (one continual sequence), ``nlora compare`` (several methods on it) and
``nlora orders`` (the paper's task orders).

Every run flag's destination is a ``RunConfig`` field; a flag not given stays out of the
parsed options, so ``nlora.presets.make_config`` fills it from the method, the order or the
default (one place decides defaults, for the command line and for Python alike).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from nlora.config import (
    DEFAULT_L1_LAMBDA,
    INFLORA_VARIANTS,
    L1_AUTO,
    L1_PLACEMENTS,
    OLORA_L2_FORMS,
    OLORA_ORTH_FORMS,
    OSF_PROJECTIONS,
    PRECISIONS,
    PROTOCOLS,
    SCORERS,
    TASK_SEEDS,
    TRUNCATIONS,
    RunConfig,
)
from nlora.errors import ConfigError
from nlora.orders import ORDERS
from nlora.presets import EXTRA_OPTIONS, FIELDS, combine_options, make_config, read_options

D = RunConfig()  # RunConfig's defaults, quoted in the help


def _floats(text: str) -> float | list[float]:
    values = [float(x) for x in text.split(",")]
    return values[0] if len(values) == 1 else values


def _lambdas(text: str) -> float | list[float] | str:
    return L1_AUTO if text.strip().lower() == L1_AUTO else _floats(text)


def _float_list(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def _ints(text: str) -> int | list[int]:
    values = [int(x) for x in text.split(",")]
    return values[0] if len(values) == 1 else values


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_run_arguments(parser: argparse.ArgumentParser, with_method: bool = True) -> None:
    """The run options; destinations are RunConfig fields, absent unless given."""
    what = parser.add_argument_group("what to learn")
    what.add_argument("--config", dest="config_file", metavar="FILE.yaml", type=Path,
                      help="options from a YAML file with the keys of a run's config.yaml "
                      "(a finished run's config reruns as it is); flags given override it")
    what.add_argument("--model", help=f"HF model id or local folder (seq2seq or causal); "
                      f"default: {D.model}")
    what.add_argument("--data", dest="data_dir", metavar="DIR",
                      help="CL_Benchmark folder (default: $NLORA_DATA)")
    what.add_argument("--order", help=f"paper task order: {', '.join(ORDERS)}")
    what.add_argument("--tasks", type=_names, help="custom order, e.g. agnews,SC/yelp,MNLI")
    what.add_argument("--substitute", action="append",
                      help="replace tasks of --order, e.g. yahoo=yelp (data not available)")
    what.add_argument("--protocol", choices=PROTOCOLS,
                      help="who decides every option not given: the paper's equations "
                      "(paper, default) or the released O-LoRA/N-LoRA code's choices, each "
                      "method's own script (release); the run prints what it set "
                      "(docs/reproduction.md)")
    what.add_argument("--instructions", metavar="FILE",
                      help="JSON/YAML category -> instruction (or the release's "
                      "instruction_config.json): adds or replaces prompt instructions")
    if with_method:  # `nlora compare` takes --methods instead
        what.add_argument("--method",
                          help="continual-learning method: nlora (default), olora, olora+nlora, "
                          "inclora, seqlora, seqft, replay, ewc, lwf, mtl, pertaskft, l2p, "
                          "lfpt5, progprompt, osf, inflora (docs/methods.md)")
    lora = parser.add_argument_group("adapter")
    lora.add_argument("--lora-r", type=int, help=f"LoRA rank (default {D.lora_r})")
    lora.add_argument("--lora-alpha", type=float, help=f"LoRA alpha (default {D.lora_alpha})")
    lora.add_argument("--lora-dropout", type=float,
                      help=f"LoRA dropout (default {D.lora_dropout})")
    lora.add_argument("--target-modules", type=_names,
                      help="modules to adapt (default: the model type's query and value)")
    lora.add_argument("--l1-lambda", type=_lambdas,
                      help=f"ℓ1 weight, one value or one per task (default {DEFAULT_L1_LAMBDA}, "
                      "scaled by the order's paper λ), or 'auto': calibrated per task so that "
                      "λ·‖ΔW‖₁ = --l1-auto-ratio × task loss after --l1-auto-steps steps")
    lora.add_argument("--l1-auto-ratio", type=float,
                      help=f"--l1-lambda auto: penalty / task loss (default {D.l1_auto_ratio})")
    lora.add_argument("--l1-auto-steps", type=int,
                      help="--l1-lambda auto: optimiser steps without penalty before λ is "
                      f"chosen (default {D.l1_auto_steps})")
    lora.add_argument("--prox-lambda", type=float,
                      help="exact zeros by a proximal step: after every optimiser step shrink "
                      "each entry of A and B towards 0 by lr × this (nlora, inclora; default 0: "
                      "off)")
    lora.add_argument("--prune-density", type=float,
                      help="exact zeros by pruning: at the end of each task keep this share of "
                      "each module's ΔW entries, the largest; saved as a sparse delta (nlora, "
                      "inclora; default: no pruning)")
    lora.add_argument("--collision-free", action=argparse.BooleanOptionalAction,
                      help="a task never writes a weight an earlier task wrote (mask from their "
                      "exact supports; needs --prune-density or --prox-lambda)")
    lora.add_argument("--l1-on", choices=L1_PLACEMENTS,
                      help="where the ℓ1 penalty goes: ΔW (N-LoRA, default), A, B, A and B "
                      "separately, or the public code's r x r lora_A @ lora_B (square modules)")
    meth = parser.add_argument_group("method options (docs/methods.md)")
    meth.add_argument("--olora-lambda1", type=_floats,
                      help="O-LoRA orthogonality weight λ₁, one or one per task (default: "
                      f"O-LoRA's scripts, {D.olora_lambda1} for orders 1-3)")
    meth.add_argument("--olora-lambda2", type=_floats,
                      help="O-LoRA ℓ2 weight λ₂ on the new adapter, one or one per task "
                      f"(default: O-LoRA's scripts, {D.olora_lambda2} for orders 1-3)")
    meth.add_argument("--olora-orth", choices=OLORA_ORTH_FORMS,
                      help="O-LoRA orthogonality term: sum of |entries| of A_i A_tᵀ as "
                      "released (abs, default) or the paper's squared Frobenius norm (fro)")
    meth.add_argument("--olora-l2", choices=OLORA_L2_FORMS,
                      help="O-LoRA ℓ2 term: sum of each new tensor's ℓ2 norm as released "
                      "(norm, default) or of its squared entries (squared)")
    meth.add_argument("--replay-fraction", type=float,
                      help="replay: share of each earlier task's training set (default "
                      f"{D.replay_fraction})")
    meth.add_argument("--ewc-lambda", type=float,
                      help=f"EWC penalty weight (default {D.ewc_lambda})")
    meth.add_argument("--lwf-alpha", type=float,
                      help=f"LwF distillation weight (default {D.lwf_alpha})")
    meth.add_argument("--lwf-temperature", type=float,
                      help=f"LwF distillation temperature (default {D.lwf_temperature})")
    meth.add_argument("--l2p-pool-size", type=int,
                      help=f"L2P prompt pool size M (default {D.l2p_pool_size})")
    meth.add_argument("--l2p-prompt-length", type=int,
                      help=f"L2P length of each pool prompt (default {D.l2p_prompt_length})")
    meth.add_argument("--l2p-top-k", type=int,
                      help=f"L2P prompts chosen per input by key match (default {D.l2p_top_k})")
    meth.add_argument("--l2p-key-weight", type=float,
                      help=f"L2P weight of the key-query pull term (default {D.l2p_key_weight})")
    meth.add_argument("--progprompt-length", type=int,
                      help=f"ProgPrompt soft prompt length per task (default "
                      f"{D.progprompt_length})")
    meth.add_argument("--lfpt5-prompt-length", type=int,
                      help=f"LFPT5 soft prompt length (default {D.lfpt5_prompt_length})")
    meth.add_argument("--lfpt5-lm-weight", type=float,
                      help=f"LFPT5 weight of the pseudo-sample generation loss (default "
                      f"{D.lfpt5_lm_weight})")
    meth.add_argument("--lfpt5-kd-weight", type=float,
                      help=f"LFPT5 weight of the distillation term (default {D.lfpt5_kd_weight})")
    meth.add_argument("--lfpt5-pseudo-per-label", type=int,
                      help="LFPT5 pseudo samples replayed per label of each earlier task "
                      f"(default {D.lfpt5_pseudo_per_label})")
    meth.add_argument("--osf-preserve", type=_float_list,
                      help="OSF share of each weight's singular directions preserved, one per "
                      "task (default: task t of T preserves t/T, at least one direction)")
    meth.add_argument("--osf-projection", choices=OSF_PROJECTIONS,
                      help="OSF: 'parameter' keeps every update outside the preserved subspace "
                      "(paper, default); 'gradient' only projects gradients, as PEFT's tuner "
                      "alone does")
    meth.add_argument("--inflora-threshold", type=float,
                      help="InfLoRA base energy threshold of the input-subspace memory "
                      f"(default {D.inflora_threshold})")
    meth.add_argument("--inflora-variant", choices=INFLORA_VARIANTS,
                      help="InfLoRA: 'paper' (default) designs A from the projected new-task "
                      "inputs; 'released' is the public T5 code (random A projected)")
    opt = parser.add_argument_group("optimisation (defaults: the order's, else paper orders 1-3)")
    opt.add_argument("--lr", dest="learning_rate", metavar="LR", type=_floats,
                     help=f"learning rate, one or one per task (default {D.learning_rate})")
    opt.add_argument("--epochs", type=_ints,
                     help=f"epochs, one or one per task (default {D.epochs})")
    opt.add_argument("--batch-size", type=int,
                     help="global batch per optimiser step, whatever the number of processes "
                     f"(default {D.batch_size})")
    opt.add_argument("--weight-decay", type=float,
                     help=f"AdamW weight decay (default {D.weight_decay})")
    opt.add_argument("--max-source-length", type=int,
                     help=f"prompt tokens kept (default {D.max_source_length})")
    opt.add_argument("--seed", type=int, help=f"random seed (default {D.seed})")
    opt.add_argument("--task-seed", choices=TASK_SEEDS,
                     help="task j seeded with seed + j (offset, default) or every task with "
                     "the seed (same, as the released scripts)")
    opt.add_argument("--group-by-length", action=argparse.BooleanOptionalAction,
                     help="training batches of similar length, still shuffled (default: on)")
    opt.add_argument("--grad-accum", type=int,
                     help="micro-batches per optimiser step; --batch-size stays the global batch "
                     f"(default {D.grad_accum})")
    opt.add_argument("--max-grad-norm", type=float,
                     help=f"clip the gradient norm (default {D.max_grad_norm}; 0: off)")
    opt.add_argument("--loss-parts", type=int,
                     help="the step's loss as the mean of N equal parts' mean losses, as the "
                     "released code averages its GPUs' and micro-batches' means (release: the "
                     f"script's GPUs x accumulation steps; default {D.loss_parts}: every answer "
                     "token of the global batch weighs the same)")
    opt.add_argument("--zero-lr-steps", type=int,
                     help="each task's first N optimiser steps at learning rate 0, Adam's "
                     "moments still taking their gradients (release: 2, the releases' "
                     f"DeepSpeed WarmupLR; default {D.zero_lr_steps})")
    opt.add_argument("--precision", choices=PRECISIONS,
                     help=f"training precision through Accelerate (default {D.precision})")
    opt.add_argument("--truncation", choices=TRUNCATIONS,
                     help="over-long prompts: shorten the example text and keep the header, "
                     "instruction, options and Answer: (text, default), keep the first tokens "
                     "(head, as the released code) or the last (tail)")
    ev = parser.add_argument_group("data and evaluation")
    ev.add_argument("--train-per-task", type=int, help="stratified training subsample per task")
    ev.add_argument("--test-per-task", type=int, help="stratified test subsample per task")
    ev.add_argument("--eval-batch-size", type=int,
                    help=f"evaluation batch size (default {D.eval_batch_size})")
    ev.add_argument("--eval-mode", choices=["generate", "rank"],
                    help="greedy generation + exact match (default), or the most likely label")
    ev.add_argument("--eval-on", choices=["seen", "all"],
                    help="evaluate seen tasks after each task (default), or all tasks (full "
                    "matrix, unseen-task curves, FWT)")
    ev.add_argument("--scorer", choices=SCORERS,
                    help="exact match after lower-casing and removing punctuation and extra "
                    "spaces, as the field reports (normalised, default), or strict")
    ev.add_argument("--count-unlabelled", action=argparse.BooleanOptionalAction,
                    help="keep test rows whose label is not in labels.json (MNLI's '-') in "
                    "the denominator as wrong answers, as the release (default: left out)")
    ev.add_argument("--zero-shot", action=argparse.BooleanOptionalAction,
                    help="evaluate the base model on every task before task 1 (FWT); "
                    "default: when it adds at most 25%% to the run's estimated work")
    ev.add_argument("--prefix-cache", action=argparse.BooleanOptionalAction,
                    help="run the prompts' shared prefix once in evaluation; same predictions "
                    "(causal models; default: on)")


def given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The run options the user gave: ``--config FILE``'s, overridden by the flags given
    (flags not given are absent from ``args``)."""
    flags = {k: v for k, v in vars(args).items() if k in FIELDS or k in EXTRA_OPTIONS}
    from_file = read_options(args.config_file) if "config_file" in args else {}
    return combine_options(from_file, flags)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    return make_config(**given_options(args))


def cmd_run(args: argparse.Namespace) -> int:
    from nlora.runner import is_main_process, print_results, run  # heavy: only when running

    config = config_from_args(args)
    metrics = run(config, args.out, report_to=getattr(args, "report_to", None))
    if is_main_process():  # several processes: one table
        print_results(metrics)
        print(f"\nrun folder: {args.out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from nlora.compare import compare, format_comparison  # heavy imports only when running
    from nlora.runner import is_main_process

    if len(set(args.methods)) != len(args.methods):
        raise ConfigError(f"a method appears twice in --methods {','.join(args.methods)}")
    options = given_options(args)
    options.pop("method", None)  # a config file's method: --methods decides here
    # every method's config is built (and checked) before anything trains
    configs = {name: make_config(**options, method=name) for name in args.methods}
    rows = compare(configs, args.out, report_to=getattr(args, "report_to", None))
    if is_main_process():
        print(format_comparison(rows))
        print(f"\nrun folders: {args.out}/<method>/")
    return 0


def cmd_orders(args: argparse.Namespace) -> int:
    for order in ORDERS.values():
        print(f"{order.name:<13} {' -> '.join(order.tasks)}")
        print(f"{'':<13} lr {order.learning_rate}, epochs {order.epochs}, batch "
              f"{order.batch_size}, paper λ {order.paper_lambda} ({order.model})")
    return 0


def add_report_to(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--report-to", choices=["tensorboard"],
                        help="also log loss, penalty, learning rate per step and accuracies to "
                        "TensorBoard in RUN/tensorboard (pip install 'nlora[tensorboard]'); "
                        "run.log always keeps them as text")


def register(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser("run", argument_default=argparse.SUPPRESS,
                         help="learn a task sequence, evaluate after each task")
    add_run_arguments(run)
    run.add_argument("--out", required=True, type=Path, help="run folder (resumes if present)")
    add_report_to(run)
    run.set_defaults(func=cmd_run)
    compare = sub.add_parser("compare", argument_default=argparse.SUPPRESS,
                             help="run several methods on the same tasks")
    add_run_arguments(compare, with_method=False)
    compare.add_argument("--methods", type=_names, required=True,
                         help="methods to compare, e.g. nlora,olora,inclora,seqlora")
    compare.add_argument("--out", required=True, type=Path,
                         help="comparison folder: one run folder per method inside")
    add_report_to(compare)
    compare.set_defaults(func=cmd_compare)
    orders = sub.add_parser("orders", help="list the paper's task orders")
    orders.set_defaults(func=cmd_orders)
