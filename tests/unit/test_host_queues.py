"""The local host's queue trigger: how long a taken message stays hidden while its function runs, and how many
messages it processes at once (``batchSize`` plus ``newBatchThreshold``, a new batch taken while others run)."""

from __future__ import annotations

import base64
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest

from devstack.host import HostError
from devstack.host.queues import (
    QUEUE_PROCESSING_VISIBILITY_SECONDS,
    VISIBILITY_SETTING,
    QueueRunner,
    processing_visibility,
)
from devstack.host.settings import HostOptions


def test_a_taken_message_stays_hidden_for_azure_s_ten_minutes_by_default() -> None:
    assert processing_visibility({}) == QUEUE_PROCESSING_VISIBILITY_SECONDS == 600
    assert processing_visibility({VISIBILITY_SETTING: " "}) == 600


def test_the_local_setting_shortens_it_for_tests() -> None:
    assert processing_visibility({VISIBILITY_SETTING: "75"}) == 75


@pytest.mark.parametrize("value", ["0", "-5", "601", "1.5", "ten", "75s", "1e3", "٣"])
def test_a_bad_visibility_setting_stops_the_host_with_the_range(value: str) -> None:
    with pytest.raises(HostError, match="whole number of seconds from 1 to 600"):
        processing_visibility({VISIBILITY_SETTING: value})


class _Queue:
    """The receive and delete calls of a queue client, over messages in memory."""

    def __init__(self, count: int) -> None:
        self._lock = threading.Lock()
        self.waiting = [
            SimpleNamespace(id=str(n), content=base64.b64encode(str(n).encode()).decode(), dequeue_count=1,
                            expires_on=None, inserted_on=None, next_visible_on=None, pop_receipt=f"r{n}")
            for n in range(count)
        ]  # fmt: skip
        self.deleted: list[str] = []

    def receive_messages(self, *, max_messages: int, **_: Any) -> list[Any]:
        with self._lock:
            taken, self.waiting = self.waiting[:max_messages], self.waiting[max_messages:]
            return taken

    def delete_message(self, message_id: str, pop_receipt: str) -> None:
        with self._lock:
            self.deleted.append(message_id)


class _Invoker:
    """Runs each message for a while (message 0 for long) and records how many ran at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.running = 0
        self.most = 0
        self.finished: list[str] = []

    def call(self, entry: Any, message: Any) -> Any:
        body = message.get_body().decode()
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(3.0 if body == "0" else 0.05)
        with self._lock:
            self.running -= 1
            self.finished.append(body)
        return SimpleNamespace(error=None, context=SimpleNamespace(invocation_id=body), duration_ms=0)


def test_a_new_batch_is_taken_while_a_slow_message_runs_up_to_batch_size_plus_the_threshold() -> None:
    options = HostOptions.from_host_json({"extensions": {"queues": {"batchSize": 4, "newBatchThreshold": 2}}})
    invoker = _Invoker()
    host = SimpleNamespace(stopping=threading.Event(), options=options, invoker=invoker)
    entry = SimpleNamespace(name="collect_work", trigger_type="queueTrigger")
    runner = QueueRunner(host, entry, "unused", "work")  # type: ignore[arg-type]
    queue = _Queue(20)
    runner._queue = queue
    runner.start()
    deadline = time.monotonic() + 30
    while len(queue.deleted) < 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    host.stopping.set()
    runner.join(timeout=10)

    assert sorted(queue.deleted, key=int) == [str(n) for n in range(20)]
    # The slow first message held back none of the others: each later batch was taken while it ran.
    assert invoker.finished[-1] == "0"
    assert 4 < invoker.most <= 6


def test_the_new_batch_threshold_defaults_to_half_the_batch_and_refuses_nonsense() -> None:
    assert HostOptions.from_host_json({"extensions": {"queues": {"batchSize": 16}}}).new_batch_threshold == 8
    for bad in (-1, "2", True, 1.5):
        with pytest.raises(HostError, match="newBatchThreshold"):
            HostOptions.from_host_json({"extensions": {"queues": {"newBatchThreshold": bad}}})
