"""The worker's memory budget: reservations, waiting in turn, release on every path, an item larger than the whole
budget running alone, and the collector keeping mail in hand within it (against the in-memory fakes)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import collectors.collect as collect_module
from collectors.memory_budget import MemoryBudget, Reservation
from shared.errors import RunOutcome, TransientError
from shared.registry import Mailbox, MailboxOptions
from tests.mail_corpus import plain
from tests.support.fakes import World

MB = 1024 * 1024
WAIT = 10.0  # seconds a test thread may take to reach its point; only a broken budget makes a test wait this long


def started(target: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """``target`` on its own thread; its return value lands in the list."""
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(target()), daemon=True)
    thread.start()
    return thread, out


def waiting(budget: MemoryBudget, count: int) -> None:
    """Until ``count`` takers wait their turn (the budget's queue, not a sleep, says so)."""
    ends = time.monotonic() + WAIT
    while len(budget._turns) < count:
        assert time.monotonic() < ends, "the taker never started waiting"
        time.sleep(0.001)


def test_a_reservation_takes_its_bytes_and_gives_them_back_once() -> None:
    budget = MemoryBudget(100)
    first = budget.take(60)
    assert first is not None and first.amount == 60 and budget.free == 40
    assert budget.take(41, wait=False) is None, "more than is free must not be taken"
    first.release()
    first.release()  # a second release must not hand the bytes out twice
    assert budget.free == 100


def test_a_taker_that_does_not_fit_waits_until_bytes_are_released() -> None:
    budget = MemoryBudget(100)
    held = budget.take(80)
    assert held is not None
    thread, out = started(lambda: budget.take(50))
    waiting(budget, 1)
    assert out == [] and budget.free == 20
    held.release()
    thread.join(WAIT)
    (got,) = out
    assert isinstance(got, Reservation) and budget.free == 50


def test_a_wait_ends_at_its_timeout_with_nothing_taken() -> None:
    budget = MemoryBudget(100)
    held = budget.take(100)
    assert held is not None
    assert budget.take(1, timeout=0.05) is None
    assert budget.free == 0 and not budget._turns, "a taker that gave up must leave the queue"
    held.release()
    assert budget.free == 100


def test_an_item_larger_than_the_budget_runs_alone_and_never_waits_forever() -> None:
    budget = MemoryBudget(100)
    small = budget.take(10)
    assert small is not None
    thread, out = started(lambda: budget.take(1_000))
    waiting(budget, 1)
    assert out == [], "it must wait for the others to finish"
    small.release()
    thread.join(WAIT)
    (huge,) = out
    assert huge is not None and huge.amount == 100 and budget.free == 0, "it runs alone, holding the whole budget"
    assert budget.take(1, wait=False) is None
    huge.release()
    assert budget.free == 100


def test_a_large_taker_is_not_passed_over_by_later_small_ones() -> None:
    budget = MemoryBudget(100)
    held = budget.take(60)
    assert held is not None
    large_thread, large = started(lambda: budget.take(90))
    waiting(budget, 1)
    assert budget.take(20, wait=False) is None, "bytes are free, but an earlier taker waits for them"
    small_thread, small = started(lambda: budget.take(20))
    waiting(budget, 2)
    held.release()
    large_thread.join(WAIT)
    assert large and large[0] is not None and small == [], "the earlier, larger taker goes first"
    large[0].release()
    small_thread.join(WAIT)
    assert small and small[0] is not None


def test_nonsense_amounts_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 1 byte"):
        MemoryBudget(0)
    with pytest.raises(ValueError, match="negative"):
        MemoryBudget(10).take(-1)


# -- the collector within its budget ---------------------------------------------------------------------------


class Watched(MemoryBudget):
    """A budget that records the most it ever had out at once."""

    def __init__(self, total: int) -> None:
        super().__init__(total)
        self.peak = 0

    def take(self, amount: int, *, wait: bool = True, timeout: float | None = None) -> Reservation | None:
        got = super().take(amount, wait=wait, timeout=timeout)
        self.peak = max(self.peak, self.total - self.free)
        return got


def message(subject: str, size: int) -> bytes:
    return plain(("Subject", subject), body="x" * size + "\r\n")


def register(world: World, address: str) -> Mailbox:
    world.registry.put(Mailbox(address, options=MailboxOptions.from_mapping({"max_bytes": str(1024**3)})))
    return world.registry.get(address)


@pytest.fixture
def small_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages of 64 KiB and more are streamed, each streamed one costing 64 KiB of budget."""
    monkeypatch.setattr(collect_module, "STREAM_ABOVE", 64 * 1024)
    monkeypatch.setattr(collect_module, "STREAM_WORKING_SET", 64 * 1024)


def test_a_streamed_message_cut_in_its_bytes_gives_its_budget_back_and_commits_nothing(small_stream: None) -> None:
    budget = Watched(4 * MB)
    world = World(budget=budget)
    register(world, "a@contoso.example")
    world.server.deliver(message("small", 100))
    big = world.server.deliver(message("big", 200_000))
    world.faults.at(f"cut:{big}", TransientError("IMAP connection to imap.example was lost"))

    result = world.collector().collect_mailbox(world.registry.get("a@contoso.example"), deadline=100)

    assert result.outcome is RunOutcome.TRANSIENT
    assert budget.free == budget.total and budget.peak > 0
    (writer,) = world.raw.writers
    assert writer.state == "aborted" and writer.name not in world.raw.blobs
    assert [m["uid"] for m in world.queue.messages] == [1], "only the message before the cut is queued"
    assert world.registry.get("a@contoso.example").last_uid == 1, "the message before the cut is checkpointed"


def test_a_failed_storage_write_gives_the_batch_budget_back() -> None:
    budget = Watched(4 * MB)
    world = World(budget=budget)
    register(world, "a@contoso.example")
    for i in range(3):
        world.server.deliver(message(f"m{i}", 1000))
    world.faults.at("put:2", TransientError("storage write failed"))

    result = world.collector().collect_mailbox(world.registry.get("a@contoso.example"), deadline=100)

    assert result.outcome is RunOutcome.TRANSIENT
    assert budget.peak > 0
    ends = time.monotonic() + WAIT
    while budget.free != budget.total:  # given back when the storage task ends, which the failure does not await
        assert time.monotonic() < ends, "the failed batch kept its share of the budget"
        time.sleep(0.001)


def test_mailboxes_sharing_a_small_budget_wait_for_it_and_all_finish(small_stream: None) -> None:
    """Four mailboxes at once, each with small batches and large streamed messages, under a budget that holds two
    streamed messages (or one batch of two small ones): they take turns, the budget is never overdrawn, and every
    message is collected."""
    budget = Watched(128 * 1024)
    world = World(budget=budget)
    addresses = [f"box{i}@contoso.example" for i in range(4)]
    for address in addresses:
        register(world, address)
    sent = []
    for i in range(3):
        sent.append(world.server.deliver(message(f"small {i}", 30_000)))
        sent.append(world.server.deliver(message(f"big {i}", 100_000)))
    collector = world.collector()
    results = collector.run([world.registry.get(a) for a in addresses], budget_seconds=60)

    # The fake server is one folder for all four: the first to take a mailbox's lease collects, the others share
    # it under their own addresses; every run ends, none waits forever.
    assert all(r.outcome is RunOutcome.OK for r in results), [r.error for r in results]
    assert budget.peak <= budget.total and budget.free == budget.total
    assert sum(r.messages for r in results) == 4 * len(sent)


def test_a_batch_larger_than_the_whole_budget_is_still_collected() -> None:
    budget = Watched(64 * 1024)
    world = World(budget=budget)
    register(world, "a@contoso.example")
    raws = [message(f"m{i}", 50_000) for i in range(3)]
    for raw in raws:
        world.server.deliver(raw)

    result = world.collector().collect_mailbox(world.registry.get("a@contoso.example"), deadline=100)

    assert (result.outcome, result.messages) == (RunOutcome.OK, 3)
    assert budget.peak == budget.total and budget.free == budget.total
    assert sorted(world.raw.blobs.values()) == sorted(raws)
