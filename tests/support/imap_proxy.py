"""A loopback IMAPS proxy in front of Dovecot that breaks connections at chosen IMAP commands.

The proxy terminates TLS with the stack's server certificate (so the collector's certificate checks pass unchanged)
and opens its own TLS connection to Dovecot; in between it sees the client's command lines and counts the server's
bytes, which is what it needs to fail at a precise point of the protocol:

- ``drop``: cut both connections when a command arrives (before Dovecot sees it), or after Dovecot has sent
  ``after_bytes`` bytes of its answer to it (0: Dovecot ran the command but the client never hears the answer);
- ``stall``: stop forwarding in both directions and hold the sockets open, as a hung server does;
- ``throttle``: answer the command as Exchange Online does when it throttles a mailbox (``BAD Request is
  throttled. Suggested Backoff Time: N milliseconds``, then ``* BYE``), then close;
- ``not_connected``: answer as Exchange Online does after it accepted a token whose account cannot open the mailbox
  named in ``user=``: ``BAD User is authenticated but not connected.`` to this command and every later one, with
  ``* BYE`` after the second (public transcripts: MailKit #1494, email-oauth2-proxy #74).

A fault without a command applies when a connection opens (before the greeting). Only command names are recorded
(``UID FETCH``), never arguments: AUTHENTICATE's continuation line carries the SASL string.

Before the login the proxy also speaks as Exchange Online does, whatever the fault: its own greeting, MOVE and
UIDPLUS left out of the capabilities, and no capability list in the AUTHENTICATE answer, so that a client learns
of MOVE only by asking after the login (MailKit #1494 shows the two lists).
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

import pytest

from tests.support.stack import Stack

THROTTLE_TEXT = "Request is throttled. Suggested Backoff Time: {ms} milliseconds"  # Exchange Online's wording
NOT_CONNECTED_TEXT = "User is authenticated but not connected."
BYE_TEXT = "Connection closed. 14"
GREETING = b"* OK The Microsoft Exchange IMAP4 service is ready.\r\n"
AFTER_LOGIN_ONLY = (b"MOVE", b"UIDPLUS")  # capabilities Exchange Online lists only once the client is logged in
CHUNK = 64 * 1024
_LITERAL = re.compile(rb"\{(\d+)\+?\}\r\n$")
ACTIONS = ("drop", "stall", "throttle", "not_connected")


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
    login_tag: bytes = b""  # the tag of the AUTHENTICATE in progress
    logged_in: bool = False
    refused: int = 0  # commands answered "not connected" so far
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
            connection.client.write(tag + b" BAD " + text + b"\r\n* BYE " + BYE_TEXT.encode() + b"\r\n")
            await self._hang_up(connection)
            return True
        if fault.action == "not_connected":
            await self._not_connected(connection, tag)
            return True
        if fault.after_bytes is None:
            connection.abort()
            return True
        # The command goes through; the server's answer is cut after ``after_bytes`` (0: before its first byte).
        connection.cut_after = fault.after_bytes
        return False

    async def _not_connected(self, connection: _Connection, tag: bytes) -> None:
        """Exchange's answer to a session whose account cannot open the mailbox: BAD to every command, and BYE
        after the second."""
        connection.refused += 1
        answer = tag + b" BAD " + NOT_CONNECTED_TEXT.encode() + b"\r\n"
        if connection.refused >= 2:
            answer += b"* BYE " + BYE_TEXT.encode() + b"\r\n"
        connection.client.write(answer)
        if connection.refused >= 2:
            await self._hang_up(connection)
        else:
            with contextlib.suppress(OSError):
                await connection.client.drain()

    @staticmethod
    async def _hang_up(connection: _Connection) -> None:
        """Close after what was written has reached the client, as a server does after its BYE (an abort would
        discard the answer still in the TLS buffer)."""
        with contextlib.suppress(OSError):
            await connection.client.drain()
        connection.client.close()
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            await asyncio.wait_for(connection.client.wait_closed(), 5)
        connection.abort()

    async def _client_to_server(self, reader: asyncio.StreamReader, connection: _Connection) -> None:
        while not connection.closed:
            line = await reader.readline()
            if not line:
                break
            literal = _LITERAL.search(line)
            tag, _, rest = line.partition(b" ")
            words = rest.decode("latin-1").strip()
            if connection.refused and tag and words:
                await self._not_connected(connection, tag)  # the session stays refused until the server closes it
                continue
            if tag and words.upper().startswith("AUTHENTICATE "):
                connection.login_tag = tag
            if tag and words and not connection.stalled:
                name = " ".join(words.split()[:2] if words.upper().startswith("UID ") else words.split()[:1])
                self.commands.append(name.upper())
                fault = self._take(words)
                if fault is not None and await self._apply(fault, connection, tag=tag):
                    if connection.refused and not connection.closed:
                        continue  # Exchange keeps answering the refused session's commands until its BYE
                    return
            if connection.stalled:
                return  # the stall itself holds the connection (see _apply)
            connection.server.write(line)
            if literal is not None:
                connection.server.write(await reader.readexactly(int(literal.group(1))))
            await connection.server.drain()
        connection.abort()

    @staticmethod
    def _as_exchange(line: bytes, connection: _Connection) -> bytes:
        """A server line before the login, as Exchange Online words it (see the module's docstring)."""
        if line.startswith(b"* OK") and b"Dovecot" in line:
            return GREETING
        if line.upper().startswith(b"* CAPABILITY ") and connection.login_tag:
            return b""  # Dovecot lists its capabilities again while logging in; Exchange does not
        if line.upper().startswith(b"* CAPABILITY "):
            words = line.rstrip(b"\r\n").split(b" ")
            return b" ".join(w for w in words if w.upper() not in AFTER_LOGIN_ONLY) + b"\r\n"
        if connection.login_tag and line.startswith(connection.login_tag + b" OK"):
            connection.logged_in = True
            return connection.login_tag + b" OK AUTHENTICATE completed.\r\n"
        return line

    async def _server_to_client(self, reader: asyncio.StreamReader, connection: _Connection) -> None:
        while not connection.closed and not connection.logged_in and connection.cut_after is None:
            line = await reader.readline()
            if not line:
                connection.abort()
                return
            if connection.stalled:
                await self._release.wait()
                return
            connection.client.write(self._as_exchange(line, connection))
            await connection.client.drain()
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


# Fixtures for a test module whose collector reaches Dovecot through the proxy: import both into the module.


@pytest.fixture(name="proxy")
def proxy_fixture(stack: Stack) -> Iterator[ImapProxy]:
    """A proxy of the test's own in front of the shared stack's Dovecot."""
    with proxy_for(stack) as proxy:
        yield proxy


@pytest.fixture(name="app_env")
def app_env_through_proxy(app_env: dict[str, str], proxy: ImapProxy) -> dict[str, str]:
    """The app's settings with IMAP through the proxy: the collector reaches Dovecot only through it."""
    return {**app_env, "IMAP_PORT": str(proxy.port)}
