"""Rebuild the small benchmark sample shipped inside the package (``nlora/sample_data``).

    python scripts/make_sample_data.py [--source ../shared/CL_Benchmark]

Draws a fixed, label-stratified subset of rows from each task of the full ``CL_Benchmark``
folder and writes it in the same layout (``CATEGORY/DATASET/{train,test,labels}.json``;
``dev.json``, identical to ``test.json`` in the release, is left out). The draw depends only
on the task name, the split and the source rows, so running this again on the same source
rewrites every file byte for byte; ``--check`` verifies that without writing.
``MANIFEST.json`` records, per split, the source file's SHA-256, its row count and the
indices of the rows taken.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET = REPO / "src" / "nlora" / "sample_data" / "CL_Benchmark"
SOURCE = REPO.parent / "shared" / "CL_Benchmark"

# task -> (train rows, test rows). The five short-text tasks carry enough rows for the demo
# (a validation part carved from train, and ~100 test rows); the others only enough for the
# tests and for trying a command.
SIZES: dict[str, tuple[int, int]] = {
    "TC/agnews": (400, 100),
    "TC/dbpedia": (400, 100),
    "SC/amazon": (400, 100),
    "SC/yelp": (400, 100),
    "SC/SST-2": (400, 100),
    "SC/IMDB": (48, 24),
    "NLI/CB": (64, 32),
    "NLI/MNLI": (64, 48),
    "NLI/RTE": (64, 32),
    "QQP/QQP": (64, 32),
    "BoolQA/BoolQA": (48, 24),
}
LABELS_ONLY = ("TC/yahoo",)  # as in the shared folder: labels.json without data
SEED = "nlora-sample-v1"


def draw(rows: list[dict], n: int, key: str) -> list[int]:
    """Indices of ``n`` rows, stratified by label value (every value present at least once,
    including values outside labels.json, so rows the loader leaves out stay represented),
    returned in source order."""
    if n >= len(rows):
        return list(range(len(rows)))
    rng = random.Random(f"{SEED}/{key}")
    by_label: dict[str, list[int]] = defaultdict(list)
    for index, row in enumerate(rows):
        by_label[str(row.get("label"))].append(index)
    labels = sorted(by_label)
    counts = {lab: 1 for lab in labels}  # at least one of each value
    rest = n - len(labels)
    quotas = {lab: rest * len(by_label[lab]) / len(rows) for lab in labels}
    for lab in labels:
        counts[lab] += int(quotas[lab])
    by_remainder = sorted(labels, key=lambda lab: (quotas[lab] - int(quotas[lab]), lab),
                          reverse=True)
    for lab in by_remainder[: n - sum(counts.values())]:
        counts[lab] += 1
    chosen = []
    for lab in labels:
        chosen += rng.sample(by_label[lab], min(counts[lab], len(by_label[lab])))
    return sorted(chosen)


def dump(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, indent=1) + "\n"


def build(source: Path, target: Path) -> None:
    manifest: dict[str, dict] = {"seed": SEED, "tasks": {}}
    for name, (n_train, n_test) in SIZES.items():
        folder, out = source / name, target / name
        out.mkdir(parents=True)
        shutil.copyfile(folder / "labels.json", out / "labels.json")
        entry = {}
        for split, n in (("train", n_train), ("test", n_test)):
            raw = (folder / f"{split}.json").read_bytes()
            rows = json.loads(raw)
            chosen = draw(rows, n, f"{name}/{split}")
            sample = [{"sentence": rows[i]["sentence"], "label": rows[i]["label"]}
                      for i in chosen]
            (out / f"{split}.json").write_text(dump(sample), encoding="utf-8")
            entry[split] = {"source_sha256": hashlib.sha256(raw).hexdigest(),
                            "source_rows": len(rows), "rows": chosen}
        manifest["tasks"][name] = entry
    for name in LABELS_ONLY:
        (target / name).mkdir(parents=True)
        shutil.copyfile(source / name / "labels.json", target / name / "labels.json")
    (target / "MANIFEST.json").write_text(
        json.dumps(manifest, separators=(",", ":")) + "\n", encoding="utf-8"
    )


def same_tree(a: Path, b: Path) -> list[str]:
    files_a = {p.relative_to(a) for p in a.rglob("*") if p.is_file()}
    files_b = {p.relative_to(b) for p in b.rglob("*") if p.is_file()} - {Path("README.md")}
    differ = sorted(str(p) for p in files_a ^ files_b)
    differ += sorted(str(p) for p in files_a & files_b
                     if (a / p).read_bytes() != (b / p).read_bytes())
    return differ


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=SOURCE, help="full CL_Benchmark folder")
    parser.add_argument("--target", type=Path, default=TARGET)
    parser.add_argument("--check", action="store_true",
                        help="rebuild in a temporary folder and compare, write nothing")
    args = parser.parse_args()
    if not (args.source / "TC" / "agnews" / "train.json").is_file():
        print(f"make_sample_data: no CL_Benchmark data at {args.source}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "CL_Benchmark"
        build(args.source, fresh)
        if args.check:
            differ = same_tree(fresh, args.target)
            print("identical" if not differ else "differs: " + ", ".join(differ))
            return 0 if not differ else 1
        # keep hand-written files (README.md) beside the data
        for name in list(SIZES) + list(LABELS_ONLY):
            shutil.rmtree(args.target / name, ignore_errors=True)
        args.target.mkdir(parents=True, exist_ok=True)
        shutil.copytree(fresh, args.target, dirs_exist_ok=True)
    size = sum(p.stat().st_size for p in args.target.rglob("*") if p.is_file())
    print(f"wrote {args.target} ({size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
