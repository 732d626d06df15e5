"""Exchange Online's own IMAP answers, reproduced by the proxy in front of Dovecot (tests/support/imap_proxy.py):
"User is authenticated but not connected." wherever it arrives, throttling followed by BYE, MOVE and UIDPLUS
advertised only after the login, and the placeholder Exchange serves for a message it cannot convert to MIME.
Sources are listed in docs/fidelity.md."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from shared.registry import MailboxStatus
from tests.conftest import simple_message
from tests.support.faults import check_delivery, collect, doveadm, stored_version, uids
from tests.support.imap_proxy import ImapProxy, app_env_through_proxy, proxy_fixture  # noqa: F401 (the fixtures)
from tests.support.stack import Stack

pytestmark = [pytest.mark.integration, pytest.mark.faults]

PLACEHOLDER_START = "Retrieval using the IMAP4 protocol failed for the following message:"


def placeholder(subject: str) -> bytes:
    """A message as Exchange Online serves one it cannot convert to MIME: the original's headers, and a plain text
    body that starts with the sentence every such placeholder starts with."""
    return (
        f"From: Customer <customer@example.org>\r\nTo: support@example.test\r\nSubject: {subject}\r\n"
        f"Message-ID: <{uuid.uuid4().hex}@example.org>\r\nDate: Sun, 29 Nov 2026 10:00:00 +0000\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
        f'{PLACEHOLDER_START}\r\nSubject: "{subject}"\r\nFrom: "Customer" ("customer@example.org")\r\n'
        "Sent date: 11/29/2026 10:00:00 AM\r\n\r\n"
        "The server couldn't retrieve the following message: the message hasn't been deleted; you might be able "
        "to view it using Outlook or Outlook on the web.\r\n"
    ).encode()


@pytest.mark.parametrize(
    ("command", "options"),
    [(r"^SELECT ", {}), (r"^LIST ", {"after_action": "move", "move_to": "Done"})],
    ids=["at-select", "at-list"],
)
def test_authenticated_but_not_connected_is_a_mailbox_access_error_with_the_full_access_remedy(
    stack: Stack, services: Any, proxy: ImapProxy, consent: Any, new_address: Any, deliver: Any,
    queue_messages: Any, command: str, options: dict[str, str],
) -> None:  # fmt: skip
    address = new_address()
    consent(address, **options)
    sent = [simple_message(f"{address} #{i}") for i in range(2)]
    for raw in sent:
        deliver(address, raw)
    version = stored_version(services, address)
    proxy.add("not_connected", command)

    failed = collect(services, address)

    assert failed.outcome == "mailbox_access", failed.error
    row = services.registry.get(address)
    assert (row.status, row.last_error_class, row.last_uid) == (MailboxStatus.ACTIVE, "mailbox_access", 0)
    assert "not connected" in row.last_error and "Full Access" in row.last_error
    assert "create the folder" not in row.last_error, "the folder exists: the account cannot open the mailbox"
    assert stored_version(services, address) == version, "a valid token is kept"
    assert len(uids(stack, address)) == 2

    done = collect(services, address)

    assert (done.outcome, done.messages) == ("ok", 2)
    check_delivery(services, sent, queue_messages(), case=f"Exchange: not connected ({command.strip('^ ')})")


def test_move_and_uid_expunge_are_used_though_advertised_only_after_the_login(
    stack: Stack, services: Any, proxy: ImapProxy, consent: Any, new_address: Any, deliver: Any,
    queue_messages: Any,
) -> None:  # fmt: skip
    moved, deleted = new_address(), new_address()
    consent(moved, after_action="move", move_to="Done")
    consent(deleted, after_action="delete")
    sent = [simple_message(f"{moved} #{i}") for i in range(3)]
    for raw in sent:
        deliver(moved, raw)
    doomed = simple_message(f"{deleted} #0")
    deliver(deleted, doomed)

    assert collect(services, moved).messages == 3
    assert collect(services, deleted).messages == 1

    assert "UID MOVE" in proxy.commands and "UID COPY" not in proxy.commands, proxy.commands
    assert "UID EXPUNGE" in proxy.commands and "EXPUNGE" not in proxy.commands, proxy.commands
    assert uids(stack, moved) == [] and len(uids(stack, moved, "Done")) == 3
    assert uids(stack, deleted) == []
    check_delivery(services, [*sent, doomed], queue_messages(), case="Exchange: capabilities after login")


def test_a_placeholder_is_flagged_left_in_place_and_reported_on_the_mailbox(
    stack: Stack, services: Any, proxy: ImapProxy, consent: Any, new_address: Any, deliver: Any,
    queue_messages: Any,
) -> None:  # fmt: skip
    address = new_address()
    consent(address, after_action="move", move_to="Done")
    normal = simple_message("a normal message")
    deliver(address, placeholder("figures"))
    deliver(address, normal)
    stuck = uids(stack, address)[0]

    result = collect(services, address)

    assert (result.outcome, result.messages) == ("ok", 2)
    envelopes = {e["uid"]: e for e in queue_messages()}
    assert envelopes[stuck]["classification"]["placeholder"] is True
    assert any("IMAP4" in reason for reason in envelopes[stuck]["classification"]["reasons"])
    others = [e for uid, e in envelopes.items() if uid != stuck]
    assert [e["classification"]["placeholder"] for e in others] == [False]
    assert uids(stack, address) == [stuck], "the placeholder stays in the mailbox; the normal message moved"
    assert len(uids(stack, address, "Done")) == 1
    row = services.registry.get(address)
    assert row.placeholder_uids == (stuck,)
    assert list(row.to_public()["placeholder_uids"]) == [stuck], "the admin's status lists it"

    again = collect(services, address)

    assert (again.outcome, again.messages) == ("ok", 0), "the placeholder is not collected again"
    assert services.registry.get(address).placeholder_uids == (stuck,), "it stays reported until it is dealt with"

    # The admin deals with it in Outlook: the message leaves the folder.
    doveadm(stack, "expunge", "-u", address, "mailbox", "INBOX", "uid", str(stuck))

    assert collect(services, address).outcome == "ok"
    assert services.registry.get(address).placeholder_uids == (), "no longer reported once it is gone"
