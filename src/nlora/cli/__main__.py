"""``python -m nlora.cli`` (what ``torchrun`` / ``accelerate launch -m nlora.cli`` start)."""

import os
import sys

if os.environ.get("RANK", "0") != "0":  # one process shows progress bars (tqdm reads this
    os.environ.setdefault("TQDM_DISABLE", "1")  # when it is imported, hence before nlora)

from nlora.cli import main  # noqa: E402

sys.exit(main())
