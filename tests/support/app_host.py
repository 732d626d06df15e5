"""The real function_app.py served by the local Functions host in its own process, for tests over HTTP.

``serve_app(env, folder)`` starts ``python -m tests.support.app_host`` on a free loopback port with ``env`` as
its local.settings.json and stops it afterwards; the host's log is handed to the secret scan. Run as a module,
this file is the host's command line with two differences: the log level comes from TEST_HOST_LOG_LEVEL (the
secret scan sets DEBUG), and at DEBUG the Azure SDK's request lines stay in, which the plain host mutes; and
TEST_KILL_AT=POINT:N kills the host at the Nth POINT of a collection, as ``tests.support.kill_at`` does (SIGKILL's
way: no lease released, no queue message settled).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from tests.support.net import free_port
from tests.support.processes import stop_process

ROOT = Path(__file__).resolve().parent.parent.parent
START_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 15.0


class HostStartError(RuntimeError):
    """The local host exited or did not answer in time; the message ends with its log."""


@dataclass(frozen=True)
class LocalApp:
    origin: str  # http://localhost:<port>
    key: str  # the function key
    master_key: str
    log: Path

    @property
    def callback(self) -> str:
        return f"{self.origin}/api/auth/callback"


@contextlib.contextmanager
def serve_app(
    env: Mapping[str, str], folder: Path, *, port: int | None = None, kill_at: str = ""
) -> Iterator[LocalApp]:
    """Serve function_app.py with ``env`` as app settings until the block ends. Fails with the host's log tail
    when it does not answer within START_TIMEOUT_SECONDS. ``kill_at`` ("POINT:N") makes the host die there."""
    from tests.support import secret_scan

    port = port or free_port()
    folder.mkdir(parents=True, exist_ok=True)
    settings = folder / "local.settings.json"
    settings.write_text(json.dumps({"IsEncrypted": False, "Values": dict(env)}))
    log_path = folder / f"host-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.support.app_host", "--settings", str(settings), "--port", str(port)],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TEST_KILL_AT": kill_at},
        )
    origin = f"http://localhost:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while True:
            try:
                urllib.request.urlopen(f"{origin}/admin/host/ping", timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise HostStartError(f"local host did not start: {log_path.read_text()[-2000:]}") from None
                time.sleep(0.2)
        yield LocalApp(origin, env["LOCAL_FUNCTION_KEY"], env["LOCAL_MASTER_KEY"], log_path)
    finally:
        stop_process(process, timeout=STOP_TIMEOUT_SECONDS)
        secret_scan.record_file(log_path, f"local host log {log_path.name}")


def main() -> int:
    from devstack import host

    if kill := os.environ.get("TEST_KILL_AT"):
        from tests.support import kill_at

        point, _, nth = kill.partition(":")
        kill_at.install(point, int(nth or "1"))
    level = os.environ.get("TEST_HOST_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if level == "DEBUG":
        # The host mutes the SDK to WARNING when it starts; a secrets scan wants every line the SDK writes.
        azure = logging.getLogger("azure")
        azure.setLevel(logging.DEBUG)
        azure.setLevel = lambda level: None  # type: ignore[method-assign]
    return host.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
