"""``python -m d2v.cli ...`` (what ``accelerate launch -m d2v.cli run SPEC`` starts in every process)."""

import sys

from d2v.cli.main import console

sys.exit(console())
