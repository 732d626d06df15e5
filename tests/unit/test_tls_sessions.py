"""Which TLS sessions are kept and offered again; the handshakes themselves are tested against Dovecot
(tests/integration/test_tls_resumption.py)."""

from __future__ import annotations

import ssl
from types import SimpleNamespace
from typing import Any

from collectors.imap_session import TlsSessions

CONTEXT = ssl.create_default_context()
OTHER_CONTEXT = ssl.create_default_context()


def connection(*, has_ticket: bool = True, issued: float = 1000.0, lifetime: int = 7200) -> Any:
    """A stand-in for an ``ssl.SSLSocket`` after its handshake: only its ``session`` is read."""
    return SimpleNamespace(session=SimpleNamespace(has_ticket=has_ticket, time=issued, ticket_lifetime_hint=lifetime))


def test_a_session_with_a_ticket_is_offered_to_the_same_server_only() -> None:
    sessions = TlsSessions(clock=lambda: 1001.0)
    sock = connection()
    sessions.keep("Outlook.Office365.com", 993, CONTEXT, sock)
    assert sessions.get("outlook.office365.com", 993, CONTEXT) is sock.session
    assert sessions.get("outlook.office365.com", 143, CONTEXT) is None
    assert sessions.get("imap.example", 993, CONTEXT) is None
    assert sessions.get("outlook.office365.com", 993, OTHER_CONTEXT) is None, "a session belongs to its context"


def test_a_session_without_a_ticket_or_lifetime_is_not_kept() -> None:
    sessions = TlsSessions(clock=lambda: 1001.0)
    sessions.keep("imap.example", 993, CONTEXT, connection(has_ticket=False))
    sessions.keep("imap.example", 994, CONTEXT, connection(lifetime=0))
    sessions.keep("imap.example", 995, CONTEXT, SimpleNamespace(session=None))  # type: ignore[arg-type]
    assert all(sessions.get("imap.example", port, CONTEXT) is None for port in (993, 994, 995))


def test_an_expired_session_is_dropped_and_a_newer_one_replaces_the_old() -> None:
    now = [1001.0]
    sessions = TlsSessions(clock=lambda: now[0])
    old, new = connection(issued=1000.0, lifetime=100), connection(issued=1050.0, lifetime=100)
    sessions.keep("imap.example", 993, CONTEXT, old)
    now[0] = 1099.0
    assert sessions.get("imap.example", 993, CONTEXT) is old.session
    now[0] = 1100.0
    assert sessions.get("imap.example", 993, CONTEXT) is None
    sessions.keep("imap.example", 993, CONTEXT, old)
    sessions.keep("imap.example", 993, CONTEXT, new)
    assert sessions.get("imap.example", 993, CONTEXT) is new.session
