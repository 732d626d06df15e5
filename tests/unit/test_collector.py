"""The Collector against in-memory fakes of every seam: order of the steps, failing sinks, crashes between steps,
refuse decisions, deadlines, leases and revocation. The fault suite checks the same against the real parts."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

import collectors.collect as collect_module
import collectors.envelope.stream as envelope_stream
from collectors.collect import BATCH_MESSAGES, WORK_ITEM_TTL
from shared.errors import AfterActionError, MailboxAccessError, NeedsReconsentError, RunOutcome, TransientError
from shared.registry import Mailbox, MailboxOptions, MailboxStatus
from tests.mail_corpus import plain
from tests.support.fakes import Crash, World

ADDRESS = "support@contoso.example"


def mail(subject: str, **headers: str) -> bytes:
    return plain(("Subject", subject), *headers.items(), body=f"Body of {subject}\r\n")


def register(world: World, **options: Any) -> Mailbox:
    mailbox = Mailbox(ADDRESS, options=MailboxOptions.from_mapping(options))
    world.registry.put(mailbox)
    return world.registry.get(ADDRESS)


def collect(world: World) -> Any:
    return world.collector().collect_mailbox(world.registry.get(ADDRESS), deadline=world.clock() + 100)


def test_each_message_is_stored_then_queued_then_acted_on_then_checkpointed() -> None:
    world = World()
    register(world)
    uids = [world.server.deliver(mail(f"m{i}")) for i in range(3)]
    result = collect(world)

    assert (result.outcome, result.messages) == (RunOutcome.OK, 3)
    assert [m["subject"] for m in world.queue.messages] == ["m0", "m1", "m2"]
    assert world.server.seen == set(uids)
    journal = world.journal
    for uid in uids:
        assert journal.index(f"put:{uid}") < journal.index(f"send:{uid}") < journal.index("apply:seen:1,2,3")
    assert journal.index("apply:seen:1,2,3") < journal.index("checkpoint:3")
    row = world.registry.get(ADDRESS)
    assert (row.last_uid, row.uidvalidity, row.collected_total, row.last_error_class) == (3, 7, 3, "")


def test_the_blob_holds_the_exact_bytes_and_the_envelope_names_it() -> None:
    world = World()
    register(world, after_action="leave")
    raw = mail("bytes") + b"\r\n\xff\x00 trailing bytes kept as they came"
    uid = world.server.deliver(raw)
    collect(world)
    (name,) = world.raw.blobs
    assert world.raw.blobs[name] == raw
    envelope = world.queue.messages[0]
    assert envelope["blob"]["name"] == name and envelope["uid"] == uid and world.server.folders["INBOX"]


def test_a_second_run_collects_only_new_mail() -> None:
    world = World()
    register(world, after_action="leave")
    world.server.deliver(mail("first"))
    collect(world)
    world.server.deliver(mail("second"))
    assert collect(world).messages == 1
    assert [m["subject"] for m in world.queue.messages] == ["first", "second"]


@pytest.mark.parametrize("failing", ["put", "send"])
def test_a_failing_sink_loses_nothing_and_the_next_run_delivers(failing: str) -> None:
    world = World()
    register(world, after_action="move", move_to="Done")
    uids = [world.server.deliver(mail(f"m{i}")) for i in range(3)]
    world.faults.at(f"{failing}:2", TransientError("storage write failed for a test"))

    failed = collect(world)
    assert failed.outcome is RunOutcome.TRANSIENT and "storage write failed" in failed.error
    assert sorted(world.server.folders["INBOX"]) == uids, "mail left the mailbox before it was queued"
    row = world.registry.get(ADDRESS)
    assert (row.last_uid, row.consecutive_failures, row.last_error_class) == (0, 1, "transient")
    assert not any(e.startswith("apply:") for e in world.journal)

    done = collect(world)
    assert done.outcome is RunOutcome.OK and world.server.folders["INBOX"] == {}
    assert set(world.queue.ids()) == {f"{ADDRESS}/7/{uid}" for uid in uids}
    assert world.registry.get(ADDRESS).consecutive_failures == 0


@pytest.mark.parametrize("point", ["put:2", "send:2", "apply:move:1,2,3:Done", "checkpoint:3"])
def test_a_crash_between_any_two_steps_loses_nothing(point: str) -> None:
    world = World()
    register(world, after_action="move", move_to="Done")
    uids = [world.server.deliver(mail(f"m{i}")) for i in range(3)]
    world.faults.at(point, Crash())

    with pytest.raises(Crash):
        collect(world)
    # A new process after the crash (the lease of the dead one has expired).
    world.leases.taken.clear()
    assert collect(world).outcome is RunOutcome.OK

    assert world.server.folders["INBOX"] == {} and sorted(world.server.folders["Done"]) == uids
    delivered = world.queue.ids()
    assert set(delivered) == {f"{ADDRESS}/7/{uid}" for uid in uids}, "a message was lost"
    assert world.registry.get(ADDRESS).last_success_at is not None


def test_refused_mail_goes_to_the_refuse_folder_and_is_still_queued() -> None:
    world = World()
    register(world, after_action="move", move_to="Accepted", refuse_to="Refused")
    ticket = world.server.deliver(mail("printer broken"))
    auto = world.server.deliver(mail("Out of office", **{"Auto-Submitted": "auto-replied"}))
    bounce = world.server.deliver(mail("Undeliverable", **{"Return-Path": "<>"}))
    collect(world)

    assert sorted(world.server.folders["Accepted"]) == [ticket]
    assert sorted(world.server.folders["Refused"]) == [auto, bounce]
    flags = {m["uid"]: m["classification"] for m in world.queue.messages}
    assert flags[auto]["auto_reply"] and flags[bounce]["bounce"] and not flags[ticket]["auto_reply"]


def test_a_run_past_its_deadline_stores_no_more_batches_and_says_more() -> None:
    world = World()
    register(world, after_action="leave")
    for i in range(BATCH_MESSAGES + 5):
        world.server.deliver(mail(f"m{i}"))
    deadline = world.clock() + 10

    def pass_the_deadline_at_the_second_batch(index: int) -> None:
        if index == 1:
            world.now[0] = deadline + 1

    world.server.on_batch = pass_the_deadline_at_the_second_batch
    result = world.collector().collect_mailbox(world.registry.get(ADDRESS), deadline=deadline)

    assert result.outcome is RunOutcome.OK and result.more and result.messages == BATCH_MESSAGES
    assert world.registry.get(ADDRESS).last_uid == BATCH_MESSAGES
    assert len(world.queue.messages) == BATCH_MESSAGES


def test_per_run_caps_leave_the_rest_for_next_time() -> None:
    world = World()
    register(world, after_action="leave", max_messages=2)
    for i in range(5):
        world.server.deliver(mail(f"m{i}"))
    result = collect(world)
    assert (result.messages, result.more) == (2, True)
    assert world.registry.get(ADDRESS).last_uid == 2


def test_a_mailbox_another_run_holds_is_left_alone() -> None:
    world = World()
    mailbox = register(world)
    world.server.deliver(mail("m"))
    world.leases.taken.add(mailbox.key)
    result = collect(world)
    assert (result.outcome, world.source.opened, world.queue.messages) == (RunOutcome.BUSY, 0, [])


def test_a_lost_lease_stops_before_the_after_action() -> None:
    world = World()
    register(world, after_action="delete")
    world.server.deliver(mail("m"))
    original_send = world.queue.send

    def send_and_lose_the_lease(text: str) -> None:
        original_send(text)
        assert world.leases.last is not None
        world.leases.last.lost = True

    world.queue.send = send_and_lose_the_lease  # type: ignore[method-assign]
    result = collect(world)
    assert result.outcome is RunOutcome.TRANSIENT and "lease" in result.error
    assert world.server.folders["INBOX"], "the after-action ran without the lease"
    assert world.registry.get(ADDRESS).last_uid == 0


def test_a_mailbox_revoked_during_its_run_is_deferred_without_error() -> None:
    world = World()
    register(world, after_action="leave")
    world.server.deliver(mail("m"))
    original = world.tokens.access_token

    def revoke_then_answer(address: str, **kwargs: Any) -> Any:
        world.registry.delete(address)
        return original(address, **kwargs)

    world.tokens.access_token = revoke_then_answer  # type: ignore[method-assign]
    assert collect_revoked(world).outcome is RunOutcome.DEFERRED


def collect_revoked(world: World) -> Any:
    mailbox = Mailbox(ADDRESS, options=MailboxOptions(after_action="leave"))  # type: ignore[arg-type]
    world.registry.put(mailbox)
    return world.collector().collect_mailbox(mailbox, deadline=world.clock() + 100)


def test_a_defect_raising_key_error_is_reported_not_deferred() -> None:
    world = World()
    register(world)
    world.server.deliver(mail("m"))
    world.faults.at("fetch:1", KeyError("uid"))
    result = collect(world)
    assert result.outcome is RunOutcome.ERROR and "KeyError" in result.error
    assert world.registry.get(ADDRESS).last_error_class == "error"


def test_a_definitive_token_failure_marks_the_mailbox_for_reconsent() -> None:
    world = World()
    register(world)
    world.tokens.error = NeedsReconsentError("invalid_grant (AADSTS50173)")
    result = collect(world)
    row = world.registry.get(ADDRESS)
    assert result.outcome is RunOutcome.NEEDS_RECONSENT
    assert row.status is MailboxStatus.NEEDS_RECONSENT and "AADSTS50173" in row.last_error
    assert world.collector().due_mailboxes() == []


def test_throttling_skips_the_mailbox_until_its_backoff_has_passed() -> None:
    world = World()
    register(world)
    world.tokens.error = TransientError("throttled", retry_after=3600)
    assert collect(world).outcome is RunOutcome.TRANSIENT
    assert world.collector().due_mailboxes() == []
    assert world.registry.get(ADDRESS).status is MailboxStatus.ACTIVE


def test_one_mailbox_failing_does_not_stop_the_others() -> None:
    world = World()
    register(world)
    other = Mailbox("other@contoso.example", options=MailboxOptions())
    world.registry.put(other)
    world.server.deliver(mail("m"))
    world.faults.at("fetch:1", MailboxAccessError("cannot open folder"))
    results = {r.address: r.outcome for r in world.collector().run()}
    assert sorted(results.values()) == [RunOutcome.MAILBOX_ACCESS, RunOutcome.OK]


def test_a_refused_after_action_is_owed_not_queued_again_and_done_first_next_run() -> None:
    world = World()
    register(world, after_action="move", move_to="Done")
    uids = [world.server.deliver(mail(f"m{i}")) for i in range(2)]
    world.faults.at("apply:move:1,2:Done", AfterActionError("cannot create folder 'Done'"))

    owed = collect(world)
    assert owed.outcome is RunOutcome.AFTER_ACTION and sorted(world.server.folders["INBOX"]) == uids
    row = world.registry.get(ADDRESS)
    assert row.last_uid == 2 and row.pending_after_action, "the queued mail is owed its after-action"

    world.server.deliver(mail("later"))
    done = collect(world)
    assert done.outcome is RunOutcome.OK and world.server.folders["INBOX"] == {}
    assert world.journal.index("apply:move:1,2:Done") < world.journal.index("send:3"), "the owed step went first"
    assert [m["uid"] for m in world.queue.messages] == [1, 2, 3], "nothing was queued twice"
    assert world.registry.get(ADDRESS).pending_after_action == ""


def test_a_placeholder_is_queued_flagged_never_acted_on_and_reported_until_it_leaves_the_folder() -> None:
    world = World()
    register(world, after_action="move", move_to="Done")
    stuck = world.server.deliver(
        plain(
            ("Subject", "figures"),
            body="Retrieval using the IMAP4 protocol failed for the following message:\r\nSubject: figures\r\n",
        )
    )
    normal = world.server.deliver(mail("normal"))

    result = collect(world)

    assert (result.outcome, result.messages, result.placeholders) == (RunOutcome.OK, 2, [stuck])
    flags = {m["uid"]: m["classification"]["placeholder"] for m in world.queue.messages}
    assert flags == {stuck: True, normal: False}
    assert f"apply:move:{normal}:Done" in world.journal and not any(f":{stuck}" in e for e in world.journal[-3:])
    assert list(world.server.folders["INBOX"]) == [stuck], "the real message stays where Exchange keeps it"
    assert world.registry.get(ADDRESS).placeholder_uids == (stuck,)

    assert collect(world).messages == 0
    assert world.registry.get(ADDRESS).placeholder_uids == (stuck,), "still there: still reported"
    del world.server.folders["INBOX"][stuck]  # an admin dealt with it in Outlook
    collect(world)
    assert world.registry.get(ADDRESS).placeholder_uids == ()


class _WorkQueue:
    """The work queue's two calls the fan-out makes; ``fail_for`` names a mailbox whose send fails."""

    queue_name = "work"

    def __init__(self, fail_for: str = "") -> None:
        self.items: list[tuple[str, int]] = []
        self._fail_for = fail_for
        self._lock = threading.Lock()

    def send_message(self, content: Any, **kwargs: Any) -> None:
        if self._fail_for and self._fail_for in content:
            raise TransientError("the queue refused the item")
        with self._lock:
            self.items.append((content, kwargs["time_to_live"]))


