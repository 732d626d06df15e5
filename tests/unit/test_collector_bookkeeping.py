"""The collector's per-mailbox bookkeeping against in-memory fakes: one outstanding work item per mailbox, the row
read under the lease only when a run has something to do, and a success written only when it says something new.
The same guarantees are checked against Azurite in tests/integration/test_fan_out.py and test_storage_calls.py."""

from __future__ import annotations

import json
import threading
from collections import Counter
from datetime import timedelta
from typing import Any

from collectors.collect import SUCCESS_RECORD_EVERY, WORK_ITEM_TTL
from collectors.tokens import AccessToken
from shared.errors import TransientError
from shared.registry import Mailbox, MailboxStatus, utcnow
from tests.mail_corpus import plain
from tests.support.fakes import FakeTable, FakeTokens, World

ADDRESS = "support@contoso.example"


class CountingTable(FakeTable):
    """The fake table, counting each call by name."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = Counter[str]()

    def __getattribute__(self, name: str) -> Any:
        attribute = super().__getattribute__(name)
        if name in ("get_entity", "query_entities", "update_entity", "upsert_entity", "submit_transaction"):
            super().__getattribute__("calls")[name] += 1
        return attribute


class WorkQueue:
    queue_name = "work"

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def send_message(self, content: Any, **kwargs: Any) -> None:
        with self._lock:
            self.items.append({**json.loads(content), "ttl": kwargs["time_to_live"]})

    def take(self) -> list[str]:
        taken, self.items = self.items, []
        return [json.dumps({k: v for k, v in item.items() if k != "ttl"}) for item in taken]


def world_with(count: int) -> World:
    world = World(table=CountingTable())
    for i in range(count):
        world.registry.put(Mailbox(f"m{i:03d}@example.test"))
    return world


def mail(subject: str) -> bytes:
    return plain(("Subject", subject), body=f"Body of {subject}\r\n")


def test_a_second_tick_sends_no_item_for_a_mailbox_whose_item_is_still_outstanding() -> None:
    world = world_with(250)
    collector, work = world.collector(), WorkQueue()

    assert collector.fan_out(world.registry.list(), work) == 250
    assert collector.fan_out(world.registry.list(), work) == 0
    assert len(work.items) == 250 and {i["ttl"] for i in work.items} == {WORK_ITEM_TTL}
    # 250 rows noted in three transactions of at most 100, not 250 writes.
    assert world.table.calls["submit_transaction"] == 3 and world.table.calls["update_entity"] == 0


def test_the_fan_out_notes_each_hundred_items_while_it_sends_the_rest() -> None:
    world = world_with(250)
    noted = threading.Event()
    waited_in_vain: list[int] = []

    class NotingTable(CountingTable):
        def submit_transaction(self, operations: Any, **kwargs: Any) -> Any:
            noted.set()
            return super().submit_transaction(operations, **kwargs)

    class SlowQueue(WorkQueue):
        def send_message(self, content: Any, **kwargs: Any) -> None:
            with self._lock:
                sent = len(self.items)
            # The sends after the first hundred and a few wait for that hundred's note: a fan-out that notes only
            # after its last send would keep them waiting.
            if sent >= 120 and not noted.wait(timeout=5):
                waited_in_vain.append(sent)
            super().send_message(content, **kwargs)

    world.table.__class__ = NotingTable
    assert world.collector().fan_out(world.registry.list(), SlowQueue()) == 250
    assert not waited_in_vain
    assert all(m.work_item for m in world.registry.list()) and world.table.calls["submit_transaction"] == 3


def test_a_collected_item_lets_the_next_tick_send_again() -> None:
    world = world_with(3)
    collector, work = world.collector(), WorkQueue()
    collector.fan_out(world.registry.list(), work)
    first, second, third = work.take()

    assert collector.collect_work_item(first) is not None
    world.leases.taken.add(Mailbox("m001@example.test").key)  # another run holds the second mailbox
    busy = collector.collect_work_item(second)
    assert busy is not None and busy.outcome == "busy"
    collector.fan_out(world.registry.list(), work)

    # The first mailbox's item ended; the busy one ends when its holder's run ends, the third one waits still.
    assert [i["mailbox"] for i in work.items] == ["m000@example.test"]
    assert third


def test_a_failed_collection_ends_its_item_too() -> None:
    world = world_with(1)
    world.tokens.error = TransientError("token service unavailable for a test")
    collector, work = world.collector(), WorkQueue()
    collector.fan_out(world.registry.list(), work)
    (item,) = work.take()

    result = collector.collect_work_item(item)
    assert result is not None and result.outcome == "transient"
    row = world.registry.get("m000@example.test")
    assert row.consecutive_failures == 1 and row.work_item_done == row.work_item
    assert collector.fan_out(world.registry.list(), work) == 1


def test_an_item_lost_on_the_queue_is_replaced_once_its_time_to_live_is_over() -> None:
    world = world_with(2)
    collector, work = world.collector(), WorkQueue()
    collector.fan_out(world.registry.list(), work)
    work.take()  # lost: expired untaken, or taken by an instance that died

    assert collector.fan_out(world.registry.list(), work) == 0
    expired = utcnow() - timedelta(seconds=1)
    for row in world.registry.list():
        world.registry.record_work_items([(row.address, row.work_item, expired)])
    assert collector.fan_out(world.registry.list(), work) == 2


def test_a_mailbox_revoked_before_its_item_is_noted_is_not_written_again() -> None:
    world = world_with(3)
    listed = world.registry.list()
    world.registry.delete("m001@example.test")

    assert world.collector().fan_out(listed, WorkQueue()) == 3
    assert sorted(m.address for m in world.registry.list()) == ["m000@example.test", "m002@example.test"]
    assert all(m.work_item for m in world.registry.list())


def test_an_empty_run_from_the_listing_reads_nothing_and_writes_its_success_now_and_then() -> None:
    world = World(table=CountingTable())
    world.registry.put(Mailbox(ADDRESS))
    collector = world.collector()
    collector.collect_mailbox(world.registry.get(ADDRESS), deadline=world.clock() + 100)  # the first success
    world.table.calls.clear()

    listed = world.registry.list()
    assert [r.outcome for r in collector.run(listed)] == ["ok"]
    assert world.table.calls == {"query_entities": 1}, "an empty run read or wrote its row"

    old = utcnow() - SUCCESS_RECORD_EVERY
    world.table.rows[("mailbox", Mailbox(ADDRESS).key)]["last_success_at"] = old
    collector.run(world.registry.list())
    assert world.registry.get(ADDRESS).last_success_at > old


def test_a_run_an_admin_asked_for_records_its_success_even_when_it_found_nothing() -> None:
    world = World(table=CountingTable())
    world.registry.put(Mailbox(ADDRESS))
    collector = world.collector()
    collector.collect_mailbox(world.registry.get(ADDRESS), deadline=world.clock() + 100)  # the first success
    first = world.registry.get(ADDRESS).last_success_at

    collector.collect_mailbox(world.registry.get(ADDRESS), deadline=world.clock() + 100)
    assert world.registry.get(ADDRESS).last_success_at == first, "a timer run with nothing new writes nothing"
    collector.collect_mailbox(world.registry.get(ADDRESS), deadline=world.clock() + 100, asked=True)
    assert world.registry.get(ADDRESS).last_success_at > first, "the status page shows the run it was asked for"


def test_a_listing_taken_before_another_run_collected_is_read_again_and_nothing_is_queued_twice() -> None:
    world = World(table=CountingTable())
    world.registry.put(Mailbox(ADDRESS))
    uids = [world.server.deliver(mail(f"m{i}")) for i in range(3)]
    collector = world.collector()
    listed = world.registry.list()
    collector.collect_mailbox(world.registry.get(ADDRESS), deadline=world.clock() + 100)  # another run, meanwhile
    world.server.deliver(mail("new"))

    (result,) = collector.run(listed)
    assert result.messages == 1
    assert Counter(world.queue.ids()) == {f"{ADDRESS}/7/{uid}": 1 for uid in [*uids, 4]}
    row = world.registry.get(ADDRESS)
    assert (row.last_uid, row.collected_total) == (4, 4)


class SavingTokens(FakeTokens):
    """Every access token is a renewal that reached Key Vault (the daily rewrite of the token cache)."""

    def access_token(
        self, address: str, *, signed_in_as: str, deadline: float | None = None, secret_name: str = ""
    ) -> AccessToken:
        self.calls.append(address)
        return AccessToken("access-token-for-tests", 0.0, renewed=True, saved_at=utcnow())


def test_a_run_that_saves_its_token_and_finds_mail_logs_in_once() -> None:
    # The token save changes the row between the listing and the read under the lease; that alone must not start the
    # run again (a second token, a second Key Vault write, a second login).
    world = World(table=CountingTable(), tokens=SavingTokens())
    world.registry.put(Mailbox(ADDRESS))
    world.server.deliver(mail("new"))

    (result,) = world.collector().run(world.registry.list())
    assert result.messages == 1
    assert world.tokens.calls == [ADDRESS]
    assert world.source.opened == 1
    assert world.registry.get(ADDRESS).token_saved_at is not None


def test_a_mailbox_paused_after_the_listing_is_not_collected() -> None:
    world = World()
    world.registry.put(Mailbox(ADDRESS))
    world.server.deliver(mail("waiting"))
    listed = world.registry.list()
    world.registry.set_status(ADDRESS, MailboxStatus.PAUSED)

    (result,) = world.collector().run(listed)
    assert result.outcome == "deferred" and world.queue.ids() == []


def test_a_work_item_reads_its_row_once_under_the_lease_and_writes_once() -> None:
    world = world_with(1)
    collector, work = world.collector(), WorkQueue()
    collector.fan_out(world.registry.list(), work)
    (item,) = work.take()
    world.table.calls.clear()

    result = collector.collect_work_item(item)
    assert result is not None and result.outcome == "ok"
    assert world.table.calls == {"get_entity": 1, "update_entity": 1}
