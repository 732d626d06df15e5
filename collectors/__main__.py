"""``python -m collectors``: see collectors.cli."""

from __future__ import annotations

import sys

from collectors.cli import main

sys.exit(main())
