"""``nlora tasks [--data DIR]``: what a data folder holds (``nlora.catalog``)."""

from __future__ import annotations

import argparse
import sys

from nlora.catalog import format_tasks, list_tasks
from nlora.data import data_dir_from
from nlora.errors import ConfigError
from nlora.families import TaskFolderProblems


def cmd_tasks(args: argparse.Namespace) -> int:
    if args.data and args.data_dir and args.data != args.data_dir:
        raise ConfigError(f"nlora tasks: two data folders given ({args.data}, --data "
                          f"{args.data_dir}); give one")
    data_dir = data_dir_from(args.data or args.data_dir)
    try:
        infos = list_tasks(data_dir)
    except TaskFolderProblems as err:  # every bad file or row of a user's tasks, one line each
        for problem in err.problems:
            print(f"nlora: error: {problem}", file=sys.stderr)
        return 2
    print(format_tasks(infos, data_dir))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "tasks", help="list and check the tasks of a data folder: family, labels or metric, "
        "sizes, rows left out"
    )
    parser.add_argument("data", nargs="?", metavar="DIR",
                        help="the data folder (same as --data)")
    parser.add_argument("--data", dest="data_dir", metavar="DIR",
                        help="CL_Benchmark folder, SuperNI tasks or a user's task folders "
                        "(default: $NLORA_DATA, else the sample shipped with nlora)")
    parser.set_defaults(func=cmd_tasks)
