"""A private Azurite for tests that stop and restart storage (the shared stack's Azurite serves other tests).

Ports are chosen once and kept across restarts, and the data folder too, so a restarted instance serves the same
account with the same blobs, queues and tables, as a storage outage that ends does.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

REPO = Path(__file__).resolve().parent.parent.parent
AZURITE = REPO / "devstack" / "node_modules" / ".bin" / "azurite"
# Azurite's published development account and key: well-known constants, not secrets.
ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
START_TIMEOUT = 30.0  # seconds
STOP_TIMEOUT = 10.0  # seconds before a graceful stop becomes a kill


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class Azurite:
    """``with Azurite(folder) as azurite: ... azurite.stop() ... azurite.start()``"""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ports = {"blob": free_port(), "queue": free_port(), "table": free_port()}
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def connection_string(self) -> str:
        endpoints = "".join(
            f"{kind.capitalize()}Endpoint=http://127.0.0.1:{port}/{ACCOUNT};" for kind, port in self.ports.items()
        )
        return f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};{endpoints}"

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
        deadline = time.monotonic() + START_TIMEOUT
        while not all(map(_listening, self.ports.values())):
            if self._process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"azurite did not start; see {self.folder / 'azurite.log'}")
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop it as an outage would: gracefully (its data stays on disk), killed if it does not go."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        deadline = time.monotonic() + STOP_TIMEOUT
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
