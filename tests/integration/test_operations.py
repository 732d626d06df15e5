"""Operations against the real local parts: pause and resume, the keep-alive, the daily lines, diagnose and replay
(Dovecot, the Entra stand-in, the Key Vault endpoint and Azurite)."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from collectors.diagnose import diagnose
from collectors.replay import replay
from collectors.scheduled import run_scheduled
from devstack import dovecot
from shared.mailboxes import mailbox_key
from shared.registry import Mailbox, MailboxStatus
from tests.conftest import ROOT, simple_message
from tests.support.stack import Stack

pytestmark = pytest.mark.integration

ACTIVE, PAUSED, NEEDS_RECONSENT = MailboxStatus.ACTIVE, MailboxStatus.PAUSED, MailboxStatus.NEEDS_RECONSENT


def _change(services: Any, address: str, **fields: Any) -> None:
    """Set a row's fields as a long history would have left them."""
    services.registry.put(dataclasses.replace(services.registry.get(address), **fields))


def _row(address: str) -> Mailbox:
    return Mailbox(address=address, signed_in_as=address)


def test_a_paused_mailbox_is_not_collected_and_resume_collects_from_its_checkpoint(
    services: Any, consent: Any, new_address: Any, deliver: Any, queue_messages: Any
) -> None:
    address = new_address()
    consent(address)
    deliver(address, simple_message("before the pause"))
    services.collector.run()
    assert [e["subject"] for e in queue_messages()] == ["before the pause"]

    assert services.operations.pause(address, admin="tester").status == PAUSED
    deliver(address, simple_message("during the pause"))
    results = services.collector.run()
    assert address not in [r.address for r in results]
    assert queue_messages() == []
    assert services.collector.collect_work_item(json.dumps({"mailbox": address})) is None

    assert services.operations.resume(address, admin="tester").status == ACTIVE
    services.collector.run()
    assert [e["subject"] for e in queue_messages()] == ["during the pause"]
    with pytest.raises(ValueError, match="not paused"):
        _change(services, address, status=NEEDS_RECONSENT)
        services.operations.resume(address, admin="tester")
    with pytest.raises(ValueError, match="needs re-consent"):
        services.operations.pause(address, admin="tester")


def test_keep_alive_renews_a_paused_mailboxs_refresh_token_and_leaves_fresh_ones(
    services: Any, consent: Any, new_address: Any, stack: Stack, keyvault_control: Any
) -> None:
    from shared import azure_clients

    paused, fresh, active = new_address(), new_address(), new_address()
    for address in (paused, fresh, active):
        consent(address)
    services.operations.pause(paused, admin="tester")
    services.operations.pause(fresh, admin="tester")
    eight_days_ago = datetime.now(UTC) - timedelta(days=8)
    _change(services, paused, token_saved_at=eight_days_ago)
    _change(services, active, token_saved_at=eight_days_ago)  # its collection renews it, under its lease
    # The stored token is as old as the row says (the token service ages it by its Key Vault version).
    keyvault_control("age", {"name": mailbox_key(paused), "seconds": 8 * 86400})
    secrets = azure_clients.secret_client(services.settings)
    before = secrets.get_secret(mailbox_key(paused)).properties.version
    fresh_before = secrets.get_secret(mailbox_key(fresh)).properties.version

    renewed = services.operations.keep_alive(services.registry.list())

    assert renewed == [paused]
    assert secrets.get_secret(mailbox_key(paused)).properties.version != before  # the rotated token is stored
    assert secrets.get_secret(mailbox_key(fresh)).properties.version == fresh_before
    row = services.registry.get(paused)
    assert row.status == PAUSED and row.token_saved_at > eight_days_ago + timedelta(days=7)


def test_keep_alive_marks_a_revoked_grant_as_needing_re_consent(
    services: Any, consent: Any, new_address: Any, entra_control: Any
) -> None:
    address = new_address()
    consent(address)
    services.operations.pause(address, admin="tester")
    _change(services, address, token_saved_at=datetime.now(UTC) - timedelta(days=30))
    entra_control("revoke", {"account": address})
    services.tokens.forget(address)

    assert services.operations.keep_alive(services.registry.list()) == []
    assert services.registry.get(address).status == NEEDS_RECONSENT


