"""Stopping the processes tests start: politely first, then for good, so that no stand-in outlives its test."""

from __future__ import annotations

import os
import signal
import subprocess

STOP_TIMEOUT_SECONDS = 10.0  # before a graceful stop becomes a kill


def stop_process(
    process: subprocess.Popen[bytes] | subprocess.Popen[str],
    *,
    group: bool = False,
    timeout: float = STOP_TIMEOUT_SECONDS,
) -> int:
    """SIGTERM ``process`` (its whole process group with ``group``, for one started with
    ``start_new_session=True``), wait up to ``timeout`` seconds, then SIGKILL. Returns its exit code; a process that
    already ended is left alone."""
    if process.poll() is not None:
        return int(process.returncode)
    _signal(process, signal.SIGTERM, group=group)
    try:
        return int(process.wait(timeout))
    except subprocess.TimeoutExpired:
        _signal(process, signal.SIGKILL, group=group)
        return int(process.wait())


def _signal(process: subprocess.Popen[bytes] | subprocess.Popen[str], signum: int, *, group: bool) -> None:
    try:
        if group:
            os.killpg(process.pid, signum)
        else:
            process.send_signal(signum)
    except ProcessLookupError:
        pass  # it ended between the poll and the signal
