"""``nlora study SPEC.yaml --out STUDY`` (methods × orders × seeds × grid, docs/studies.md)
and ``nlora study report STUDY``."""

from __future__ import annotations

import argparse
from pathlib import Path

from nlora.errors import ConfigError
from nlora.tracking import REPORT_TO


def cmd_study(args: argparse.Namespace) -> int:
    from nlora.study.driver import CellsFailed, run_study
    from nlora.study.report import write_study_report

    if args.target[0] == "report":
        if len(args.target) != 2:
            raise ConfigError("usage: nlora study report STUDY")
        result = write_study_report(Path(args.target[1]))
        print(result["markdown"])
        print(f"nlora study report: wrote {result['folder']}/table.md, table.csv, table.tex, "
              "means.png")
        return 0
    if args.target[0] == "pack":
        from nlora.study.pack import pack_study

        if len(args.target) != 2 or args.out is None:
            raise ConfigError("usage: nlora study pack STUDY --out DIR")
        packed = pack_study(Path(args.target[1]), args.out)
        print(f"nlora study pack: {len(packed['packed'])} finished cells "
              f"({packed['bytes'] / 1e6:.1f} MB) in {packed['folder']}; "
              f"{len(packed['left_out'])} unfinished left out")
        return 0
    if len(args.target) != 1:
        raise ConfigError("usage: nlora study SPEC.yaml --out STUDY (or: nlora study report "
                          "STUDY)")
    if args.out is None:
        raise ConfigError("nlora study SPEC.yaml needs --out STUDY (the study folder)")
    if args.dry_run:
        from nlora.study.driver import plan_summary

        print("\n".join(plan_summary(args.target[0], args.out)))
        return 0
    try:
        result = run_study(args.target[0], args.out, backend=args.backend,
                           workers=args.workers, stage=args.stage, ray_address=args.ray_address,
                           report_to=args.report_to)
    except CellsFailed as err:
        print(f"nlora: {err}")
        return 1
    if args.stage == "tune":
        print(f"tune stage done: {Path(args.out) / 'selection.json'}")
        return 0
    print(result["markdown"])
    print(f"study folder: {args.out} (tables: {result['folder']})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "study", help="run a study (methods x orders x seeds x grid) from a YAML spec, or "
        "'nlora study report STUDY'",
        description="Run a study from SPEC.yaml in --out STUDY (resumable: the same command "
        "continues it), write its tables again (nlora study report STUDY), or copy its "
        "numbers without weights, to commit or carry (nlora study pack STUDY --out DIR).")
    parser.add_argument("target", nargs="+", metavar="SPEC.yaml | report STUDY | pack STUDY")
    parser.add_argument("--out", type=Path, help="study folder (resumes if present); for "
                        "pack: the folder the numbers are copied to")
    parser.add_argument("--backend", choices=("local", "ray", "slurm"), default="local",
                        help="local: N worker slots on this machine; ray: Ray core tasks "
                        "(pip install 'nlora[ray]'); slurm: one submitit job array (pip "
                        "install 'nlora[slurm]') (default local)")
    parser.add_argument("--workers", type=int, default=1,
                        help="local backend: runs at once, each with its own GPUs or share "
                        "of CPU threads (default 1)")
    parser.add_argument("--stage", choices=("tune", "all"), default="all",
                        help="stop after the tune stage and selection.json (tune), or run "
                        "the final cells and the report too (all, default)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the spec and print the cells it plans; run nothing")
    parser.add_argument("--ray-address", default=None,
                        help="Ray cluster to join (default: resources.ray.address in the "
                        "spec, $RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--report-to", choices=REPORT_TO, default=None,
                        help="every cell also logs its curves to TensorBoard (CELL/tensorboard) "
                        "or Weights & Biases (offline in CELL/wandb unless WANDB_MODE=online; "
                        "W&B run = cell, group = the spec's name)")
    parser.set_defaults(func=cmd_study)
