"""Loopback ports for tests: a free one to listen on, whether one answers, and waiting until a part is up."""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

POLL_SECONDS = 0.05
T = TypeVar("T")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def port_open(port: int, *, timeout: float = 2.0) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port`` within ``timeout`` seconds."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def https_ok(url: str, ca: str | Path, *, timeout: float = 3.0) -> bool:
    """Whether ``url`` answers 200 over TLS verified against ``ca`` (a stand-in's ``/_control/health``)."""
    try:
        context = ssl.create_default_context(cafile=str(ca))
        with urllib.request.urlopen(url, timeout=timeout, context=context) as answer:
            return int(answer.status) == 200
    except OSError:
        return False


def wait_until(
    check: Callable[[], T],
    timeout: float,
    what: str,
    *,
    process: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
) -> T:
    """Poll ``check`` until it returns something true, and return that. Raises AssertionError naming ``what`` when
    ``timeout`` seconds pass or ``process`` exits first; the message ends with the tail of ``log`` when given."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        exited = process is not None and process.poll() is not None
        if exited or time.monotonic() > deadline:
            reason = "exited" if exited else f"not ready within {timeout:g} s"
            tail = f"; its log ends with:\n{log.read_text(errors='replace')[-2000:]}" if log and log.exists() else ""
            raise AssertionError(f"{what}: {reason}{tail}")
        time.sleep(POLL_SECONDS)
