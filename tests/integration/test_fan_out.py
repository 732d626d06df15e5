"""Fan-out across instances: two local Functions hosts, each its own process as Flex Consumption instances are, take
the timer's work items from the real Azurite queue and collect the mailboxes they name under the blob lease.

Guarantees checked here: every mailbox is collected, none twice at once (two items for each mailbox, in two
processes, give each message once); a tick sends no second item for a mailbox while its last one is outstanding,
and replaces a lost one once its time to live is over; a killed host's items expire while hidden, as in Azure, and
the next tick after their time to live sends new ones, which the other host collects with nothing lost and nothing
queued twice.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from shared.lease import LEASE_SECONDS
from shared.registry import Mailbox
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


def _visible_items(services: Any) -> list[dict[str, Any]]:
    """The work items a host could take now (peeked, so left as they are; up to 32)."""
    return [json.loads(m.content) for m in services.work_queue().peek_messages(max_messages=32)]


def test_two_worker_processes_share_the_work_items_and_collect_each_mailbox_once(
    app_env: dict[str, str], services: Any, consented_with_mail: Any, queue_messages: Any, tmp_path: Path
) -> None:
    addresses = consented_with_mail(12, per_mailbox=2)
    env = _worker_env(app_env)
    with contextlib.ExitStack() as hosts:
        first = hosts.enter_context(serve_app(env, tmp_path / "first"))
        second = hosts.enter_context(serve_app(env, tmp_path / "second"))
        due = services.collector.due_mailboxes()
        assert sorted(m.address for m in due) == sorted(addresses)
        # Two items for every mailbox (the same listing fanned out twice, as when the note of the first items was
        # lost), which the two processes take at about the same time.
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


def test_two_ticks_in_a_row_queue_one_item_per_mailbox(services: Any, new_address: Any) -> None:
    addresses = sorted(new_address() for _ in range(12))
    for address in addresses:
        services.registry.put(Mailbox(address))

    first = services.collector.fan_out(services.registry.list(), services.work_queue())
    second = services.collector.fan_out(services.registry.list(), services.work_queue())

    assert (first, second) == (12, 0)
    assert sorted(item["mailbox"] for item in _visible_items(services)) == addresses


def test_a_lost_item_is_replaced_by_the_first_tick_after_its_time_to_live(services: Any, new_address: Any) -> None:
    addresses = sorted(new_address() for _ in range(3))
    for address in addresses:
        services.registry.put(Mailbox(address))
    ttl = 3
    services.collector.fan_out(services.registry.list(), services.work_queue(), ttl=ttl)
    # Taken by an instance that dies: hidden longer than the items live, as the Functions host hides them (10 min).
    taken = list(services.work_queue().receive_messages(max_messages=32, visibility_timeout=ttl + 3))
    assert len(taken) == 3
    assert services.collector.fan_out(services.registry.list(), services.work_queue(), ttl=ttl) == 0

    time.sleep(ttl + 4)
    assert _visible_items(services) == [], "an item came back after its time to live"
    assert services.collector.fan_out(services.registry.list(), services.work_queue(), ttl=ttl) == 3
    assert sorted(item["mailbox"] for item in _visible_items(services)) == addresses


def test_a_killed_worker_s_items_expire_while_hidden_and_the_next_tick_replaces_them(
    app_env: dict[str, str], services: Any, consented_with_mail: Any, queue_messages: Any, tmp_path: Path
) -> None:
    # As in Azure: the host hides a taken item longer than the item lives (10 minutes against WORK_ITEM_TTL), so a
    # dead host's items never come back; and an item lives longer than the lease of a dead run. Both shortened here.
    ttl = LEASE_SECONDS + 5
    visibility = ttl + 20
    env = _worker_env(app_env, LOCAL_QUEUE_PROCESSING_VISIBILITY_SECONDS=str(visibility))
    addresses = consented_with_mail(3, per_mailbox=2)
    services.collector.fan_out(services.collector.due_mailboxes(), services.work_queue(), ttl=ttl)
    sent = time.monotonic()

    with serve_app(env, tmp_path / "doomed", kill_at="after_blob:1") as doomed:
        _wait_until(lambda: not _alive(doomed), 90, "the first host to die at its first mail blob")
    assert queue_messages() == [], "the host died before any envelope was queued"

    with serve_app(env, tmp_path / "survivor") as survivor:
        # A tick while the dead host's items are outstanding sends nothing.
        assert services.collector.fan_out(services.collector.due_mailboxes(), services.work_queue(), ttl=ttl) == 0
        time.sleep(max(0.0, sent + visibility + 5 - time.monotonic()))
        assert _collections(survivor) == [], "a dead host's item came back after its time to live"
        assert _visible_items(services) == []

        # The first tick after the time to live sends new items; the dead run's lease has lapsed by then.
        assert services.collector.fan_out(services.collector.due_mailboxes(), services.work_queue(), ttl=ttl) == 3
        _wait_until(lambda: _pending_items(services) == 0, WAIT_SECONDS, "the survivor to settle the new items")

    envelopes = queue_messages()
    keys = Counter((e["mailbox"], e["uid"]) for e in envelopes)
    assert len(keys) == 6 and set(keys.values()) == {1}, "a message was lost or queued twice"
    collected = Counter[str]()
    for mailbox, outcome, messages in _collections(survivor):
        assert outcome == "ok", (mailbox, outcome)
        collected[mailbox] += messages
    assert collected == dict.fromkeys(addresses, 2)
