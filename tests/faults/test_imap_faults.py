"""IMAP faults between the collector and the server, through a loopback proxy in front of Dovecot: connections cut
in the middle of a FETCH, after the login and during a MOVE, a server that stops answering, Exchange's throttling
answer, a login refused for a valid token, a missing folder, a new UIDVALIDITY, and mail expunged by someone else
between SEARCH and FETCH. Each case checks that nothing is lost and what the registry says about the mailbox.
"""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import collectors.imap_session as imap_session
from collectors.collect import blob_name
from collectors.consent import ConsentProblem
from devstack import dovecot
from shared import azure_clients
from shared.registry import MailboxStatus, utcnow
from tests.conftest import large_message, simple_message
from tests.support.faults import check_delivery, collect, doveadm, stored_version, uids
from tests.support.imap_proxy import ImapProxy, app_env_through_proxy, proxy_fixture  # noqa: F401 (the fixtures)
from tests.support.stack import Stack

pytestmark = [pytest.mark.integration, pytest.mark.faults]

BODY_FETCH = r"^UID FETCH .*BODY\.PEEK\[\]"


def mailbox_with_mail(consent: Any, deliver: Any, address: str, count: int, **options: str) -> list[bytes]:
    consent(address, **options)
    sent = [simple_message(f"{address} #{i}", f"body {i} " + "x" * (i % 7 * 400)) for i in range(count)]
    for raw in sent:
        deliver(address, raw)
    return sent


def flags(stack: Stack, address: str, folder: str = "INBOX") -> dict[int, set[str]]:
    return dovecot.list_flags(Path(stack.dovecot_config), address, folder)


