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
    EXTRA_OPTIONS,
    FIELDS,
    OPTION_CLASSES,
    WHAT,
    RunConfig,
    read_options,
)
from nlora.errors import ConfigError
from nlora.options import add_arguments
from nlora.orders import ORDERS
from nlora.presets import combine_options, make_config
from nlora.tracking import REPORT_TO


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_run_arguments(parser: argparse.ArgumentParser, with_method: bool = True) -> None:
    """The run options, generated from their declarations (nlora.config, each method's file);
    destinations are RunConfig fields, absent unless given."""
    what = parser.add_argument_group(WHAT)
    what.add_argument("--config", dest="config_file", metavar="FILE.yaml", type=Path,
                      help="options from a YAML file with the keys of a run's config.yaml "
                      "(a finished run's config reruns as it is); flags given override it")
    what.add_argument("--substitute", action="append",
                      help="replace tasks of --order, e.g. yahoo=yelp (data not available)")
    what.add_argument("--instructions", metavar="FILE",
                      help="JSON/YAML category -> instruction (or the release's "
                      "instruction_config.json): adds or replaces prompt instructions")
    skip = () if with_method else ("method",)  # `nlora compare` takes --methods instead
    add_arguments(parser, OPTION_CLASSES, skip=skip, groups={WHAT: what})


def given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The run options the user gave: ``--config FILE``'s, overridden by the flags given
    (flags not given are absent from ``args``)."""
    flags = {k: v for k, v in vars(args).items() if k in FIELDS or k in EXTRA_OPTIONS}
    from_file = read_options(args.config_file) if "config_file" in args else {}
    return combine_options(from_file, flags)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    return make_config(**given_options(args))


def cmd_run(args: argparse.Namespace) -> int:
    from nlora.distributed import is_main_process  # heavy: only when running
    from nlora.runner import print_results, run

    config = config_from_args(args)
    metrics = run(config, args.out, report_to=getattr(args, "report_to", None))
    if is_main_process():  # several processes: one table
        print_results(metrics)
        print(f"\nrun folder: {args.out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from nlora.compare import compare, format_comparison  # heavy imports only when running
    from nlora.distributed import is_main_process

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
              f"{order.batch_size}, paper λ {order.paper_lambda} ({order.model})"
              + ("" if order.source == "paper Appendix 7.5" else f"; {order.source}"))
    return 0


def add_report_to(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--report-to", choices=REPORT_TO,
                        help="also log loss, penalty, learning rate per step and accuracies to "
                        "TensorBoard (RUN/tensorboard) or Weights & Biases (offline in "
                        "RUN/wandb unless WANDB_MODE=online); pip install 'nlora[tensorboard]' "
                        "or 'nlora[wandb]'; run.log always keeps them as text")


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
