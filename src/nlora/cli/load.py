"""``nlora load RUN --task T``: the model as it was after task T (``nlora.load``)."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_load(args: argparse.Namespace) -> int:
    from nlora.load import load_model, save_model, verify_predictions  # heavy: torch, PEFT

    loaded = load_model(args.run, args.task)
    steps = ", ".join(f.name for f in loaded.folders)
    print(f"{args.run}: after task {loaded.task} ({loaded.folders[-1].name}), method "
          f"{loaded.config.method} on {loaded.config.model}; restored {steps}")
    code = 0
    if args.verify:
        matching, total = verify_predictions(loaded)
        print(f"reproduces {matching}/{total} of the predictions recorded after task "
              f"{loaded.task}")
        code = 0 if matching == total else 1
    if args.out is not None:
        print(f"saved to {save_model(loaded, args.out)} (plain Hugging Face model folder)")
    return code


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("load", help="the model as it was after task T of a run")
    parser.add_argument("run", type=Path, help="run folder")
    parser.add_argument("--task", type=int, default=None,
                        help="1-based task (training step); default: the last finished")
    parser.add_argument("--out", type=Path, default=None,
                        help="save it here as a plain Hugging Face model (adapters merged)")
    parser.add_argument("--verify", action="store_true",
                        help="predict the task's recorded test rows again and count matches")
    parser.set_defaults(func=cmd_load)
