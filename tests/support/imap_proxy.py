"""A loopback IMAPS proxy in front of Dovecot that breaks connections at chosen IMAP commands.

The proxy terminates TLS with the stack's server certificate (so the collector's certificate checks pass unchanged)
and opens its own TLS connection to Dovecot; in between it sees the client's command lines and counts the server's
bytes, which is what it needs to fail at a precise point of the protocol:

- ``drop``: cut both connections when a command arrives (before Dovecot sees it), or after Dovecot has sent
  ``after_bytes`` bytes of its answer to it (0: Dovecot ran the command but the client never hears the answer);
- ``stall``: stop forwarding in both directions and hold the sockets open, as a hung server does;
- ``throttle``: answer the command as Exchange Online does when it throttles a mailbox, then close.

A fault without a command applies when a connection opens (before the greeting). Only command names are recorded
(``UID FETCH``), never arguments: AUTHENTICATE's continuation line carries the SASL string.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from tests.support.stack import Stack

THROTTLE_TEXT = "Request is throttled. Suggested Backoff Time: {ms} milliseconds"  # Exchange Online's wording
CHUNK = 64 * 1024
_LITERAL = re.compile(rb"\{(\d+)\+?\}\r\n$")
ACTIONS = ("drop", "stall", "throttle")


@dataclass
class Fault:
    action: str
    command: re.Pattern[str] | None
    after_bytes: int | None = None
    skip: int = 0  # let this many matching commands (or connections) through first
    times: int = 1  # then fire this many times
    backoff_ms: int = 2470
    fired: int = 0

    def live(self) -> bool:
        return self.fired < self.times


@dataclass(eq=False)  # compared and hashed by identity: kept in a set
class _Connection:
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    cut_after: int | None = None  # server bytes still allowed through before the cut
    stalled: bool = False
    closed: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def abort(self) -> None:
        if self.closed:
            return
        self.closed = True
        for writer in (self.client, self.server):
            writer.transport.abort()
        for task in self.tasks:
            if task is not asyncio.current_task():
                task.cancel()


class ImapProxy:
    """``with ImapProxy(dovecot_port, cert=..., key=..., ca=...) as proxy: proxy.add("drop", r"UID MOVE")``"""

    def __init__(
        self, upstream_port: int, *, cert: Path | str, key: Path | str, ca: Path | str, upstream_host: str = "localhost"
    ) -> None:
        self._upstream = (upstream_host, upstream_port)
        self._server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._server_context.load_cert_chain(str(cert), str(key))
        self._client_context = ssl.create_default_context(cafile=str(ca))
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="imap-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._release = asyncio.Event()
        self.commands: list[str] = []
        self.connections = 0
        self.port = 0

    # -- control, from the test's thread ----------------------------------------------------------------------

    def __enter__(self) -> ImapProxy:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def add(
        self,
        action: str,
        command: str | None = None,
        *,
        after_bytes: int | None = None,
        skip: int = 0,
        times: int = 1,
        backoff_ms: int = 2470,
    ) -> Fault:
        """Fail the next matching command: ``command`` is a regular expression searched (case-insensitively) in
        the command line without its tag, e.g. ``r"^UID FETCH .*BODY\\.PEEK"``; None means a new connection."""
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}")
        fault = Fault(
            action,
            re.compile(command, re.IGNORECASE) if command is not None else None,
            after_bytes=after_bytes,
            skip=skip,
            times=times,
            backoff_ms=backoff_ms,
        )
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear(self) -> None:
        """Forget pending faults and let stalled connections go (they are closed, as a recovered server would)."""
        with self._lock:
            self._faults.clear()
        self._loop.call_soon_threadsafe(self._release_stalled)

    def _release_stalled(self) -> None:
        released, self._release = self._release, asyncio.Event()
        released.set()

    def _take(self, line: str | None) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if not fault.live():
                    continue
                if (fault.command is None) != (line is None):
                    continue
                if fault.command is not None and line is not None and not fault.command.search(line):
                    continue
                if fault.skip:
                    fault.skip -= 1
                    continue
                fault.fired += 1
                return fault
        return None

    # -- the proxy, on its own event loop ------------------------------------------------------------------------

    async def _listen(self) -> asyncio.Server:
        return await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self._server_context)

    async def _close(self) -> None:
        self._release.set()
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections):
            connection.abort()

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            server_reader, server_writer = await asyncio.open_connection(
                *self._upstream, ssl=self._client_context, server_hostname=self._upstream[0]
            )
        except OSError:
            client_writer.transport.abort()
            return
        connection = _Connection(client_writer, server_writer)
        self._connections.add(connection)
        try:
            fault = self._take(None)
            if fault is not None and await self._apply(fault, connection, tag=b"*"):
                return
            connection.tasks = [
                asyncio.ensure_future(self._client_to_server(client_reader, connection)),
                asyncio.ensure_future(self._server_to_client(server_reader, connection)),
            ]
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*connection.tasks)
        finally:
            connection.abort()
            self._connections.discard(connection)

    async def _apply(self, fault: Fault, connection: _Connection, *, tag: bytes) -> bool:
        """Carry out ``fault``; True when the command must not reach the server."""
        if fault.action == "stall":
            connection.stalled = True
            await self._release.wait()  # the event of this moment: a later clear() makes a new one
            connection.abort()
            return True
        if fault.action == "throttle":
            text = THROTTLE_TEXT.format(ms=fault.backoff_ms).encode()
            connection.client.write(tag + b" BAD " + text + b"\r\n")
            with contextlib.suppress(OSError):
                await connection.client.drain()
            connection.abort()
            return True
        if fault.after_bytes is None:
            connection.abort()
            return True
        # The command goes through; the server's answer is cut after ``after_bytes`` (0: before its first byte).
        connection.cut_after = fault.after_bytes
        return False

    async def _client_to_server(self, reader: asyncio.StreamReader, connection: _Connection) -> None:
        while not connection.closed:
            line = await reader.readline()
            if not line:
                break
            literal = _LITERAL.search(line)
            tag, _, rest = line.partition(b" ")
            words = rest.decode("latin-1").strip()
            if tag and words and not connection.stalled:
                name = " ".join(words.split()[:2] if words.upper().startswith("UID ") else words.split()[:1])
                self.commands.append(name.upper())
                fault = self._take(words)
                if fault is not None and await self._apply(fault, connection, tag=tag):
                    return
            if connection.stalled:
                return  # the stall itself holds the connection (see _apply)
            connection.server.write(line)
            if literal is not None:
                connection.server.write(await reader.readexactly(int(literal.group(1))))
            await connection.server.drain()
        connection.abort()

    async def _server_to_client(self, reader: asyncio.StreamReader, connection: _Connection) -> None:
        while not connection.closed:
            data = await reader.read(CHUNK)
            if not data:
                break
            if connection.stalled:
                await self._release.wait()
                return
            if connection.cut_after is not None:
                allowed, connection.cut_after = data[: connection.cut_after], connection.cut_after - len(data)
                if allowed:
                    connection.client.write(allowed)
                    with contextlib.suppress(OSError):
                        await connection.client.drain()
                if connection.cut_after <= 0:
                    connection.abort()
                    return
                continue
            connection.client.write(data)
            await connection.client.drain()
        connection.abort()


@contextlib.contextmanager
def proxy_for(stack: Stack) -> Iterator[ImapProxy]:
    """A proxy in front of the shared stack's Dovecot."""
    with ImapProxy(
        stack.imap_port,
        cert=stack.tls_cert,
        key=stack.tls_key,
        ca=stack.ca_bundle,
    ) as proxy:
        yield proxy
