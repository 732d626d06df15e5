"""The whole path against the real parts: mail delivered to Dovecot, collected over IMAP with XOAUTH2, stored and
queued, then turned into a GLPI ticket and a follow-up by the consumer, both through its command line and through
the function app's queue trigger in the local Functions host.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from consumers.glpi.__main__ import run
from shared import azure_clients
from tests.support.app_host import serve_app
from tests.support.glpi import glpi_state, tickets_with
from tests.support.stack import Stack

pytestmark = pytest.mark.integration


def _mail(subject: str, body: str, *, headers: str = "") -> bytes:
    return (
        f"From: Dana <dana@example.org>\r\nTo: support@example.test\r\nSubject: {subject}\r\n"
        f"Message-ID: <{uuid.uuid4().hex}@example.org>\r\nDate: Sun, 29 Nov 2026 10:00:00 +0000\r\n{headers}"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        f"{body}\r\n"
    ).encode()


def _collect(services: Any, address: str) -> None:
    result = services.collector.collect_mailbox(services.registry.get(address), deadline=time.monotonic() + 120)
    assert result.outcome == "ok", result


def test_dovecot_to_collector_to_queue_to_a_ticket_and_a_followup(
    stack: Stack, services: Any, settings: Any, consent: Any, new_address: Any, deliver: Any
) -> None:
    word = uuid.uuid4().hex[:10]
    address = new_address()
    consent(address)
    deliver(address, _mail(f"Screen flickers {word}", "Since this morning the screen flickers."))
    _collect(services, address)
    assert run(settings, retry_visibility=0) == {"ticket": 1}
    (ticket,) = tickets_with(stack, word)
    assert ticket["name"] == f"Screen flickers {word}"
    assert "Since this morning the screen flickers." in ticket["content"]

    deliver(address, _mail(f"Re: [GLPI #{ticket['id']:07d}] Screen flickers {word}", "It stopped after a restart."))
    deliver(address, _mail(f"Screen flickers {word}", "Since this morning the screen flickers."))  # resent: new ticket
    _collect(services, address)
    assert run(settings, retry_visibility=0) == {"followup": 1, "ticket": 1}
    first = next(t for t in glpi_state(stack)["tickets"] if t["id"] == ticket["id"])
    assert [f["content"].split("<p>Mail reference")[0] for f in first["followups"]] == [
        "<p>It stopped after a restart.</p>"
    ]
    assert len(tickets_with(stack, word)) == 2  # a resent message is a new message (new Message-ID)


def test_the_function_app_makes_tickets_from_the_queue_when_enabled(
    stack: Stack, services: Any, app_env: dict[str, str], consent: Any, new_address: Any, deliver: Any,
    tmp_path: Path,
) -> None:  # fmt: skip
    word = uuid.uuid4().hex[:10]
    address = new_address()
    consent(address)
    deliver(address, _mail(f"Keyboard {word}", "The keyboard is missing keys."))
    _collect(services, address)
    env = {**app_env, "AzureWebJobs.glpi_tickets.Disabled": "false"}
    with serve_app(env, tmp_path / "host") as app:
        deadline = time.monotonic() + 60
        while not tickets_with(stack, word) and time.monotonic() < deadline:
            time.sleep(0.5)
        found = tickets_with(stack, word)
        assert len(found) == 1, app.log.read_text()[-3000:]
        queue = azure_clients.queue(services.settings, services.settings.mail_queue)
        while list(queue.peek_messages()) and time.monotonic() < deadline:  # deleted once the function returned
            time.sleep(0.2)
        assert list(queue.peek_messages()) == []
    assert "The keyboard is missing keys." in found[0]["content"]
    assert "glpi message done" in app.log.read_text()


def test_the_function_stays_off_by_default_and_leaves_the_queue_alone(
    stack: Stack, services: Any, app_env: dict[str, str], tmp_path: Path
) -> None:
    from tests.support.glpi import post_mail

    word = uuid.uuid4().hex[:10]
    post_mail(services.settings, _mail(f"Left alone {word}", "x"), mailbox="s@x.test", uid=1)
    assert app_env["AzureWebJobs.glpi_tickets.Disabled"] == "true"
    with serve_app(app_env, tmp_path / "host") as app:
        time.sleep(3)  # long enough for a queue trigger to have polled several times
    assert "function disabled by setting function=glpi_tickets" in app.log.read_text()
    assert tickets_with(stack, word) == []
    assert len(list(azure_clients.queue(services.settings, services.settings.mail_queue).peek_messages())) == 1


def test_under_the_host_a_failed_message_is_hidden_for_its_retry_delay_not_the_hosts(
    stack: Stack, services: Any, app_env: dict[str, str], tmp_path: Path
) -> None:
    from tests.support.glpi import glpi_control, post_mail

    word = uuid.uuid4().hex[:10]
    post_mail(services.settings, _mail(f"Later {word}", "x"), mailbox="s@x.test", uid=1)
    queue = azure_clients.queue(services.settings, services.settings.mail_queue)
    env = {**app_env, "AzureWebJobs.glpi_tickets.Disabled": "false"}
    glpi_control(stack, "faults", {"status": 503, "count": -1, "path": "/apirest.php/"})
    try:
        with serve_app(env, tmp_path / "host") as app:
            deadline = time.monotonic() + 60
            while "outcome=failed" not in app.log.read_text() and time.monotonic() < deadline:
                time.sleep(0.3)
            time.sleep(1)
            log = app.log.read_text()
            assert list(queue.peek_messages()) == []  # hidden, and not handed out again while the host runs
    finally:
        glpi_control(stack, "faults", method="DELETE")
    # The function hid it for the first delay (60 s); the host's own release (host.json's 30 s) found the pop
    # receipt changed and left it so, as the queue extension does.
    assert "glpi message deferred" in log and "attempt=1 seconds=60" in log, log[-3000:]
    assert "status=retry-set-by-function" in log, log[-3000:]
    assert tickets_with(stack, word) == []
