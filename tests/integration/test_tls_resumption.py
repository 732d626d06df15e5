"""TLS session resumption against Dovecot: a session of the same server is offered to the next connection and
resumed; a session the server does not know (another server's, as after a ticket key rotation or on another
front end) or an expired one ends in a full handshake, and the session works as before."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from collectors import imap_session
from collectors.imap_session import ImapSession, TlsSessions
from tests.conftest import simple_message
from tests.support.stack import Stack

pytestmark = pytest.mark.integration


@pytest.fixture()
def mailbox(services: Any, consent: Any, new_address: Any, deliver: Any) -> tuple[str, str, bytes]:
    address = new_address()
    consent(address)
    raw = simple_message("resumed", "body " * 50)
    deliver(address, raw)
    return address, services.tokens.access_token(address, signed_in_as=address).token, raw


def _session(stack: Stack, address: str, token: str, sessions: TlsSessions) -> ImapSession:
    return ImapSession(
        stack.imap_host,
        stack.imap_port,
        address=address,
        access_token=token,
        ca_bundle=stack.ca_bundle,
        tls_sessions=sessions,
    )


def _collect(imap: ImapSession) -> list[bytes]:
    imap.select("INBOX", sizes_after=0)
    uids = list(imap.new_sizes(0))
    return [raw for _, messages in imap.fetch_batches([uids]) for raw in messages.values()]


def _offered(stack: Stack, sessions: TlsSessions) -> ssl.SSLSession | None:
    context = imap_session._tls_context(stack.ca_bundle)
    return sessions.get(stack.imap_host, stack.imap_port, context)


@pytest.fixture()
def other_server(stack: Stack) -> Iterator[int]:
    """A TLS 1.3 server with Dovecot's certificate but its own ticket key: its sessions mean nothing to Dovecot."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(stack.tls_cert, stack.tls_key)
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            try:
                with context.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"* OK other server\r\n")  # the client reads the ticket before this line
                    tls.recv(1)
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        listener.close()
        thread.join(timeout=5)


def test_the_next_connection_resumes_the_session_of_the_last(stack: Stack, mailbox: tuple[str, str, bytes]) -> None:
    address, token, raw = mailbox
    sessions = TlsSessions()
    with _session(stack, address, token, sessions) as first:
        assert not first.tls_resumed, "nothing to resume yet"
        assert _collect(first) == [raw]
    assert _offered(stack, sessions) is not None, "Dovecot's session ticket was not kept"
    with _session(stack, address, token, sessions) as second:
        assert second.tls_resumed, "the kept session was not resumed"
        assert _collect(second) == [raw]


def test_a_session_the_server_does_not_know_ends_in_a_full_handshake(
    stack: Stack, mailbox: tuple[str, str, bytes], other_server: int
) -> None:
    address, token, raw = mailbox
    context = imap_session._tls_context(stack.ca_bundle)
    with (
        socket.create_connection(("127.0.0.1", other_server)) as raw_socket,
        context.wrap_socket(raw_socket, server_hostname=stack.imap_host) as foreign,
    ):
        assert foreign.recv(100).startswith(b"* OK")
        sessions = TlsSessions()
        sessions.keep(stack.imap_host, stack.imap_port, context, foreign)  # as if Dovecot had issued it
    stale = _offered(stack, sessions)
    assert stale is not None and stale.has_ticket

    with _session(stack, address, token, sessions) as imap:
        assert not imap.tls_resumed, "Dovecot resumed a session it never issued"
        assert _collect(imap) == [raw]
    fresh = _offered(stack, sessions)
    assert fresh is not None and fresh.id != stale.id, "the refused session was not replaced by Dovecot's own"
    with _session(stack, address, token, sessions) as again:
        assert again.tls_resumed


def test_an_expired_session_is_not_offered(stack: Stack, mailbox: tuple[str, str, bytes]) -> None:
    address, token, raw = mailbox
    now = [time.time()]
    sessions = TlsSessions(clock=lambda: now[0])
    with _session(stack, address, token, sessions):
        pass
    kept = _offered(stack, sessions)
    assert kept is not None
    now[0] = kept.time + kept.ticket_lifetime_hint - 1
    assert _offered(stack, sessions) is kept, "a session still valid was dropped"
    now[0] = kept.time + kept.ticket_lifetime_hint
    assert _offered(stack, sessions) is None
    with _session(stack, address, token, sessions) as imap:
        assert not imap.tls_resumed
        assert _collect(imap) == [raw]