def test_the_daily_lines_name_mailboxes_that_need_someone_once_a_day(
    services: Any, consent: Any, new_address: Any, caplog: pytest.LogCaptureFixture
) -> None:
    broken, ageing, fine = new_address(), new_address(), new_address()
    for address in (broken, ageing, fine):
        consent(address)
    _change(services, broken, status=NEEDS_RECONSENT, consecutive_failures=4)
    _change(services, ageing, token_saved_at=datetime.now(UTC) - timedelta(days=80))
    mine = [m for m in services.registry.list() if m.address in (broken, ageing, fine)]
    assert len(mine) == 3

    with caplog.at_level(logging.WARNING, logger="collectors.operations"):
        assert services.operations.report_daily(mine) == 2
    lines = [r.getMessage() for r in caplog.records]
    assert any(
        f"mailbox={broken} outcome=needs_reconsent" in line and f"/api/mailboxes/{broken}" in line for line in lines
    )
    assert any(f"mailbox={ageing} token_expires_in_days=9" in line for line in lines)
    assert not any(f"mailbox={fine}" in line for line in lines)

    caplog.clear()
    again = [m for m in services.registry.list() if m.address in (broken, ageing, fine)]
    assert services.operations.report_daily(again) == 0  # reported today already
    _change(services, broken, reconsent_reported_at=datetime.now(UTC) - timedelta(hours=25))
    again = [m for m in services.registry.list() if m.address == broken]
    assert services.operations.report_daily(again) == 1  # and again the next day, until it is fixed


def test_a_scheduled_run_writes_the_heartbeat_line(
    services: Any, consent: Any, new_address: Any, caplog: pytest.LogCaptureFixture
) -> None:
    consent(new_address())
    with caplog.at_level(logging.INFO):
        run_scheduled(services, past_due=False)
    assert [r for r in caplog.records if r.getMessage().startswith("collect run completed mode=in_process")]


def test_diagnose_explains_the_token_and_marks_the_folders_without_showing_the_token(
    services: Any, consent: Any, new_address: Any, deliver: Any
) -> None:
    address = new_address()
    consent(address, after_action="move", move_to="Done", refuse_to="Refused")
    deliver(address, simple_message("one"))
    deliver(address, simple_message("two"))

    report = diagnose(services.settings, services.registry, services.collector.token_for, address)

    assert report.login.startswith("ok")
    assert "IMAP4REV1" in report.capabilities and "MOVE" in report.capabilities  # as after a login
    assert report.token["format"] == "JWT" and report.token["who"] == address
    assert report.token["tenant"] == services.settings.tenant_id
    assert "IMAP.AccessAsUser.All" in " ".join(report.token["scopes"])
    assert report.token["expires_at"] > datetime.now(UTC).isoformat()
    marks = {f["name"]: f["mark"] for f in report.folders}
    assert marks["INBOX"] == "collected"
    assert report.pending == 2
    # Done and Refused do not exist yet: said, not failed.
    assert any("'Done'" in p for p in report.problems) and any("'Refused'" in p for p in report.problems)
    text = json.dumps(report.to_public())
    token = services.tokens.access_token(address, signed_in_as=address).token
    assert token not in text and token.split(".")[2] not in text


def test_diagnose_reports_a_missing_grant_without_raising(services: Any, consent: Any, new_address: Any) -> None:
    address = new_address()
    consent(address)
    services.consent.revoke(address)
    services.registry.put(_row(address))  # a row whose secret is gone
    services.tokens.forget(address)
    report = diagnose(services.settings, services.registry, services.collector.token_for, address)
    assert report.token["error"] == "needs_reconsent" and report.login == "not tried" and not report.ok