def test_a_connection_cut_in_the_middle_of_a_fetch_batch_loses_nothing(
    stack: Stack, services: Any, proxy: ImapProxy, consent: Any, new_address: Any, deliver: Any,
    queue_messages: Any,
) -> None:  # fmt: skip
    address = new_address()
    consent(address)
    sent = [simple_message(f"{address} #{i:03d}", "x" * 1000) for i in range(120)]  # all of one size
    for raw in sent:
        deliver(address, raw)
    version = stored_version(services, address)
    # FETCH answers follow each other on the wire (the next batch is requested early): counting from the first
    # one, a batch and a half of bytes ends in the middle of the second batch's answer.
    batch_answer = 50 * (len(sent[0]) + len(b"* 50 FETCH (UID 50 BODY[] {1234}\r\n)\r\n"))
    cut = proxy.add("drop", BODY_FETCH, after_bytes=batch_answer * 3 // 2)

    failed = collect(services, address)

    assert cut.fired == 1
    assert failed.outcome == "transient" and "connection" in failed.error and "was lost" in failed.error
    row = services.registry.get(address)
    assert (row.status, row.last_error_class, row.last_uid) == (MailboxStatus.ACTIVE, "transient", 0)
    assert "next run" in row.last_error
    before = flags(stack, address)
    assert len(before) == len(sent), "the messages must still be listed in the folder"
    assert not any("\\Seen" in f for f in before.values()), "no after-action before the checkpoint"
    assert stored_version(services, address) == version

    done = collect(services, address)

    assert (done.outcome, done.messages) == ("ok", 120)
    after = flags(stack, address)
    assert len(after) == len(sent)
    assert all("\\Seen" in f for f in after.values())
    check_delivery(services, sent, queue_messages(), case="IMAP: connection cut in the middle of a FETCH batch")


def test_a_connection_dropped_right_after_the_login_moves_nothing(
    stack: Stack, services: Any, proxy: ImapProxy, consent: Any, new_address: Any, deliver: Any,
    queue_messages: Any,
) -> None:  # fmt: skip
    address = new_address()
    sent = mailbox_with_mail(consent, deliver, address, 5, after_action="move", move_to="Collected")
    version = stored_version(services, address)
    proxy.add("drop", r"^SELECT ")

    failed = collect(services, address)

    assert failed.outcome == "transient" and "was lost" in failed.error
    assert "AUTHENTICATE" in proxy.commands, "the cut came after a successful login"
    assert len(uids(stack, address)) == 5 and services.registry.get(address).last_uid == 0
    assert queue_messages() == []
    assert stored_version(services, address) == version

    done = collect(services, address)

    assert (done.outcome, done.messages) == ("ok", 5)
    assert uids(stack, address) == [] and len(uids(stack, address, "Collected")) == 5
    check_delivery(services, sent, queue_messages(), case="IMAP: connection dropped right after LOGIN")


@pytest.mark.parametrize(
    ("after_bytes", "moved_by_server"),
    [(None, False), (0, True)],
    ids=["before-the-server-moves", "after-the-server-moved"],
)
def test_a_connection_dropped_during_move_loses_nothing_and_moves_each_message_once(
    stack: Stack, services: Any, proxy: ImapProxy, consent: Any, new_address: Any, deliver: Any,
    queue_messages: Any, after_bytes: int | None, moved_by_server: bool,
) -> None:  # fmt: skip
    address = new_address()
    sent = mailbox_with_mail(consent, deliver, address, 60, after_action="move", move_to="Collected")
    proxy.add("drop", r"^UID MOVE ", after_bytes=after_bytes)

    failed = collect(services, address)

    assert failed.outcome == "transient"
    assert services.registry.get(address).last_uid == 0, "the checkpoint moved without a confirmed after-action"
    assert len(uids(stack, address, "Collected")) == (50 if moved_by_server else 0)

    done = collect(services, address)

    assert done.outcome == "ok"
    assert uids(stack, address) == []
    assert len(uids(stack, address, "Collected")) == 60, "a message was lost or copied twice by the move"
    tally = check_delivery(
        services, sent, queue_messages(), case=f"IMAP: connection dropped during MOVE ({after_bytes=})"
    )
    assert tally.duplicates == (0 if moved_by_server else 50)


@pytest.mark.parametrize("where", [None, BODY_FETCH], ids=["at-the-greeting", "in-a-fetch"])
def test_a_server_that_stops_answering_is_left_within_the_timeouts(
    stack: Stack, services: Any, proxy: ImapProxy, consent: Any, new_address: Any, deliver: Any,
    queue_messages: Any, monkeypatch: pytest.MonkeyPatch, where: str | None,
) -> None:  # fmt: skip
    monkeypatch.setattr(imap_session, "CONNECT_TIMEOUT", 2.0)
    monkeypatch.setattr(imap_session, "READ_TIMEOUT", 2.0)
    address = new_address()
    sent = mailbox_with_mail(consent, deliver, address, 3)
    proxy.add("stall", where)

    started = time.monotonic()
    failed = collect(services, address)
    elapsed = time.monotonic() - started

    assert failed.outcome == "transient"
    assert "timed out" in failed.error or "timeout" in failed.error, failed.error
    # One timeout for the stalled command, one more for the courtesy LOGOUT; nothing waits longer.
    assert elapsed < 10, f"the run took {elapsed:.1f} s against a stalled server"
    assert services.registry.get(address).last_uid == 0

    proxy.clear()
    done = collect(services, address)

    assert (done.outcome, done.messages) == ("ok", 3)
    check_delivery(
        services,
        sent,
        queue_messages(),
        case=f"IMAP: server stops answering ({'greeting' if where is None else 'FETCH'})",
    )


@pytest.mark.parametrize("command", [r"^AUTHENTICATE ", r"^SELECT "], ids=["at-login", "at-select"])
def test_throttling_defers_the_mailbox_for_the_suggested_backoff_and_the_others_go_on(
    stack: Stack, services: Any, proxy: ImapProxy, consent: Any, new_address: Any, deliver: Any,
    queue_messages: Any, command: str,
) -> None:  # fmt: skip
    throttled, other = new_address(), new_address()
    sent = mailbox_with_mail(consent, deliver, throttled, 2) + mailbox_with_mail(consent, deliver, other, 2)
    proxy.add("throttle", command, backoff_ms=2470)

    before = utcnow()
    failed = collect(services, throttled)

    assert failed.outcome == "transient" and "throttling" in failed.error and "2.5 s" in failed.error
    row = services.registry.get(throttled)
    assert row.last_error_class == "transient" and row.status == MailboxStatus.ACTIVE
    assert row.retry_after is not None
    assert before + timedelta(seconds=2) <= row.retry_after <= utcnow() + timedelta(seconds=3)

    skipped = {r.address: r for r in services.collector.run()}

    assert list(skipped) == [other] and skipped[other].messages == 2, "the throttled mailbox was not skipped"

    time.sleep(max(0.0, (row.retry_after - utcnow()).total_seconds()) + 0.2)
    later = {r.address: r for r in services.collector.run()}

    assert later[throttled].outcome == "ok" and later[throttled].messages == 2
    check_delivery(services, sent, queue_messages(), case=f"IMAP: throttled ({command.strip('^ ')})")


def test_a_login_refused_for_a_valid_token_is_explained_and_the_others_go_on(
    stack: Stack, services: Any, consent: Any, new_address: Any, deliver: Any, queue_messages: Any
) -> None:
    shared_box, delegate, other = new_address(), new_address(), new_address()
    # The delegate authorizes the shared mailbox with Full Access, which is then taken away: the token is still
    # valid, but the server no longer lets that account open the mailbox.
    config = Path(stack.dovecot_config)
    dovecot.grant_full_access(config, delegate, shared_box)
    consent(shared_box, delegate=delegate)
    dovecot.revoke_full_access(config, delegate, shared_box)
    deliver(shared_box, simple_message("for the shared mailbox"))
    sent = mailbox_with_mail(consent, deliver, other, 2)
    version = stored_version(services, shared_box)

    results = {r.address: r for r in services.collector.run()}

    assert results[other].messages == 2
    refused = results[shared_box]
    assert refused.outcome == "mailbox_access"
    row = services.registry.get(shared_box)
    assert row.status == MailboxStatus.ACTIVE and row.last_error_class == "mailbox_access"
    assert delegate in row.last_error and shared_box in row.last_error
    assert "Full Access" in row.last_error and "Add-MailboxPermission" in row.last_error
    assert stored_version(services, shared_box) == version, "a refused login must not touch the stored token"
    check_delivery(services, sent, queue_messages(), case="IMAP: login refused for a valid token (other mailbox)")


def test_a_missing_folder_is_a_mailbox_access_error_with_its_remedy(
    stack: Stack, services: Any, consent: Any, new_address: Any, deliver: Any, queue_messages: Any
) -> None:
    address = new_address()
    config = Path(stack.dovecot_config)
    # At consent the folder must open, or nothing is stored.
    with pytest.raises(ConsentProblem, match="Folder cannot be opened"):
        consent(address, folder="Nope")
    assert services.registry.find(address) is None and stored_version(services, address) is None
    # Later it goes away.
    dovecot.create_folder(config, address, "Nope")
    consent(address, folder="Nope")
    version = stored_version(services, address)
    doveadm(stack, "mailbox", "delete", "-u", address, "Nope")

    failed = collect(services, address)

    assert failed.outcome == "mailbox_access"
    row = services.registry.get(address)
    assert row.last_error_class == "mailbox_access" and row.status == MailboxStatus.ACTIVE
    assert "'Nope'" in row.last_error and "create the folder or change the mailbox's folder option" in row.last_error
    assert stored_version(services, address) == version

    dovecot.create_folder(config, address, "Nope")
    raw = simple_message("in the new folder")
    deliver(address, raw, "Nope")

    assert collect(services, address).messages == 1
    check_delivery(services, [raw], queue_messages(), case="IMAP: folder missing, then created")


def test_a_new_uidvalidity_collects_the_folder_again_under_new_ids(
    stack: Stack, services: Any, consent: Any, new_address: Any, deliver: Any, queue_messages: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    address = new_address()
    first = mailbox_with_mail(consent, deliver, address, 3)
    assert collect(services, address).messages == 3
    old = services.registry.get(address).uidvalidity
    doveadm(stack, "mailbox", "update", "-u", address, "--uid-validity", str(old + 1000), "INBOX")
    later = [simple_message(f"after the change #{i}") for i in range(2)]
    for raw in later:
        deliver(address, raw)

    result = collect(services, address)

    assert (result.outcome, result.messages) == ("ok", 5)
    assert services.registry.get(address).uidvalidity == old + 1000
    assert f"uidvalidity changed mailbox={address}" in caplog.text
    tally = check_delivery(services, first + later, queue_messages(), case="IMAP: UIDVALIDITY changed", new_ids=True)
    assert tally.new_ids == 3


@pytest.mark.parametrize("step", ["new_sizes"], ids=["after-size-fetch"])
def test_a_message_expunged_between_search_and_fetch_is_skipped_and_the_rest_collected(
    stack: Stack, services: Any, consent: Any, new_address: Any, deliver: Any, queue_messages: Any,
    monkeypatch: pytest.MonkeyPatch, step: str,
) -> None:  # fmt: skip
    address = new_address()
    sent = mailbox_with_mail(consent, deliver, address, 4)
    gone = uids(stack, address)[1]
    real_step = getattr(imap_session.ImapSession, step)

    def then_someone_else_expunges(self: Any, *args: Any) -> Any:
        answer = real_step(self, *args)
        assert gone in answer
        doveadm(stack, "expunge", "-u", address, "mailbox", "INBOX", "uid", str(gone))
        return answer

    monkeypatch.setattr(imap_session.ImapSession, step, then_someone_else_expunges)

    result = collect(services, address)

    assert (result.outcome, result.messages) == ("ok", 3)
    assert services.registry.get(address).last_uid == max(uids(stack, address))
    envelopes = queue_messages()
    assert gone not in {e["uid"] for e in envelopes}
    check_delivery(services, [sent[0], *sent[2:]], envelopes, case=f"IMAP: message expunged {step=}")


def test_a_connection_cut_in_the_middle_of_a_streamed_message_loses_and_repeats_nothing(
    stack: Stack, services: Any, proxy: ImapProxy, consent: Any, new_address: Any, deliver: Any,
    queue_messages: Any,
) -> None:  # fmt: skip
    address = new_address()
    consent(address)
    small = [simple_message(f"{address} #{i}", f"body {i}") for i in range(5)]
    large = large_message(f"{address} large", 12 * 1024 * 1024)
    sent = [*small[:3], large, *small[3:]]
    for raw in sent:
        deliver(address, raw)
    # The second body FETCH is the large message's alone (it waits until the first batch is read): cut it when
    # 5 MB of its 12 have come, a block staged and the next one being filled.
    cut = proxy.add("drop", BODY_FETCH, skip=1, after_bytes=5 * 1024 * 1024)

    failed = collect(services, address)

    assert cut.fired == 1
    assert failed.outcome == "transient" and "was lost" in failed.error
    queued = queue_messages()
    assert [e["uid"] for e in queued] == [1, 2, 3], "the messages before the cut are queued, once"
    row = services.registry.get(address)
    assert row.last_uid == 3, "the messages before the cut are checkpointed"
    container = azure_clients.container(services.settings, services.settings.mail_container)
    partial = container.get_blob_client(blob_name(row.key, row.uidvalidity, 4))
    assert not partial.exists(), "a message cut in its bytes must leave no blob"
    marks = flags(stack, address)
    assert [uid for uid in sorted(marks) if "\\Seen" in marks[uid]] == [1, 2, 3]

    done = collect(services, address)

    assert (done.outcome, done.messages) == ("ok", 3)
    assert all("\\Seen" in f for f in flags(stack, address).values())
    queued += queue_messages()
    tally = check_delivery(services, sent, queued, case="IMAP: connection cut inside a streamed message")
    assert tally.duplicates == 0