def test_fan_out_puts_one_item_per_mailbox_each_with_its_time_to_live() -> None:
    mailboxes = [Mailbox(f"m{i:03d}@example.test") for i in range(100)]
    work = _WorkQueue()

    assert World().collector().fan_out(mailboxes, work) == 100

    assert sorted(json.loads(text)["mailbox"] for text, _ in work.items) == [m.address for m in mailboxes]
    assert {ttl for _, ttl in work.items} == {WORK_ITEM_TTL}


def test_a_failed_work_item_send_fails_the_fan_out_after_the_others_are_sent() -> None:
    mailboxes = [Mailbox(f"m{i:03d}@example.test") for i in range(40)]
    work = _WorkQueue(fail_for="m007@")

    with pytest.raises(TransientError):
        World().collector().fan_out(mailboxes, work)

    assert len(work.items) == 39  # the others reached the queue; the failed mailbox waits for the next tick


def test_a_large_message_is_streamed_to_its_blob_and_queued_after_the_commit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(collect_module, "STREAM_ABOVE", 10_000)
    world = World()
    register(world)
    small = mail("small")
    big = plain(("Subject", "big"), body="y" * 30_000 + "\r\n")
    uids = [world.server.deliver(raw) for raw in (small, big, small)]

    result = collect(world)

    assert (result.outcome, result.messages, result.bytes) == (RunOutcome.OK, 3, 2 * len(small) + len(big))
    folder_streamed = [w.name for w in world.raw.writers]
    assert len(folder_streamed) == 1 and folder_streamed[0].endswith(f"/{uids[1]:010d}.eml")
    assert world.raw.blobs[folder_streamed[0]] == big
    (envelope,) = [m for m in world.queue.messages if m["uid"] == uids[1]]
    assert envelope["size"] == len(big) and envelope["sha256"] == hashlib.sha256(big).hexdigest()
    assert envelope["subject"] == "big" and envelope["blob"]["name"] == folder_streamed[0]
    journal = world.journal
    assert [m["uid"] for m in world.queue.messages] == uids
    assert journal.index(f"put:{uids[1]}") < journal.index(f"send:{uids[1]}")
    # The batch before the streamed message is finished (acted on, checkpointed) before its bytes are read.
    assert journal.index("checkpoint:1") < journal.index(f"put:{uids[1]}")
    assert journal.index(f"send:{uids[1]}") < journal.index(f"apply:seen:{uids[1]}") < journal.index("checkpoint:2")


