"""``python -m devstack.host``: run the host until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from collections.abc import Sequence
from types import FrameType

from devstack.host import worker_logs
from devstack.host.errors import HostError
from devstack.host.local_host import REPO_ROOT, LocalHost
from shared.logging_setup import configure_logging

logger = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the host until SIGTERM or SIGINT. Returns 0 after a clean stop, 2 when the app cannot start."""
    parser = argparse.ArgumentParser(
        prog="python -m devstack.host", description="A local Azure Functions host for function_app.py."
    )
    parser.add_argument("--app-dir", default=str(REPO_ROOT), help="directory holding function_app.py")
    parser.add_argument("--settings", default=None, help="local.settings.json (default: <app-dir>/local.settings.json)")
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to listen on")
    parser.add_argument("--port", type=int, default=7071)
    args = parser.parse_args(argv)
    # As the app itself: redacted, the SDKs' per-request lines muted (queue polling would drown the invocations).
    configure_logging()
    worker_logs.install()

    stop_requested = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop_requested.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        host = LocalHost(args.app_dir, args.settings, args.port, host=args.host)
        host.start()
    except HostError as error:
        logger.error("host cannot start: %s", error)
        return 2
    try:
        while not stop_requested.wait(0.5):
            pass
    finally:
        host.stop()
    return 0
