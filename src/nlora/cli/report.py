"""``nlora report RUN [RUN ...] --out DIR``: Markdown report with figures (``nlora.report``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from nlora.param_metrics import DEFAULT_AWOM_NORM, DEFAULT_MODE, DEFAULT_THRESHOLD
from nlora.report import ReportOptions, write_report


def cmd_report(args: argparse.Namespace) -> int:
    options = ReportOptions(
        threshold=args.threshold, threshold_mode=args.threshold_mode, awom_norm=args.awom_norm,
        module=args.module, pair=tuple(args.pair), subspace_task=args.subspace_task,
        crop=args.crop,
    )
    path = write_report(args.runs, args.out, options)
    print(f"nlora report: wrote {path}")
    return 0


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", type=Path, help="run directories to report on")
    parser.add_argument("--out", type=Path, default=Path("report"), help="output folder")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help="an entry of ΔW is non-zero if |x| > threshold "
                             f"(× max|ΔW| in relative mode; default {DEFAULT_THRESHOLD:g})")
    parser.add_argument("--threshold-mode", choices=["relative", "absolute"],
                        default=DEFAULT_MODE, help=f"default {DEFAULT_MODE}")
    parser.add_argument("--awom-norm", choices=["fro", "spectral"], default=DEFAULT_AWOM_NORM,
                        help="matrix norm in AWOM (eq. 8); default Frobenius")
    parser.add_argument("--module", default=None,
                        help="module for the collision map (regex searched in module names; "
                             "default: the first adapted module)")
    parser.add_argument("--pair", type=int, nargs=2, default=(1, 2), metavar=("I", "J"),
                        help="tasks (1-based) compared in the collision map; default 1 2")
    parser.add_argument("--subspace-task", type=int, default=1,
                        help="task (1-based) whose subspace use per layer is plotted (Fig. 3)")
    parser.add_argument("--crop", type=int, default=96,
                        help="collision maps show the top-left CROP×CROP block (0: all)")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("report", help="Markdown report with figures for runs")
    add_report_arguments(parser)
    parser.set_defaults(func=cmd_report)
