"""Which of an app's log records reach the log, as the Python worker and the Functions host decide it.

The Python worker attaches an invocation id to a record from a thread-local (``context.thread_local_storage``)
that it sets on the thread running the invocation only. The host passes on a user record only when that id
belongs to an invocation still running; anything else is dropped without a trace. So a line written from a thread
the app started itself (a pool thread) never reaches Application Insights unless the app copies
``context.thread_local_storage.invocation_id`` onto that thread. The local host keeps the same rule, so that a test
of the local host sees what Azure would show. Records of the host's own loggers are system logs and always kept.

Sources (see docs/fidelity.md): Microsoft's Python developer reference for Azure Functions, "Logging from created
threads"; azure-functions-python-worker ``dispatcher.py`` (``get_current_invocation_id``, ``on_logging``);
azure-functions-host ``GrpcWorkerChannel.Log``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator

# The worker's one thread-local for every invocation; each invocation's context hands it out.
INVOCATION_LOCAL = threading.local()
SYSTEM_LOGGERS = ("devstack",)  # the host's own lines: not user logs, never dropped

_lock = threading.Lock()
_running: set[str] = set()
_counts = {"dropped": 0}


@contextlib.contextmanager
def running(invocation_id: str) -> Iterator[None]:
    """Mark ``invocation_id`` as running, with this thread as its own, until the block ends."""
    previous = getattr(INVOCATION_LOCAL, "invocation_id", None)
    INVOCATION_LOCAL.invocation_id = invocation_id
    with _lock:
        _running.add(invocation_id)
    try:
        yield
    finally:
        with _lock:
            _running.discard(invocation_id)
        INVOCATION_LOCAL.invocation_id = previous


def current_invocation_id() -> str | None:
    """The invocation id the worker would attach to a record logged now, on this thread."""
    value = getattr(INVOCATION_LOCAL, "invocation_id", None)
    return value if isinstance(value, str) else None


def dropped() -> int:
    """How many user records were dropped so far."""
    return _counts["dropped"]


class HostLogFilter(logging.Filter):
    """Keeps system records and user records of a running invocation (stamped with ``invocation_id``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".", 1)[0] in SYSTEM_LOGGERS:
            return True
        invocation_id = current_invocation_id()
        with _lock:
            kept = invocation_id is not None and invocation_id in _running
            if not kept:
                _counts["dropped"] += 1
        if kept:
            record.invocation_id = invocation_id
        return kept


def install(root: logging.Logger | None = None) -> HostLogFilter:
    """Put the filter on every handler of ``root`` (the root logger by default), as the host sits behind them."""
    host_filter = HostLogFilter()
    for handler in (root or logging.getLogger()).handlers:
        handler.addFilter(host_filter)
    return host_filter
