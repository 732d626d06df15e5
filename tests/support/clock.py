"""A wall clock that tests move forward: it stands in for the ``time`` module inside the modules that read
``time.time`` for token expiry (the token services and MSAL), so that hours of five-minute runs take seconds."""

from __future__ import annotations

import time
import types
from typing import Any


class ShiftedClock(types.SimpleNamespace):
    offset = 0.0

    def time(self) -> float:
        return time.time() + self.offset

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)
