"""``python -m nlora.cli`` (what ``accelerate launch -m nlora.cli`` starts)."""

import sys

from nlora.cli import main

sys.exit(main())
