"""How the demo's settings were chosen, without looking at test answers.

Carves a validation split out of the embedded sample's *training* rows (label-stratified,
seeded; those rows are removed from training), writes it as a data folder whose test.json is
that validation split, and runs the demo there with the given overrides:

    python bench/demo_tuning.py --set train_per_task=160 --set learning_rate=1e-3 \
        --set eval_mode=rank --out runs/tune-a

Prints the demo table and appends the numbers to bench/results/demo_tuning.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

from nlora.data import SAMPLE_DATA, read_labels, read_split, resolve_task, stratified_sample
from nlora.demo import DEMO_METHODS, DEMO_OPTIONS, format_demo, run_demo

RESULTS = Path(__file__).resolve().parent / "results" / "demo_tuning.json"


def carve_validation(source: Path, target: Path, tasks: list[str], rows: int, seed: int) -> None:
    """target/CAT/DS: train.json = source train minus a stratified ``rows``-row validation
    split, test.json = that split."""
    for name in tasks:
        category, dataset = resolve_task(source, name)
        folder, out = source / category / dataset, target / category / dataset
        labels = read_labels(folder / "labels.json")
        train, _ = read_split(folder / "train.json", labels)
        held = {id(r) for r in stratified_sample(train, rows, seed)}
        out.mkdir(parents=True)
        (out / "labels.json").write_text(json.dumps(labels), encoding="utf-8")
        (out / "train.json").write_text(
            json.dumps([r for r in train if id(r) not in held]), encoding="utf-8")
        (out / "test.json").write_text(
            json.dumps([r for r in train if id(r) in held]), encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a DEMO_OPTIONS key (YAML value)")
    parser.add_argument("--methods", default=",".join(DEMO_METHODS))
    parser.add_argument("--validation-rows", type=int, default=60)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    options = {**DEMO_OPTIONS, **overrides}
    with tempfile.TemporaryDirectory() as tmp:
        carve_validation(SAMPLE_DATA, Path(tmp), options["tasks"], args.validation_rows,
                         seed=1234)
        overrides["test_per_task"] = None  # the whole validation split
        start = time.perf_counter()
        result = run_demo(args.out, methods=args.methods.split(","), data_dir=tmp, **overrides)
        seconds = time.perf_counter() - start
    print(format_demo(result))
    print(f"\n{seconds:.0f} s")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    history = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []
    history.append({
        "overrides": {k: v for k, v in overrides.items() if k != "test_per_task"},
        "validation_rows": args.validation_rows, "seconds": round(seconds),
        "methods": {m.method: {"accuracy": m.accuracy, "summary": m.summary, "acr": m.acr,
                               "density": m.density, "seconds": m.seconds}
                    for m in result.methods},
    })
    RESULTS.write_text(json.dumps(history, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
