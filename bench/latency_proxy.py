"""A loopback TCP proxy that delays every byte by a fixed time in each direction, like a long cable.

Each chunk read from one side is forwarded to the other side ``delay`` seconds after it arrived; reading goes on
meanwhile, so the proxy adds latency without cutting bandwidth (a delay line, not a stop-and-wait relay). TLS
passes through untouched. It runs as its own process so that its copying does not compete with the measured
client for the GIL.

    python -m bench.latency_proxy --target 127.0.0.1:10993 --delay-ms 10 [--port 0]

prints ``listening <port>`` once ready; ``LatencyProxy`` starts and stops it from Python. With ``--report-turns``
it also prints ``turns <n>`` when a connection ends: how many times the client sent something after an answer
had reached it, i.e. the round trips it waited for (the TLS 1.3 handshake's own one included). A command sent
and closed without waiting (LOGOUT) adds none.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

CHUNK = 256 * 1024  # bytes per read: large enough that a 25 MB message is not a million tiny sleeps
ROOT = Path(__file__).resolve().parent.parent


def _no_delay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # Nagle would add its own, uneven delay


class Turns:
    """Counts the client's turns on one connection: data (or its end) from the client after the proxy has
    forwarded server data to it since the client last sent."""

    def __init__(self) -> None:
        self.count = 0
        self._answered = False

    def from_client(self) -> None:
        if self._answered:
            self.count += 1
            self._answered = False

    def to_client(self) -> None:
        self._answered = True


async def _pump(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    delay: float,
    *,
    on_read: Callable[[], None] = lambda: None,
    on_forward: Callable[[], None] = lambda: None,
) -> None:
    loop = asyncio.get_running_loop()
    line: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def forward() -> None:
        while True:
            due, data = await line.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                with contextlib.suppress(OSError):
                    if writer.can_write_eof():
                        writer.write_eof()
                return
            writer.write(data)
            on_forward()
            await writer.drain()

    sender = asyncio.create_task(forward())
    try:
        while True:
            data = await reader.read(CHUNK)
            on_read()
            line.put_nowait((loop.time() + delay, data))
            if not data:
                break
        await sender
    except (OSError, asyncio.IncompleteReadError):
        sender.cancel()


async def _serve(port: int, target_host: str, target_port: int, delay: float, *, report_turns: bool = False) -> None:
    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(target_host, target_port)
        except OSError:
            client_writer.close()
            return
        _no_delay(client_writer)
        _no_delay(upstream_writer)
        turns = Turns()
        try:
            await asyncio.gather(
                _pump(client_reader, upstream_writer, delay, on_read=turns.from_client),
                _pump(upstream_reader, client_writer, delay, on_forward=turns.to_client),
            )
            if report_turns:
                print(f"turns {turns.count}", flush=True)
        except asyncio.CancelledError:
            pass  # the proxy is stopping: connections still open are simply closed
        finally:
            for writer in (client_writer, upstream_writer):
                with contextlib.suppress(OSError):
                    writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    print(f"listening {server.sockets[0].getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, help="host:port to forward to (loopback)")
    parser.add_argument("--delay-ms", type=float, default=10.0, help="delay per direction (default 10)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default: any free one)")
    parser.add_argument("--report-turns", action="store_true", help="print the client's turns of each connection")
    args = parser.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    asyncio.run(_serve(args.port, host or "127.0.0.1", int(port), args.delay_ms / 1000, report_turns=args.report_turns))
    return 0


class LatencyProxy:
    """``with LatencyProxy(10993, delay_ms=10) as port:`` -- the proxy runs until the block ends."""

    def __init__(
        self, target_port: int, *, delay_ms: float = 10.0, target_host: str = "127.0.0.1", report_turns: bool = False
    ) -> None:
        self._target = f"{target_host}:{target_port}"
        self._delay_ms = delay_ms
        self._report_turns = report_turns
        self._process: subprocess.Popen[str] | None = None

    def __enter__(self) -> int:
        command = [sys.executable, "-m", "bench.latency_proxy", "--target", self._target]
        command += ["--delay-ms", str(self._delay_ms), *(["--report-turns"] if self._report_turns else [])]
        self._process = subprocess.Popen(
            command,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert self._process.stdout is not None
        line = self._process.stdout.readline().split()
        if len(line) != 2 or line[0] != "listening":
            self._process.kill()
            raise RuntimeError(f"latency proxy did not start (exit code {self._process.wait()})")
        return int(line[1])

    def turns(self) -> int:
        """The turns of the next connection to end (``report_turns=True``); waits for it to end."""
        assert self._process is not None and self._process.stdout is not None and self._report_turns
        line = self._process.stdout.readline().split()
        if len(line) != 2 or line[0] != "turns":
            raise RuntimeError(f"latency proxy reported {line!r} instead of a connection's turns")
        return int(line[1])

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()


if __name__ == "__main__":
    sys.exit(main())
