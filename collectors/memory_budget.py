"""A worker's memory budget for mail in hand, shared by the mailboxes it collects at once.

A batch of messages held whole, or a streamed message's working set, reserves its bytes before it is fetched and
gives them back once it is stored and queued. Work that does not fit waits, first come first served, so a large
message is not passed over forever by a stream of small batches. An item larger than the whole budget waits until
nothing else holds any and then runs alone: it never waits for bytes that can never be free.

The budget never deadlocks as long as a holder never waits for more while it holds some (the collector finishes
its pending batch, releasing it, before it waits for the next one).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque


class Reservation:
    """Bytes taken from a budget; ``release`` gives them back (once, however often it is called)."""

    def __init__(self, budget: MemoryBudget, amount: int) -> None:
        self._budget = budget
        self.amount = amount
        self._released = False
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self._budget._give_back(self.amount)


class MemoryBudget:
    """``total`` bytes to share; ``take`` reserves some, waiting its turn when they are not free."""

    def __init__(self, total: int) -> None:
        if total < 1:
            raise ValueError(f"a memory budget must be at least 1 byte, not {total}")
        self.total = total
        self._free = total
        self._turns: deque[int] = deque()  # tickets of the takers waiting, oldest first
        self._tickets = itertools.count()
        self._changed = threading.Condition()

    @property
    def free(self) -> int:
        with self._changed:
            return self._free

    def take(self, amount: int, *, wait: bool = True, timeout: float | None = None) -> Reservation | None:
        """Reserve ``amount`` bytes (at most the whole budget: a larger item runs alone). Without ``wait``, only if
        they are free now and nobody is waiting; with it, waits its turn, up to ``timeout`` seconds (None: no limit).
        Returns None when the bytes were not had."""
        if amount < 0:
            raise ValueError(f"cannot reserve a negative amount ({amount})")
        amount = min(amount, self.total)
        with self._changed:
            if not self._turns and amount <= self._free:
                self._free -= amount
                return Reservation(self, amount)
            if not wait:
                return None
            ticket = next(self._tickets)
            self._turns.append(ticket)
            ends = None if timeout is None else time.monotonic() + timeout
            try:
                while self._turns[0] != ticket or amount > self._free:
                    left = None if ends is None else ends - time.monotonic()
                    if left is not None and left <= 0:
                        return None
                    self._changed.wait(left)
                self._free -= amount
                return Reservation(self, amount)
            finally:
                self._turns.remove(ticket)
                self._changed.notify_all()  # the next in line may fit now, or be first now

    def _give_back(self, amount: int) -> None:
        with self._changed:
            self._free += amount
            self._changed.notify_all()
