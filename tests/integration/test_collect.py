"""Collection against the real local parts: Dovecot, the Entra stand-in, the Key Vault endpoint and Azurite."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from azure.storage.queue import QueueClient

import collectors.collect as collect_module
from collectors.sinks import BLOCK_BYTES
from devstack import dovecot
from shared import azure_clients
from shared.mailboxes import mailbox_key
from shared.registry import MailboxStatus
from tests.conftest import ROOT, large_message, simple_message
from tests.support.stack import Stack

pytestmark = pytest.mark.integration

SCHEMA = json.loads((ROOT / "schemas" / "envelope.v1.json").read_text())


def collect(services: Any, address: str) -> Any:
    mailbox = services.registry.get(address)
    return services.collector.collect_mailbox(mailbox, deadline=time.monotonic() + 120)


def blob_bytes(services: Any, envelope: dict[str, Any]) -> bytes:
    container = azure_clients.container(services.settings, services.settings.mail_container)
    return bytes(container.download_blob(envelope["blob"]["name"]).readall())


def test_mail_reaches_the_queue_once_byte_exact_in_uid_order(
    stack: Stack, services: Any, consent: Any, new_address: Any, deliver: Any, queue_messages: Any
) -> None:
    address = new_address()
    consent(address)
    sent = [simple_message(f"ticket {i}", "x" * (i * 300)) for i in range(6)]
    for raw in sent:
        deliver(address, raw)

    result = collect(services, address)

    assert (result.outcome, result.messages) == ("ok", 6)
    raw_queue = QueueClient.from_connection_string(
        services.settings.storage.connection_string, services.settings.mail_queue
    )
    on_the_wire = [m.content for m in raw_queue.peek_messages(max_messages=32)]
    assert [json.loads(base64.b64decode(text))["uid"] for text in on_the_wire] == list(range(1, 7))
    envelopes = queue_messages()
    assert [e["uid"] for e in envelopes] == sorted(e["uid"] for e in envelopes)
    assert [blob_bytes(services, e) for e in envelopes] == sent
    for envelope, raw in zip(envelopes, sent, strict=True):
        jsonschema.validate(envelope, SCHEMA)
        assert envelope["sha256"] == hashlib.sha256(raw).hexdigest()
        assert envelope["mailbox"] == address
    config = Path(stack.dovecot_config)
    listed = dovecot.list_flags(config, address)
    assert len(listed) == len(sent)
    assert all("\\Seen" in flags for flags in listed.values())

    again = collect(services, address)
    assert (again.outcome, again.messages) == ("ok", 0)
    assert queue_messages() == []
    row = services.registry.get(address)
    assert row.last_uid == max(e["uid"] for e in envelopes) and row.consecutive_failures == 0


def test_the_after_action_waits_for_the_queue(
    stack: Stack, services: Any, consent: Any, new_address: Any, deliver: Any, queue_messages: Any
) -> None:
    address = new_address()
    consent(address, after_action="move", move_to="Collected")
    deliver(address, simple_message("first"))
    queue = azure_clients.queue(services.settings, services.settings.mail_queue)
    queue.delete_queue()  # the envelope cannot be written now

    failed = collect(services, address)

    config = Path(stack.dovecot_config)
    assert failed.outcome == "transient"
    assert len(dovecot.list_uids(config, address)) == 1, "the message left the inbox before it was queued"
    assert services.registry.get(address).last_uid == 0

    queue.create_queue()
    done = collect(services, address)
    assert (done.outcome, done.messages) == ("ok", 1)
    assert dovecot.list_uids(config, address) == []
    assert len(dovecot.list_uids(config, address, "Collected")) == 1
    assert [e["subject"] for e in queue_messages()] == ["first"]


def test_a_non_ascii_nested_move_folder_is_created_once_and_receives_the_mail(
    stack: Stack, services: Any, consent: Any, new_address: Any, deliver: Any, queue_messages: Any
) -> None:
    # imapclient sends the name in modified UTF-7; Dovecot stores it under its UTF-8 name, which doveadm shows.
    address = new_address()
    folder = "Erledigt/Überprüft"
    consent(address, after_action="move", move_to=folder)
    deliver(address, simple_message("one"))
    assert collect(services, address).messages == 1
    deliver(address, simple_message("two"))
    assert collect(services, address).messages == 1  # the folder exists now: the exact LIST finds it
    config = Path(stack.dovecot_config)
    assert len(dovecot.list_uids(config, address, folder)) == 2
    assert dovecot.list_uids(config, address) == []


def test_each_folder_keeps_its_own_checkpoint_across_a_switch_and_back(
    stack: Stack, services: Any, consent: Any, new_address: Any, deliver: Any, queue_messages: Any
) -> None:
    # With "leave" the mail stays where it is, so only the checkpoint keeps a folder from being collected twice.
    address = new_address()
    consent(address, after_action="leave")
    config = Path(stack.dovecot_config)
    dovecot.create_folder(config, address, "Support")
    deliver(address, simple_message("inbox 1"))
    deliver(address, simple_message("inbox 2"))
    assert collect(services, address).messages == 2

    services.consent.change_options(address, {"folder": "Support"}, admin="test")
    deliver(address, simple_message("support 1"), "Support")
    deliver(address, simple_message("inbox 3"))  # arrives while the other folder is collected
    assert collect(services, address).messages == 1

    services.consent.change_options(address, {"folder": "INBOX"}, admin="test")
    assert collect(services, address).messages == 1  # inbox 3 only: neither skipped nor collected twice
    services.consent.change_options(address, {"folder": "Support"}, admin="test")
    assert collect(services, address).messages == 0
    subjects = sorted(e["subject"] for e in queue_messages())
    assert subjects == ["inbox 1", "inbox 2", "inbox 3", "support 1"]


def test_a_refused_after_action_stays_pending_and_the_mail_is_not_queued_again(
    stack: Stack, services: Any, consent: Any, new_address: Any, deliver: Any, queue_messages: Any
) -> None:
    # Dovecot refuses to create a folder whose name begins with "~": the MOVE cannot happen after the queue write.
    address = new_address()
    consent(address, after_action="move", move_to="~Done")
    deliver(address, simple_message("one"))
    deliver(address, simple_message("two"))
    config = Path(stack.dovecot_config)

    first = collect(services, address)
    assert (first.outcome, first.messages) == ("after_action", 2)
    row = services.registry.get(address)
    assert row.last_uid == 2 and row.last_error_class == "after_action"
    assert "~Done" in row.last_error and "move_to" in row.last_error and "not queued again" in row.last_error
    assert row.pending_after_action

    again = collect(services, address)  # still refused: retried, and nothing is queued a second time
    assert (again.outcome, again.messages) == ("after_action", 0)
    assert len(dovecot.list_uids(config, address)) == 2

    services.consent.change_options(address, {"move_to": "Done"}, admin="test")
    fixed = collect(services, address)
    assert fixed.outcome == "ok"
    assert dovecot.list_uids(config, address) == [] and len(dovecot.list_uids(config, address, "Done")) == 2
    row = services.registry.get(address)
    assert not row.pending_after_action and row.last_error_class == ""
    assert sorted(e["subject"] for e in queue_messages()) == ["one", "two"]


def test_a_revoke_during_a_run_ends_that_mailbox_cleanly_and_the_others_go_on(
    services: Any, consent: Any, new_address: Any, deliver: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    revoked, other = new_address(), new_address()
    for address in (revoked, other):
        consent(address)
        for i in range(3):
            deliver(address, simple_message(f"{address} {i}"))
    registry = services.collector._registry
    checkpoint = registry.record_checkpoint

    def revoke_at_the_first_checkpoint(address: str, *args: Any, **fields: Any) -> None:
        if address == revoked and services.registry.find(revoked) is not None:
            services.consent.revoke(revoked)
        checkpoint(address, *args, **fields)

    monkeypatch.setattr(registry, "record_checkpoint", revoke_at_the_first_checkpoint)
    results = {r.address: r for r in services.collector.run([services.registry.get(a) for a in (revoked, other)])}
    assert results[revoked].outcome == "deferred"
    assert (results[other].outcome, results[other].messages) == ("ok", 3)
    assert services.registry.find(revoked) is None  # no row written back by the ending run
    assert services.tokens._store.load(revoked) is None


@pytest.mark.parametrize("action", ["leave", "delete"])
def test_other_after_actions(
    stack: Stack,
    services: Any,
    consent: Any,
    new_address: Any,
    deliver: Any,
    queue_messages: Any,
    action: str,
) -> None:
    address = new_address()
    consent(address, after_action=action)
    deliver(address, simple_message("one"))
    deliver(address, simple_message("two"))
    assert collect(services, address).messages == 2
    config = Path(stack.dovecot_config)
    uids = dovecot.list_uids(config, address)
    if action == "leave":
        listed = dovecot.list_flags(config, address)
        assert len(uids) == len(listed) == 2 and not any("\\Seen" in f for f in listed.values())
    else:
        assert uids == []
    assert collect(services, address).messages == 0  # the checkpoint keeps "leave" from collecting twice
    assert len(queue_messages()) == 2


def test_a_rotated_refresh_token_is_stored_and_the_old_one_is_not_needed(
    services: Any, consent: Any, new_address: Any, deliver: Any, entra_control: Any, queue_messages: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    import msal

    import collectors.tokens as tokens_module
    from collectors.entra import confidential_app

    address = new_address()
    # This account's tokens live below the renewal margin: every run renews (the other tests' accounts keep theirs).
    entra_control("settings", {"access_token_ttl_by_account": {address: 120}})
    consent(address)
    entra_control("settings", {"access_token_ttl_by_account": {address: 3600}})
    # Strict rotation: the refresh token stored before dies once redeemed, so only a stored rotation keeps it going;
    # the app then writes every rotation (Entra itself does not revoke, and the app writes once a day).
    entra_control("settings", {"strict_accounts": [address]})
    monkeypatch.setattr(tokens_module, "TOKEN_REWRITE_AFTER", 0)
    store = services.tokens._store
    before = store.load(address)
    deliver(address, simple_message("rotating"))

    assert collect(services, address).outcome == "ok"

    after = store.load(address)
    assert after.version != before.version
    assert hashlib.sha256(after.serialized.encode()).digest() != hashlib.sha256(before.serialized.encode()).digest()
    assert services.registry.get(address).token_saved_at is not None
    # The stand-in rotates strictly: the refresh token that was stored before is now refused.
    old = msal.SerializableTokenCache()
    old.deserialize(before.serialized)
    app = confidential_app(services.settings, old)
    refused = app.acquire_token_silent_with_error(
        [services.settings.imap_scope], app.get_accounts()[0], force_refresh=True
    )
    assert refused and refused.get("error") == "invalid_grant"
    # ...and collection goes on with the stored one.
    deliver(address, simple_message("after rotation"))
    services.tokens.forget(address)
    assert collect(services, address).messages == 1
    assert [e["subject"] for e in queue_messages()] == ["rotating", "after rotation"]


def test_a_warm_worker_does_not_touch_key_vault_while_tokens_are_fresh(
    services: Any, consent: Any, new_address: Any, deliver: Any, keyvault_control: Any
) -> None:
    address = new_address()
    consent(address)
    deliver(address, simple_message("warm"))
    assert collect(services, address).messages == 1  # cold: reads the cache once
    secret = mailbox_key(address).lower()

    def touched() -> dict[str, int]:
        return keyvault_control("stats", method="GET")["by_secret"].get(secret, {"reads": 0, "writes": 0})

    before = touched()
    assert before["reads"] >= 1  # the counter sees this mailbox's secret
    for _ in range(3):
        deliver(address, simple_message("more"))
        assert collect(services, address).messages == 1
    assert touched() == before


def test_invalid_grant_marks_one_mailbox_and_the_others_are_collected(
    services: Any, consent: Any, new_address: Any, deliver: Any, entra_control: Any, queue_messages: Any
) -> None:
    good1, bad, good2 = new_address(), new_address(), new_address()
    entra_control("settings", {"access_token_ttl_by_account": dict.fromkeys((good1, bad, good2), 120)})
    for address in (good1, bad, good2):
        consent(address)
        deliver(address, simple_message(f"for {address}"))
    entra_control("settings", {"access_token_ttl_by_account": dict.fromkeys((good1, bad, good2), 3600)})
    entra_control(
        "faults",
        {
            "endpoint": "token",
            "error": "invalid_grant",
            "aadsts": 70043,
            "status": 400,
            "count": 5,
            "account": bad,
            "grant_type": "refresh_token",
        },
    )

    results = {r.address: r for r in services.collector.run()}

    assert results[good1].messages == 1 and results[good2].messages == 1
    assert results[bad].outcome == "needs_reconsent" and "AADSTS70043" in results[bad].error
    row = services.registry.get(bad)
    assert row.status == MailboxStatus.NEEDS_RECONSENT and row.last_error_class == "needs_reconsent"
    assert "authorize" in row.last_error
    assert services.tokens._store.load(bad) is not None, "the stored token must be kept"
    assert sorted(e["mailbox"] for e in queue_messages()) == sorted([good1, good2])
    # A re-consent brings it back.
    entra_control("faults", method="DELETE")
    consent(bad)
    assert services.registry.get(bad).status == "active"
    assert collect(services, bad).messages == 1


def test_two_concurrent_runs_never_collect_the_same_mailbox(
    settings: Any, services: Any, consent: Any, new_address: Any, deliver: Any, queue_messages: Any
) -> None:
    from collectors.services import build_services

    address = new_address()
    consent(address)
    for i in range(120):
        deliver(address, simple_message(f"m{i}"))
    other = build_services(settings)  # a second worker: its own token cache and thread pools
    results: list[Any] = []
    start = threading.Barrier(2)

    def run(s: Any) -> None:
        start.wait()
        results.append(collect(s, address))

    threads = [threading.Thread(target=run, args=(s,)) for s in (services, other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    outcomes = sorted(r.outcome for r in results)
    assert outcomes == ["busy", "ok"]
    ids = [e["id"] for e in queue_messages()]
    assert len(ids) == 120 and len(set(ids)) == 120


def test_a_30_mb_message_and_a_huge_header_go_through(
    services: Any, consent: Any, new_address: Any, deliver: Any, queue_messages: Any
) -> None:
    import base64

    address = new_address()
    consent(address)
    attachment = base64.encodebytes(bytes(range(256)) * (30 * 1024 * 1024 // 256 * 3 // 4))
    big = (
        b"From: a@example.org\r\nTo: support@example.test\r\nSubject: big\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nsee file\r\n'
        b'--b\r\nContent-Type: application/octet-stream; name="big.bin"\r\nContent-Transfer-Encoding: base64\r\n\r\n'
        + attachment.replace(b"\n", b"\r\n")
        + b"--b--\r\n"
    )
    assert len(big) > 30 * 1024 * 1024
    recipients = ", ".join(f"r{i}@example.org" for i in range(2000))
    wide = (f"From: a@example.org\r\nTo: {recipients}\r\nSubject: {'S' * 10240}\r\n\r\nbody\r\n").encode()
    deliver(address, big)
    deliver(address, wide)

    result = collect(services, address)

    assert (result.outcome, result.messages) == ("ok", 2)
    envelopes = queue_messages()
    assert [blob_bytes(services, e) == raw for e, raw in zip(envelopes, (big, wide), strict=True)] == [True, True]
    for e in envelopes:
        jsonschema.validate(e, SCHEMA)
    assert envelopes[0]["size"] == len(big)


def test_many_mailboxes_fan_out_as_work_items_that_each_collect_one_mailbox(
    app_env: dict[str, str], consent: Any, new_address: Any, deliver: Any, queue_messages: Any
) -> None:
    from collectors.services import build_services
    from shared.settings import load_settings

    narrow = build_services(load_settings({**app_env, "COLLECT_MAX_CONCURRENCY": "1"}))
    addresses = [new_address() for _ in range(5)]
    for address in addresses:
        consent(address)
        deliver(address, simple_message(f"for {address}"))
    due = narrow.collector.due_mailboxes()
    assert len(due) == 5 and narrow.collector.fan_out_needed(len(due))

    narrow.collector.fan_out(due, narrow.work_queue())

    items = [m.content for m in narrow.work_queue().receive_messages(max_messages=32)]
    assert len(items) == 5
    results = [narrow.collector.collect_work_item(item) for item in [*items, "not json", '{"mailbox": "x@y.test"}']]
    assert [r.messages for r in results[:5]] == [1] * 5 and results[5:] == [None, None]
    assert sorted(e["mailbox"] for e in queue_messages()) == sorted(addresses)


def test_auto_replies_and_bounces_go_to_the_refused_folder(
    stack: Stack, services: Any, consent: Any, new_address: Any, deliver: Any, queue_messages: Any
) -> None:
    address = new_address()
    consent(address, after_action="move", move_to="Accepted", refuse_to="Refused")
    deliver(address, simple_message("a real question"))
    deliver(address, b"Auto-Submitted: auto-replied\r\nFrom: a@example.org\r\nSubject: Out of office\r\n\r\naway\r\n")
    deliver(address, b"Return-Path: <>\r\nFrom: MAILER-DAEMON@example.org\r\nSubject: Undeliverable\r\n\r\nfail\r\n")

    assert collect(services, address).messages == 3

    config = Path(stack.dovecot_config)
    assert dovecot.list_uids(config, address) == []
    assert len(dovecot.list_uids(config, address, "Accepted")) == 1
    assert len(dovecot.list_uids(config, address, "Refused")) == 2
    assert len(queue_messages()) == 3  # every message is queued; consumers see the classification


def test_an_unexpected_error_in_one_mailbox_does_not_stop_the_others(
    services: Any, consent: Any, new_address: Any, deliver: Any, queue_messages: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import collectors.collect

    good, broken = new_address(), new_address()
    for address in (good, broken):
        consent(address)
        deliver(address, simple_message(f"for {address}"))
    real = collectors.collect.build_envelope

    def defect(raw: bytes, **kwargs: Any) -> dict[str, Any]:
        if kwargs["mailbox"] == broken:
            raise RuntimeError("a defect")
        return real(raw, **kwargs)

    monkeypatch.setattr(collectors.collect, "build_envelope", defect)

    results = {r.address: r for r in services.collector.run()}

    assert results[good].messages == 1
    assert results[broken].outcome == "error" and "RuntimeError" in results[broken].error
    row = services.registry.get(broken)
    assert (row.last_error_class, row.last_uid, row.status) == ("error", 0, "active")
    monkeypatch.undo()
    assert collect(services, broken).messages == 1  # nothing was lost


def test_a_large_message_is_streamed_into_blob_blocks_byte_exact(
    stack: Stack, services: Any, consent: Any, new_address: Any, deliver: Any, queue_messages: Any
) -> None:
    address = new_address()
    consent(address)
    before, after = simple_message("before", "a"), simple_message("after", "b")
    large = large_message("a 12 MB capture", 12 * 1024 * 1024)
    assert len(large) >= collect_module.STREAM_ABOVE, "the message must be one the collector streams"
    for raw in (before, large, after):
        deliver(address, raw)

    result = collect(services, address)

    assert (result.outcome, result.messages, result.bytes) == ("ok", 3, len(before) + len(large) + len(after))
    envelopes = queue_messages()
    assert [e["subject"] for e in envelopes] == ["before", "a 12 MB capture", "after"]
    streamed = envelopes[1]
    stored = blob_bytes(services, streamed)
    assert stored == large
    assert hashlib.sha256(stored).hexdigest() == streamed["sha256"] == hashlib.sha256(large).hexdigest()
    assert streamed["size"] == len(large)
    jsonschema.validate(streamed, SCHEMA)
    container = azure_clients.container(services.settings, services.settings.mail_container)
    blob = container.get_blob_client(streamed["blob"]["name"])
    assert blob.get_blob_properties().content_settings.content_type == "message/rfc822"
    committed, _ = blob.get_block_list("committed")
    # Staged in blocks as the bytes came, not uploaded whole (a whole upload of this size is one Put Blob).
    assert [block.size for block in committed] == [BLOCK_BYTES] * (len(large) // BLOCK_BYTES) + (
        [len(large) % BLOCK_BYTES] if len(large) % BLOCK_BYTES else []
    )
    assert set(dovecot.list_flags(Path(stack.dovecot_config), address, "INBOX")[2]) >= {"\\Seen"}
    assert services.registry.get(address).last_uid == 3
