"""The retry delays of a failed mail-queue message: growing, capped, within the queue's limits and its expiry."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from azure.core.exceptions import HttpResponseError

from consumers.glpi import retries
from consumers.glpi.service import MAX_DEQUEUE_COUNT


class _Queue:
    """Records visibility updates (the real queue is exercised in tests/integration/test_glpi_consumer.py)."""

    def __init__(self, error: Exception | None = None) -> None:
        self.updates: list[tuple[str, str, int]] = []
        self.error = error

    def update_message(self, message_id: str, pop_receipt: str, *, visibility_timeout: int) -> Any:
        if self.error is not None:
            raise self.error
        self.updates.append((message_id, pop_receipt, visibility_timeout))


def test_the_delay_grows_with_the_dequeue_count_up_to_the_cap() -> None:
    assert [retries.retry_delay(n) for n in range(1, 7)] == [60, 300, 1500, 7200, 7200, 7200]


def test_the_time_before_poison_is_what_the_readme_says() -> None:
    # 1 + 5 + 25 + 120 minutes between the five attempts: 2 h 31 min.
    assert retries.total_before_poison(MAX_DEQUEUE_COUNT) == (60 + 300 + 1500 + 7200) == 9060


@pytest.mark.parametrize("count", [0, -1, -(10**9), 10**9, 2**63])
def test_hostile_dequeue_counts_stay_within_one_minute_and_the_cap(count: int) -> None:
    delay = retries.retry_delay(count)
    assert retries.BASE_SECONDS <= delay <= retries.MAX_SECONDS


def test_retry_after_lengthens_a_delay_but_never_past_the_cap() -> None:
    assert retries.retry_delay(1, retry_after=90.2) == 91
    assert retries.retry_delay(2, retry_after=90) == 300  # shorter than the schedule: the schedule wins
    assert retries.retry_delay(1, retry_after=10**12) == retries.MAX_SECONDS


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -5.0, 0.0])
def test_hostile_retry_after_values_are_ignored(value: float) -> None:
    assert retries.retry_delay(1, retry_after=value) == 60


def test_defer_sets_the_visibility_with_the_given_pop_receipt() -> None:
    queue = _Queue()
    assert retries.defer(queue, "m1", "pop1", dequeue_count=2) == 300
    assert queue.updates == [("m1", "pop1", 300)]


def test_a_delay_ends_before_the_message_expires_or_is_left_to_the_host() -> None:
    now = datetime(2026, 11, 30, 3, 0, tzinfo=UTC)
    queue = _Queue()
    seconds = retries.defer(queue, "m", "p", dequeue_count=4, expires_on=now + timedelta(minutes=10), now=now)
    assert seconds == 600 - retries.EXPIRY_MARGIN_SECONDS
    assert queue.updates == [("m", "p", 540)]
    late = _Queue()
    assert retries.defer(late, "m", "p", dequeue_count=1, expires_on=now + timedelta(seconds=30), now=now) is None
    assert late.updates == []  # the host's own delay applies


def test_storage_refusing_the_update_leaves_the_host_delay() -> None:
    queue = _Queue(HttpResponseError(message="PopReceiptMismatch"))
    assert retries.defer(queue, "m", "p", dequeue_count=1) is None
