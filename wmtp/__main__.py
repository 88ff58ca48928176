"""`python -m wmtp` runs the `wmtp` command."""

import sys

from wmtp.cli import console

sys.exit(console())
