"""Write docs/options.md from the option declarations (a test checks it is up to date)."""

from pathlib import Path

from nlora.config import OPTION_CLASSES
from nlora.options import option_table

DOC = Path(__file__).resolve().parents[1] / "docs" / "options.md"

HEAD = """# Options

Every option of `nlora run` / `nlora compare`, as a `config.yaml` key and a flag. Each is
declared once, in `src/nlora/config.py` (the core options) or in its method's file under
`src/nlora/methods/` (the method's own, named with its prefix); the flags, `--help`, the checks
and typed reading of config files come from the same declaration. This page is generated from
it: `python scripts/make_options_doc.py`. "One per task": a comma-separated list on the command
line, a YAML list in a file. Defaults shown are nlora's own; an order, a method or
`--protocol release` may set another (docs/methods.md, "Defaults"), and the run prints where
each value came from.

"""

if __name__ == "__main__":
    DOC.write_text(HEAD + option_table(OPTION_CLASSES), encoding="utf-8")
    print(f"wrote {DOC}")
