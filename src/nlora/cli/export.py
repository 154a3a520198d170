"""``nlora export RUN --out DIR``: the run's final model as a plain HF folder
(``nlora.export``)."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_export(args: argparse.Namespace) -> int:
    from nlora.export import export_model  # heavy imports only when running

    for folder in export_model(args.run, args.out):
        print(f"nlora export: wrote {folder}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "export", help="save the model after the last finished task, merged, as a plain "
        "Hugging Face folder (safetensors + tokenizer)",
    )
    parser.add_argument("run", type=Path, help="run folder")
    parser.add_argument("--out", type=Path, required=True,
                        help="new folder; a per-task method (pertaskft) writes one subfolder "
                        "per task")
    parser.set_defaults(func=cmd_export)
