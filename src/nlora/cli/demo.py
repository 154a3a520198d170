"""``nlora demo``: N-LoRA beside SeqLoRA on a short real sequence, one table (``nlora.demo``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from nlora.cli.learn import _names, add_report_to


def cmd_demo(args: argparse.Namespace) -> int:
    from nlora.demo import format_demo, run_demo  # heavy imports only when running

    result = run_demo(args.out, methods=args.methods, data_dir=args.data_dir,
                      report_to=args.report_to, benchmark=args.benchmark)
    print(format_demo(result))
    minutes, seconds = divmod(round(result.seconds), 60)
    print(f"\nrun folders: {args.out}/<method>/ (nlora report {args.out}/* --out report/); "
          f"demo took {minutes} min {seconds:02d} s")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from nlora.demo import DEMO_BENCHMARKS, DEMO_METHODS, DEMO_OPTIONS, DEMO_SUPERNI_OPTIONS

    parser = sub.add_parser(
        "demo", help="a short real continual-learning run: N-LoRA beside SeqLoRA, one table"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/demo"),
                        help="folder of the runs, one per method (resumes if present)")
    parser.add_argument("--methods", type=_names, default=list(DEMO_METHODS),
                        help=f"methods side by side (default {','.join(DEMO_METHODS)})")
    parser.add_argument("--data", dest="data_dir", metavar="DIR",
                        help="CL_Benchmark folder (default: $NLORA_DATA, else the sample "
                        f"shipped with nlora); tasks {','.join(DEMO_OPTIONS['tasks'])}")
    parser.add_argument("--benchmark", choices=DEMO_BENCHMARKS, default="cl",
                        help="cl: classification tasks of CL_Benchmark (accuracy); superni: "
                        f"{', '.join(DEMO_SUPERNI_OPTIONS['tasks'])} from the SuperNI sample "
                        "shipped with nlora (or --data's SuperNI folder), scored by ROUGE-L")
    add_report_to(parser)
    parser.set_defaults(func=cmd_demo)
