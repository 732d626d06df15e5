"""``python -m devstack start|stop|status``: the local stand-ins for Azure."""

from __future__ import annotations

import sys

from devstack.stack import main

sys.exit(main())