def test_a_streamed_message_past_the_deadline_is_not_committed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(collect_module, "STREAM_ABOVE", 10_000)
    world = World()
    register(world)
    world.server.deliver(plain(("Subject", "big"), body="y" * 30_000 + "\r\n"))
    world.server.on_batch = lambda index: world.now.__setitem__(0, 1_000.0)  # the clock passes the deadline

    result = collect(world)

    assert (result.outcome, result.messages, result.more) == (RunOutcome.OK, 0, True)
    (writer,) = world.raw.writers
    assert writer.state == "aborted" and world.raw.blobs == {} and world.queue.messages == []
    assert world.registry.get(ADDRESS).last_uid == 0


def test_a_defect_in_the_envelope_walk_fails_the_run_without_a_hang_or_an_envelope(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(collect_module, "STREAM_ABOVE", 10_000)
    monkeypatch.setattr(collect_module, "FEED_AHEAD", 1)  # the writer would block at once on a walk that stopped

    class Broken(envelope_stream.EnvelopeStream):
        def feed(self, chunk: bytes) -> None:
            raise RuntimeError("walk defect")

    monkeypatch.setattr(envelope_stream, "EnvelopeStream", Broken)
    world = World()
    register(world)
    world.server.deliver(plain(("Subject", "big"), body="y" * 30_000 + "\r\n"))

    result = collect(world)

    assert result.outcome.failed and "RuntimeError" in result.error
    assert world.queue.messages == [] and world.registry.get(ADDRESS).last_uid == 0


def test_a_streamed_message_budget_covers_the_envelope_walk_and_its_module_loads_only_when_needed() -> None:
    assert collect_module.ENVELOPE_WALK_BYTES >= 2 * envelope_stream.SKELETON_BYTES
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, collectors.collect; print('collectors.envelope.stream' in sys.modules)"],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(collect_module.__file__).parents[1],
    )
    assert loaded.stdout.strip() == "False", "the walk's module must not weigh on the app's import (benchmark 4)"
