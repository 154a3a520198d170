"""Build the example of a user's task folders (docs/examples/user_tasks) from the sample data
shipped in the package, so the format of docs/benchmarks.md can be tried as it is:

    python scripts/make_user_tasks_example.py [--out docs/examples/user_tasks] [--check]
    nlora tasks docs/examples/user_tasks
    nlora run --data docs/examples/user_tasks --tasks headline,sentiment --out runs/mine

Two tasks: ``headline`` (an AG News text -> its title, scored by ROUGE-L) and ``sentiment``
(a Yelp review -> its rating, accuracy over the five labels). Rows are the first ones of the
sample's files, so the output depends only on the sample; ``--check`` verifies the folder
byte for byte without writing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "src" / "nlora" / "sample_data" / "CL_Benchmark"
OUT = REPO / "docs" / "examples" / "user_tasks"
TRAIN, TEST = 40, 10  # rows per task: enough to try a command, small enough for the docs

TASK_YAML = {
    "headline": "instruction: Write the headline of the following news text.\n"
                "metric: rougeL\nmax_target_length: 32\nmax_new_tokens: 32\n",
    "sentiment": "instruction: \"How many stars does this review give? Answer with one of: "
                 "very negative, negative, neutral, positive, very positive.\"\n"
                 "metric: accuracy\n"
                 "labels: [very negative, negative, neutral, positive, very positive]\n",
}


def _headline(row: dict[str, str]) -> dict[str, str]:
    """AG News rows read ``Title: T\\nText: X\\n``: the text is the input, the title the output."""
    title, _, text = row["sentence"].partition("\nText: ")
    return {"input": text.strip(), "output": title.removeprefix("Title: ").strip()}


def _sentiment(row: dict[str, str]) -> dict[str, str]:
    return {"input": row["sentence"].removeprefix("Text: ").strip(), "output": row["label"]}


def build() -> dict[str, str]:
    """Relative path -> file content of the example folder."""
    files = {}
    for task, source, convert in (("headline", "TC/agnews", _headline),
                                  ("sentiment", "SC/yelp", _sentiment)):
        for split, size in (("train", TRAIN), ("test", TEST)):
            rows = json.loads((SAMPLE / source / f"{split}.json").read_text(encoding="utf-8"))
            lines = [json.dumps(convert(r), ensure_ascii=False) for r in rows[:size]]
            files[f"{task}/{split}.jsonl"] = "\n".join(lines) + "\n"
        files[f"{task}/task.yaml"] = TASK_YAML[task]
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--check", action="store_true", help="verify, do not write")
    args = parser.parse_args(argv)
    files = build()
    if args.check:
        stale = [p for p, text in files.items()
                 if not (args.out / p).is_file()
                 or (args.out / p).read_text(encoding="utf-8") != text]
        for path in stale:
            print(f"{args.out / path} differs from what the script builds", file=sys.stderr)
        return 1 if stale else 0
    for path, text in files.items():
        (args.out / path).parent.mkdir(parents=True, exist_ok=True)
        (args.out / path).write_text(text, encoding="utf-8")
    print(f"wrote {len(files)} files under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
