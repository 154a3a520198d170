"""Rebuild the small SuperNI sample shipped inside the package (``nlora/sample_data/superni``)
for ``nlora demo --benchmark superni``.

    python scripts/make_superni_sample.py [--source ../shared/CL_Benchmark] [--check]

Three short-answer tasks of the 15 (``SAMPLE``), each file a Natural-Instructions task
object as released, with every key kept and ``Instances`` cut to a seeded random subset in
source order. The draw depends only on the task, the split and the source rows, so running
this again on the same source rewrites every file byte for byte; ``--check`` verifies that
without writing. ``MANIFEST.json`` records, per split, the source file's SHA-256, its
instance count and the indices taken.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET = REPO / "src" / "nlora" / "sample_data" / "superni"
SOURCE = REPO.parent / "shared" / "CL_Benchmark"
SEED = "nlora-superni-sample-v1"
# task -> (train, test) instances: short answers, so a short CPU run can learn something
SAMPLE: dict[str, tuple[int, int]] = {
    "task363_sst2_polarity_classification": (96, 40),
    "task591_sciq_answer_generation": (96, 40),
    "task875_emotion_classification": (96, 40),
}


def build(source: Path, target: Path) -> None:
    manifest: dict[str, dict] = {"seed": SEED, "tasks": {}}
    for task, sizes in SAMPLE.items():
        entry = {}
        for split, n in zip(("train", "test"), sizes, strict=True):
            raw = (source / "SuperNI" / task / f"{split}.json").read_bytes()
            data = json.loads(raw)
            instances = data["Instances"]
            chosen = sorted(random.Random(f"{SEED}/{task}/{split}").sample(
                range(len(instances)), min(n, len(instances))))
            data["Instances"] = [instances[i] for i in chosen]
            out = target / "SuperNI" / task / f"{split}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n",
                           encoding="utf-8")
            entry[split] = {"source_sha256": hashlib.sha256(raw).hexdigest(),
                            "source_instances": len(instances), "instances": chosen}
        manifest["tasks"][task] = entry
    (target / "MANIFEST.json").write_text(json.dumps(manifest, separators=(",", ":")) + "\n",
                                          encoding="utf-8")


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*.json")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=SOURCE, help="CL_Benchmark folder")
    parser.add_argument("--target", type=Path, default=TARGET)
    parser.add_argument("--check", action="store_true", help="compare, write nothing")
    args = parser.parse_args()
    if not (args.source / "SuperNI").is_dir():
        print(f"make_superni_sample: no SuperNI folder in {args.source}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        build(args.source, Path(tmp))
        if args.check:
            fresh, shipped = files(Path(tmp)), files(args.target)
            differ = sorted(k for k in fresh.keys() | shipped.keys()
                            if fresh.get(k) != shipped.get(k))
            print("identical" if not differ else "differs: " + ", ".join(differ))
            return 0 if not differ else 1
    build(args.source, args.target)
    size = sum(p.stat().st_size for p in args.target.rglob("*") if p.is_file())
    print(f"wrote {args.target} ({size / 1e3:.0f} kB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
