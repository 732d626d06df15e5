"""Fan-out across instances: two local Functions hosts, each its own process as Flex Consumption instances are, take
the timer's work items from the real Azurite queue and collect the mailboxes they name under the blob lease.

Guarantees checked here: every mailbox is collected, none twice at once (two items for each mailbox, in two
processes, give each message once), and a killed host's items come back to the other host after the queue's
visibility timeout, with nothing lost and nothing queued twice.
"""

from __future__ import annotations

import contextlib
import re
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from shared.lease import LEASE_SECONDS
from tests.conftest import simple_message
from tests.support.app_host import LocalApp, serve_app

pytestmark = pytest.mark.integration

COLLECTED = re.compile(r"collect mailbox=(\S+) outcome=(\S+) messages=(\d+)")
WAIT_SECONDS = 240.0  # two hosts on a loaded machine; the test normally ends in well under a minute


def _worker_env(app_env: dict[str, str], **extra: str) -> dict[str, str]:
    # The timer stays off: the test plays the tick itself, so that only the work items decide who collects what.
    return {**app_env, "AzureWebJobs.collect_mail.Disabled": "true", **extra}


def _collections(app: LocalApp) -> list[tuple[str, str, int]]:
    """(mailbox, outcome, messages) for each collection the host's log reports."""
    text = app.log.read_text(errors="replace") if app.log.exists() else ""
    return [(m, outcome, int(n)) for m, outcome, n in COLLECTED.findall(text)]


def _pending_items(services: Any) -> int:
    """Work items still on the queue, hidden ones (taken by a host, not yet settled) included."""
    return int(services.work_queue().get_queue_properties().approximate_message_count)


def _wait_until(done: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not done():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}", pytrace=False)
        time.sleep(0.5)


def _alive(app: LocalApp) -> bool:
    try:
        urllib.request.urlopen(f"{app.origin}/admin/host/ping", timeout=2).close()
    except OSError:
        return False
    return True


def _consent_with_mail(consent: Any, new_address: Any, deliver: Any, mailboxes: int, per_mailbox: int) -> list[str]:
    addresses = [new_address() for _ in range(mailboxes)]
    for address in addresses:
        consent(address)
        for n in range(per_mailbox):
            deliver(address, simple_message(f"{n} for {address}"))
    return addresses


def test_two_worker_processes_share_the_work_items_and_collect_each_mailbox_once(
    app_env: dict[str, str],
    services: Any,
    consent: Any,
    new_address: Any,
    deliver: Any,
    queue_messages: Any,
    tmp_path: Path,
) -> None:
    addresses = _consent_with_mail(consent, new_address, deliver, mailboxes=12, per_mailbox=2)
    env = _worker_env(app_env)
    with contextlib.ExitStack() as hosts:
        first = hosts.enter_context(serve_app(env, tmp_path / "first"))
        second = hosts.enter_context(serve_app(env, tmp_path / "second"))
        due = services.collector.due_mailboxes()
        assert sorted(m.address for m in due) == sorted(addresses)
        # Two ticks' worth: every mailbox has two items, which the two processes take at about the same time.
        services.collector.fan_out(due, services.work_queue())
        services.collector.fan_out(due, services.work_queue())

        _wait_until(lambda: _pending_items(services) == 0, WAIT_SECONDS, "the hosts to settle all 24 work items")

    envelopes = queue_messages()
    keys = Counter((e["mailbox"], e["uid"]) for e in envelopes)
    assert sorted({mailbox for mailbox, _ in keys}) == sorted(addresses)
    assert len(keys) == 24 and set(keys.values()) == {1}, "a message was lost or queued twice"
    runs = {"first": _collections(first), "second": _collections(second)}
    assert all(runs.values()), f"both processes must take work items: {runs}"
    collected = Counter[str]()
    for mailbox, outcome, messages in runs["first"] + runs["second"]:
        assert outcome in ("ok", "busy"), (mailbox, outcome)
        collected[mailbox] += messages
    assert collected == dict.fromkeys(addresses, 2)
    assert [m.last_uid for m in services.registry.list()] == [2] * len(addresses)


def test_a_killed_worker_s_items_are_collected_by_the_other_after_the_visibility_timeout(
    app_env: dict[str, str],
    services: Any,
    consent: Any,
    new_address: Any,
    deliver: Any,
    queue_messages: Any,
    tmp_path: Path,
) -> None:
    # Azure hides a taken message for 10 minutes and the lease of a dead run lapses after LEASE_SECONDS; the local
    # host's visibility is shortened here, but still longer than the lease, as in Azure.
    visibility = LEASE_SECONDS + 15
    env = _worker_env(app_env, LOCAL_QUEUE_PROCESSING_VISIBILITY_SECONDS=str(visibility))
    addresses = _consent_with_mail(consent, new_address, deliver, mailboxes=3, per_mailbox=2)
    services.collector.fan_out(services.collector.due_mailboxes(), services.work_queue())

    with serve_app(env, tmp_path / "doomed", kill_at="after_blob:1") as doomed:
        _wait_until(lambda: not _alive(doomed), 90, "the first host to die at its first mail blob")
    died = time.monotonic()
    assert queue_messages() == [], "the host died before any envelope was queued"
    assert _pending_items(services) == 3, "a dead host's work items stay on the queue, hidden"

    with serve_app(env, tmp_path / "survivor") as survivor:
        _wait_until(
            lambda: _pending_items(services) == 0, visibility + WAIT_SECONDS, "the survivor to settle the items"
        )
    assert time.monotonic() - died > visibility - 10, "the items came back before their visibility timeout"

    envelopes = queue_messages()
    keys = Counter((e["mailbox"], e["uid"]) for e in envelopes)
    assert len(keys) == 6 and set(keys.values()) == {1}, "a message was lost or queued twice"
    collected = Counter[str]()
    for mailbox, outcome, messages in _collections(survivor):
        assert outcome == "ok", (mailbox, outcome)
        collected[mailbox] += messages
    assert collected == dict.fromkeys(addresses, 2)
