"""The ``nlora`` command. Each subcommand lives in its own module here and only calls the
library (``nlora.presets``, ``nlora.runner``, ``nlora.report``, ...), never the reverse."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence

from nlora.cli import demo, export, learn, load, report, study, tasks
from nlora.errors import NloraError

# each module's register(subparsers) adds its subcommands
COMMANDS = (demo, learn, tasks, report, export, load, study)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nlora", description="Continual learning of language models with N-LoRA."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.register(sub)
    return parser


class Terminated(BaseException):
    """SIGTERM (a scheduler's or a user's kill): unwinds like Ctrl-C, so the run folder's
    lock and files are left as a resume expects."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("transformers", "accelerate", "peft", "httpx", "httpx2", "urllib3",
                  "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    args = build_parser().parse_args(argv)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.func(args)
    except NloraError as err:
        # an error every process of a multi-process run raised alike is printed by one
        if not getattr(err, "shared", False) or int(os.environ.get("RANK", "0")) == 0:
            print(f"nlora: error: {err}", file=sys.stderr)
        else:  # let the main process print before a launcher stops the group on our exit
            time.sleep(2)
        return 2
    except KeyboardInterrupt:
        print("nlora: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Terminated:
        if int(os.environ.get("RANK", "0")) == 0:
            print("nlora: stopped by SIGTERM; rerun the same command to resume (finished tasks "
                  "are kept)", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
