"""The ``nlora`` command: ``run`` a continual sequence, ``report`` on runs, list ``orders``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from nlora import report
from nlora.config import (
    DEFAULT_L1_LAMBDA,
    INFLORA_VARIANTS,
    L1_PLACEMENTS,
    METHOD_DEFAULTS,
    OSF_PROJECTIONS,
    RunConfig,
)
from nlora.data import KNOWN_CATEGORIES, data_dir_from, resolve_task, task_is_available
from nlora.errors import ConfigError, DataError, NloraError
from nlora.orders import ORDERS, PAPER_BASE_LAMBDA, get_order, substitute


def _floats(text: str) -> float | list[float]:
    values = [float(x) for x in text.split(",")]
    return values[0] if len(values) == 1 else values


def _ints(text: str) -> int | list[int]:
    values = [int(x) for x in text.split(",")]
    return values[0] if len(values) == 1 else values


def _float_list(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _substitutions(items: list[str]) -> dict[str, str]:
    pairs = {}
    for item in items:
        for part in _names(item):
            old, sep, new = part.partition("=")
            if not sep or not old or not new:
                raise ConfigError(f"--substitute expects OLD=NEW, got {part!r}")
            pairs[old.strip()] = new.strip()
    return pairs


def add_run_arguments(parser: argparse.ArgumentParser, with_method: bool = True) -> None:
    what = parser.add_argument_group("what to learn")
    what.add_argument("--model", default="smollm2-135m",
                      help="HF model id or local folder (seq2seq or causal); default: %(default)s")
    what.add_argument("--data", help="CL_Benchmark folder (default: $NLORA_DATA)")
    what.add_argument("--order", help=f"paper task order: {', '.join(ORDERS)}")
    what.add_argument("--tasks", type=_names, help="custom order, e.g. agnews,SC/yelp,MNLI")
    what.add_argument("--substitute", action="append", default=[],
                      help="replace tasks of --order, e.g. yahoo=yelp (data not available)")
    if with_method:  # `nlora compare` takes --methods instead
        what.add_argument("--method", default="nlora",
                          help="continual-learning method: nlora, olora, olora+nlora, inclora, "
                          "seqlora, seqft, replay, ewc, lwf, mtl, pertaskft, l2p, lfpt5, "
                          "progprompt, osf, inflora (docs/methods.md)")
    what.add_argument("--out", required=True, type=Path, help="run folder (resumes if present)")
    lora = parser.add_argument_group("adapter")
    lora.add_argument("--lora-r", type=int, default=8)
    lora.add_argument("--lora-alpha", type=float, default=32.0)
    lora.add_argument("--lora-dropout", type=float, default=0.1)
    lora.add_argument("--target-modules", type=_names,
                      help="modules to adapt (default: the model type's query and value)")
    lora.add_argument("--l1-lambda", type=_floats,
                      help=f"ℓ1 weight, one value or one per task (default {DEFAULT_L1_LAMBDA}, "
                      "scaled by the order's paper λ)")
    lora.add_argument("--l1-on", default="deltaw", choices=L1_PLACEMENTS,
                      help="where the ℓ1 penalty goes: ΔW (N-LoRA), A, B, A and B separately, "
                      "or the public code's r x r lora_A @ lora_B (square modules only)")
    meth = parser.add_argument_group("method options (docs/methods.md)")
    meth.add_argument("--olora-lambda1", type=float, default=RunConfig.olora_lambda1,
                      help="O-LoRA orthogonality weight λ₁ (default %(default)s)")
    meth.add_argument("--olora-lambda2", type=float, default=RunConfig.olora_lambda2,
                      help="O-LoRA ℓ2 weight λ₂ on the new adapter (default %(default)s)")
    meth.add_argument("--replay-fraction", type=float, default=RunConfig.replay_fraction,
                      help="replay: share of each earlier task's training set (default "
                      "%(default)s)")
    meth.add_argument("--ewc-lambda", type=float, default=RunConfig.ewc_lambda,
                      help="EWC penalty weight (default %(default)s)")
    meth.add_argument("--lwf-alpha", type=float, default=RunConfig.lwf_alpha,
                      help="LwF distillation weight (default %(default)s)")
    meth.add_argument("--lwf-temperature", type=float, default=RunConfig.lwf_temperature,
                      help="LwF distillation temperature (default %(default)s)")
    meth.add_argument("--l2p-pool-size", type=int, default=RunConfig.l2p_pool_size,
                      help="L2P prompt pool size M (default %(default)s)")
    meth.add_argument("--l2p-prompt-length", type=int, default=RunConfig.l2p_prompt_length,
                      help="L2P length of each pool prompt (default %(default)s)")
    meth.add_argument("--l2p-top-k", type=int, default=RunConfig.l2p_top_k,
                      help="L2P prompts chosen per input by key match (default %(default)s)")
    meth.add_argument("--l2p-key-weight", type=float, default=RunConfig.l2p_key_weight,
                      help="L2P weight of the key-query pull term (default %(default)s)")
    meth.add_argument("--progprompt-length", type=int, default=RunConfig.progprompt_length,
                      help="ProgPrompt soft prompt length per task (default %(default)s)")
    meth.add_argument("--lfpt5-prompt-length", type=int, default=RunConfig.lfpt5_prompt_length,
                      help="LFPT5 soft prompt length (default %(default)s)")
    meth.add_argument("--lfpt5-lm-weight", type=float, default=RunConfig.lfpt5_lm_weight,
                      help="LFPT5 weight of the pseudo-sample generation loss (default "
                      "%(default)s)")
    meth.add_argument("--lfpt5-kd-weight", type=float, default=RunConfig.lfpt5_kd_weight,
                      help="LFPT5 weight of the distillation term (default %(default)s)")
    meth.add_argument("--lfpt5-pseudo-per-label", type=int,
                      default=RunConfig.lfpt5_pseudo_per_label,
                      help="LFPT5 pseudo samples replayed per label of each earlier task "
                      "(default %(default)s)")
    meth.add_argument("--osf-preserve", type=_float_list,
                      help="OSF share of each weight's singular directions preserved, one per "
                      "task (default: task t of T preserves t/T, at least one direction)")
    meth.add_argument("--osf-projection", choices=OSF_PROJECTIONS,
                      default=RunConfig.osf_projection,
                      help="OSF: 'parameter' keeps every update outside the preserved subspace "
                      "(paper); 'gradient' only projects gradients, as PEFT's tuner alone does")
    meth.add_argument("--inflora-threshold", type=float, default=RunConfig.inflora_threshold,
                      help="InfLoRA base energy threshold of the input-subspace memory "
                      "(default %(default)s)")
    meth.add_argument("--inflora-variant", choices=INFLORA_VARIANTS,
                      default=RunConfig.inflora_variant,
                      help="InfLoRA: 'paper' designs A from the projected new-task inputs; "
                      "'released' is the public T5 code (random A projected)")
    opt = parser.add_argument_group("optimisation (defaults: the order's, else paper orders 1-3)")
    opt.add_argument("--lr", type=_floats, help="learning rate, one or one per task")
    opt.add_argument("--epochs", type=_ints, help="epochs, one or one per task")
    opt.add_argument("--batch-size", type=int)
    opt.add_argument("--weight-decay", type=float, default=0.0)
    opt.add_argument("--max-source-length", type=int, default=512)
    opt.add_argument("--seed", type=int, default=42)
    opt.add_argument("--group-by-length", action=argparse.BooleanOptionalAction, default=True,
                     help="training batches of similar length, still shuffled (default: on)")
    ev = parser.add_argument_group("data and evaluation")
    ev.add_argument("--train-per-task", type=int, help="stratified training subsample per task")
    ev.add_argument("--test-per-task", type=int, help="stratified test subsample per task")
    ev.add_argument("--eval-batch-size", type=int, default=64)
    ev.add_argument("--eval-mode", choices=["generate", "rank"], default="generate",
                    help="greedy generation + exact match, or the most likely label")
    ev.add_argument("--eval-on", choices=["seen", "all"], default="seen",
                    help="evaluate seen tasks after each task, or all tasks (full matrix)")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    data_dir = data_dir_from(args.data)
    order = get_order(args.order) if args.order else None
    if order and args.tasks:
        raise ConfigError("pass --order or --tasks, not both")
    if order:
        names = substitute(order.tasks, _substitutions(args.substitute))
    elif args.tasks:
        if args.substitute:
            raise ConfigError("--substitute applies to --order; edit --tasks instead")
        names = args.tasks
    else:
        raise ConfigError("no tasks: pass --order NAME or --tasks a,b,c")
    tasks = [_available_task(data_dir, name, order.name if order else None) for name in names]

    def from_order(value, field: str, default):
        if value is not None:
            return value
        if field in METHOD_DEFAULTS.get(args.method, {}):  # e.g. full fine-tuning's lr
            return METHOD_DEFAULTS[args.method][field]
        if order is not None:
            preset = getattr(order, field)
            return list(preset) if isinstance(preset, tuple) else preset
        return default

    l1_lambda = args.l1_lambda
    if l1_lambda is None:
        l1_lambda = DEFAULT_L1_LAMBDA
        if order is not None:
            paper = order.paper_lambda
            if args.l1_on == "reference":  # the released code's form: the paper's λ as is
                l1_lambda = list(paper) if isinstance(paper, tuple) else paper
            elif isinstance(paper, tuple):
                l1_lambda = [DEFAULT_L1_LAMBDA * p / PAPER_BASE_LAMBDA for p in paper]
            else:
                l1_lambda = DEFAULT_L1_LAMBDA * paper / PAPER_BASE_LAMBDA
    return RunConfig(
        model=args.model,
        data_dir=str(data_dir),
        tasks=tasks,
        order=order.name if order else None,
        method=args.method,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=args.target_modules,
        l1_lambda=l1_lambda,
        l1_on=args.l1_on,
        olora_lambda1=args.olora_lambda1,
        olora_lambda2=args.olora_lambda2,
        replay_fraction=args.replay_fraction,
        ewc_lambda=args.ewc_lambda,
        lwf_alpha=args.lwf_alpha,
        lwf_temperature=args.lwf_temperature,
        l2p_pool_size=args.l2p_pool_size,
        l2p_prompt_length=args.l2p_prompt_length,
        l2p_top_k=args.l2p_top_k,
        l2p_key_weight=args.l2p_key_weight,
        progprompt_length=args.progprompt_length,
        lfpt5_prompt_length=args.lfpt5_prompt_length,
        lfpt5_lm_weight=args.lfpt5_lm_weight,
        lfpt5_kd_weight=args.lfpt5_kd_weight,
        lfpt5_pseudo_per_label=args.lfpt5_pseudo_per_label,
        osf_preserve=args.osf_preserve,
        osf_projection=args.osf_projection,
        inflora_threshold=args.inflora_threshold,
        inflora_variant=args.inflora_variant,
        learning_rate=from_order(args.lr, "learning_rate", 1e-3),
        epochs=from_order(args.epochs, "epochs", 10),
        batch_size=from_order(args.batch_size, "batch_size", 32),
        weight_decay=args.weight_decay,
        max_source_length=args.max_source_length,
        train_per_task=args.train_per_task,
        test_per_task=args.test_per_task,
        eval_batch_size=args.eval_batch_size,
        eval_on=args.eval_on,
        seed=args.seed,
        group_by_length=args.group_by_length,
        eval_mode=args.eval_mode,
    )


def _available_task(data_dir: Path, name: str, order: str | None) -> str:
    if task_is_available(data_dir, name):
        return "/".join(resolve_task(data_dir, name))
    category = KNOWN_CATEGORIES.get(name.lower())
    label = f"{category}/{name}" if category else name
    where = f"{order} needs" if order else "--tasks names"
    hint = (
        f"--substitute {name}=OTHER (e.g. {name}=yelp)" if order else "drop or replace it"
    )
    raise DataError(
        f"{where} {label}, which has no train.json/test.json in {data_dir}; substitute another "
        f"task: {hint}"
    )


def cmd_run(args: argparse.Namespace) -> int:
    from nlora.runner import print_results, run  # heavy imports only when running

    config = config_from_args(args)
    metrics = run(config, args.out)
    print_results(metrics)
    print(f"\nrun folder: {args.out}")
    return 0


def cmd_orders(args: argparse.Namespace) -> int:
    for order in ORDERS.values():
        print(f"{order.name:<13} {' -> '.join(order.tasks)}")
        print(f"{'':<13} lr {order.learning_rate}, epochs {order.epochs}, batch "
              f"{order.batch_size}, paper λ {order.paper_lambda} ({order.model})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nlora", description="Continual learning of language models with N-LoRA."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run", help="learn a task sequence, evaluate after each task")
    add_run_arguments(run_parser)
    run_parser.set_defaults(func=cmd_run)
    orders = sub.add_parser("orders", help="list the paper's task orders")
    orders.set_defaults(func=cmd_orders)
    from nlora import compare  # compare builds on this module's run options

    compare_parser = sub.add_parser("compare", help="run several methods on the same tasks")
    compare.add_compare_arguments(compare_parser)
    compare_parser.set_defaults(func=compare.run_compare)
    report_parser = sub.add_parser("report", help="Markdown report with figures for runs")
    report.add_report_arguments(report_parser)
    report_parser.set_defaults(func=report.run_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("transformers", "accelerate", "peft", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except NloraError as err:
        print(f"nlora: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nlora: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
