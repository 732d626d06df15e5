"""A private Azurite for tests that stop and restart storage (the shared stack's Azurite serves other tests).

Ports are chosen once and kept across restarts, and the data folder too, so a restarted instance serves the same
account with the same blobs, queues and tables, as a storage outage that ends does.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from types import TracebackType

from devstack.stack import AZURITE_ACCOUNT, AZURITE_KEY, azurite_connection_string
from tests.support.net import free_port, port_open, wait_until
from tests.support.processes import STOP_TIMEOUT_SECONDS, stop_process

REPO = Path(__file__).resolve().parent.parent.parent
AZURITE = REPO / "devstack" / "node_modules" / ".bin" / "azurite"
# The development account and its published key (well-known constants, not secrets), for tests that need them.
ACCOUNT, ACCOUNT_KEY = AZURITE_ACCOUNT, AZURITE_KEY
START_TIMEOUT = 30.0  # seconds


def _listening(port: int) -> bool:
    return port_open(port, timeout=0.5)


class Azurite:
    """``with Azurite(folder) as azurite: ... azurite.stop() ... azurite.start()``"""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ports = {"blob": free_port(), "queue": free_port(), "table": free_port()}
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def connection_string(self) -> str:
        return azurite_connection_string(self.ports["blob"], self.ports["queue"], self.ports["table"])

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        assert AZURITE.exists(), f"{AZURITE} is missing: run scripts/setup.sh"
        log = (self.folder / "azurite.log").open("ab")
        command = [
            str(AZURITE), "--silent", "--location", str(self.folder / "data"),
            "--blobHost", "127.0.0.1", "--blobPort", str(self.ports["blob"]),
            "--queueHost", "127.0.0.1", "--queuePort", str(self.ports["queue"]),
            "--tableHost", "127.0.0.1", "--tablePort", str(self.ports["table"]),
            "--skipApiVersionCheck", "--disableTelemetry", "--loose",
        ]  # fmt: skip
        self._process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
        wait_until(
            lambda: all(map(_listening, self.ports.values())),
            START_TIMEOUT,
            "azurite",
            process=self._process,
            log=self.folder / "azurite.log",
        )

    def stop(self) -> None:
        """Stop it as an outage would: gracefully (its data stays on disk), killed if it does not go."""
        process, self._process = self._process, None
        if process is None:
            return
        stop_process(process, group=True)
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        while any(map(_listening, self.ports.values())) and time.monotonic() < deadline:
            time.sleep(0.1)

    def __enter__(self) -> Azurite:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()
