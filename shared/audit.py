"""Audit lines for what an admin changes: who, which mailbox, what, before and after.

One line per change on the ``shared.audit`` logger, in the app's ``key=value`` form; values are JSON with every
non-ASCII and control character escaped, so a crafted folder name or account name cannot forge a second line
or hide text behind a bidi override.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

logger = logging.getLogger(__name__)

FUNCTION_KEY = "function key"  # who acted when App Service authentication does not front the app


def record(action: str, *, mailbox: str, who: str, before: Mapping[str, Any], after: Mapping[str, Any]) -> None:
    """Log one audit line. ``before``/``after`` hold only what changed (or the state that ended)."""
    logger.info(
        "audit action=%s mailbox=%s who=%s before=%s after=%s",
        action,
        mailbox,
        json.dumps(who, ensure_ascii=True),
        json.dumps(dict(before), ensure_ascii=True, sort_keys=True, default=str),
        json.dumps(dict(after), ensure_ascii=True, sort_keys=True, default=str),
    )


def changes(before: Mapping[str, Any], after: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The fields that differ, as (old values, new values)."""
    names = [name for name in after if before.get(name) != after[name]]
    return {n: before.get(n) for n in names}, {n: after[n] for n in names}
