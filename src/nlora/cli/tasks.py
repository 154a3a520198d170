"""``nlora tasks [--data DIR]``: what a data folder holds (``nlora.catalog``)."""

from __future__ import annotations

import argparse

from nlora.catalog import format_tasks, list_tasks
from nlora.data import data_dir_from


def cmd_tasks(args: argparse.Namespace) -> int:
    data_dir = data_dir_from(args.data_dir)
    print(format_tasks(list_tasks(data_dir), data_dir))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "tasks", help="list the tasks of a data folder: labels, sizes, rows left out"
    )
    parser.add_argument("--data", dest="data_dir", metavar="DIR",
                        help="CL_Benchmark folder (default: $NLORA_DATA, else the sample "
                        "shipped with nlora)")
    parser.set_defaults(func=cmd_tasks)