def test_replay_puts_the_same_envelopes_back_for_a_time_range_or_ids(
    services: Any, consent: Any, new_address: Any, deliver: Any, queue_messages: Any
) -> None:
    address = new_address()
    consent(address)
    for i in range(3):
        deliver(address, simple_message(f"replay {i}"))
    services.collector.run()
    first = queue_messages()
    assert len(first) == 3
    mailbox = services.registry.get(address)
    container, queue = services.mail_container(), services.mail_queue()

    result = replay(mailbox, container=container, queue=queue, since=datetime.now(UTC) - timedelta(hours=1))
    again = queue_messages()
    assert sorted(result.queued) == sorted(e["id"] for e in first)
    strip = ("collected_at",)
    assert [{k: v for k, v in e.items() if k not in strip} for e in again] == [
        {k: v for k, v in e.items() if k not in strip} for e in first
    ]

    assert replay(mailbox, container=container, queue=queue, since=datetime.now(UTC) + timedelta(hours=1)).queued == []
    wanted = [first[1]["id"], f"{address}/{first[0]['uidvalidity']}/999"]
    by_ids = replay(mailbox, container=container, queue=queue, ids=wanted)
    assert by_ids.queued == [first[1]["id"]] and by_ids.missing == [wanted[1]]
    assert [e["id"] for e in queue_messages()] == [first[1]["id"]]
    for bad in ("other@example.test/1/1", f"{address}/x/1", f"{address}/1/{2**32}", "../../etc"):
        with pytest.raises(ValueError):
            replay(mailbox, container=container, queue=queue, ids=[bad])
    with pytest.raises(ValueError, match="time zone"):
        replay(mailbox, container=container, queue=queue, since=datetime(2026, 1, 1))


def test_replay_to_another_queue_leaves_the_mail_queue_alone(
    services: Any, consent: Any, new_address: Any, deliver: Any, queue_messages: Any
) -> None:
    address = new_address()
    consent(address)
    deliver(address, simple_message("for a new consumer"))
    services.collector.run()
    assert len(queue_messages()) == 1
    other = services.mail_queue(f"{services.settings.mail_queue}-new")
    result = replay(
        services.registry.get(address),
        container=services.mail_container(),
        queue=other,
        since=datetime.now(UTC) - timedelta(hours=1),
    )
    assert len(result.queued) == 1 and queue_messages() == []
    got = [json.loads(m.content) for m in other.receive_messages(max_messages=10)]
    assert [e["subject"] for e in got] == ["for a new consumer"]


def test_an_app_mode_mailbox_has_no_re_consent_link_and_no_keep_alive(services: Any, new_address: Any) -> None:
    from shared.registry import MailboxMode

    address = new_address()
    services.registry.put(
        Mailbox(address=address, mode=MailboxMode.APP, token_saved_at=datetime.now(UTC) - timedelta(days=89))
    )
    with pytest.raises(ValueError, match="app-mode"):
        services.operations.reconsent_link(address, admin="tester")
    mine = [m for m in services.registry.list() if m.address == address]
    assert len(mine) == 1
    assert services.operations.keep_alive(mine) == []
    assert services.operations.report_daily(mine) == 0  # no refresh token to expire


def test_the_collect_line_gives_the_longest_delay_from_the_date_header_to_the_queue(
    services: Any, consent: Any, new_address: Any, deliver: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from email.utils import format_datetime

    address = new_address()
    consent(address)
    sent = format_datetime(datetime.now(UTC) - timedelta(hours=2))
    deliver(address, simple_message("late").replace(b"Date: Sun, 29 Nov 2026 10:00:00 +0000", f"Date: {sent}".encode()))
    deliver(address, simple_message("no date").replace(b"Date: Sun, 29 Nov 2026 10:00:00 +0000\r\n", b""))
    with caplog.at_level(logging.INFO, logger="collectors.collect"):
        services.collector.run()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"collect mailbox={address} ")]
    assert len(lines) == 1 and "messages=2" in lines[0]
    delay = int(lines[0].split("max_delay_s=")[1].split()[0])
    assert 2 * 3600 <= delay < 2 * 3600 + 120


SCHEMA = json.loads((ROOT / "schemas" / "envelope.v1.json").read_text())


