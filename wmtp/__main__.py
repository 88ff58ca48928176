"""`python -m wmtp` runs the `wmtp` command."""

import sys

from wmtp.cli import main

sys.exit(main())
