"""``python -m xksproxy``."""

import sys

from xksproxy.cli import main

sys.exit(main())