def test_an_oversize_message_is_queued_as_headers_only_and_never_blocks_the_mailbox(
    stack: Stack, services: Any, consent: Any, new_address: Any, deliver: Any, queue_messages: Any
) -> None:
    address = new_address()
    consent(address, max_message_bytes="4000", oversize="headers", after_action="delete")
    big = simple_message("too big", "y" * 20_000)
    for raw in (simple_message("small 1"), big, simple_message("small 2")):
        deliver(address, raw)

    result = services.collector.collect_mailbox(services.registry.get(address), deadline=time.monotonic() + 120)

    assert (result.outcome, result.messages) == ("ok", 2)
    envelopes = {e["uid"]: e for e in queue_messages()}
    assert sorted(envelopes) == [1, 2, 3]
    for envelope in envelopes.values():
        jsonschema.validate(envelope, SCHEMA)
    marked = envelopes[2]
    assert marked["oversize"] == {"size": len(big), "limit": 4000} and marked["subject"] == "too big"
    header_bytes = big.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
    assert marked["size"] == len(header_bytes) and envelopes[1]["oversize"] is None
    blob = services.mail_container().download_blob(marked["blob"]["name"]).readall()
    assert blob == header_bytes
    # The others are deleted as the after-action says; the big one is left whole and unread in the mailbox.
    assert dovecot.list_flags(Path(stack.dovecot_config), address) == {2: set()}
    row = services.registry.get(address)
    assert row.last_uid == 3 and "UID 2" in row.last_oversize and "headers only" in row.last_oversize
    again = services.collector.collect_mailbox(row, deadline=time.monotonic() + 120)
    assert (again.outcome, again.messages) == ("ok", 0) and queue_messages() == []


def test_an_oversize_message_under_the_collect_policy_is_collected_and_noted(
    services: Any, consent: Any, new_address: Any, deliver: Any, queue_messages: Any
) -> None:
    address = new_address()
    consent(address, max_message_bytes="4000")
    deliver(address, simple_message("too big", "y" * 20_000))
    services.collector.run()
    envelopes = queue_messages()
    assert len(envelopes) == 1 and envelopes[0]["oversize"] is None and envelopes[0]["size"] > 20_000
    assert "collected anyway" in services.registry.get(address).last_oversize
    with pytest.raises(ValueError, match="oversize must be one of"):
        services.consent.change_options(address, {"oversize": "drop"}, admin="tester")
    for bad in ("-1", "1.5", "99999999999"):
        with pytest.raises(ValueError, match="max_message_bytes"):
            services.consent.change_options(address, {"max_message_bytes": bad}, admin="tester")


def test_the_command_line_pauses_diagnoses_and_replays(
    app_env: dict[str, str], services: Any, consent: Any, new_address: Any, deliver: Any, queue_messages: Any,
    tmp_path: Path,
) -> None:  # fmt: skip
    import subprocess
    import sys

    address = new_address()
    consent(address)
    deliver(address, simple_message("from the shell"))
    services.collector.run()
    envelope = queue_messages()[0]
    settings = tmp_path / "local.settings.json"
    settings.write_text(json.dumps({"IsEncrypted": False, "Values": app_env}))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "collectors", *args, "--settings", str(settings)],
            check=False, cwd=ROOT, capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin"},
        )  # fmt: skip

    paused = cli("pause", "--mailbox", address)
    assert paused.returncode == 0, paused.stderr
    assert json.loads(paused.stdout)["status"] == "paused"
    assert json.loads(cli("resume", "--mailbox", address).stdout)["status"] == "active"
    diagnosis = cli("diagnose", "--mailbox", address)
    report = json.loads(diagnosis.stdout)
    assert diagnosis.returncode == 0 and report["token"]["who"] == address and report["pending"] == 0
    token = services.tokens.access_token(address, signed_in_as=address).token
    assert token not in diagnosis.stdout + diagnosis.stderr
    replayed = cli("replay", "--mailbox", address, "--id", envelope["id"])
    assert json.loads(replayed.stdout)["ids"] == [envelope["id"]]
    assert [e["id"] for e in queue_messages()] == [envelope["id"]]

    assert cli("replay", "--mailbox", address).returncode == 2  # neither --since nor --id
    assert "--since" in cli("replay", "--mailbox", address).stderr
    assert cli("replay", "--mailbox", address, "--id", "other@example.test/1/1").returncode == 2
    assert cli("pause").returncode == 2
    unknown = cli("diagnose", "--mailbox", "nobody@example.test")
    assert unknown.returncode == 2 and "not authorized" in unknown.stderr
