"""The stand-ins' fault queue: faults a test adds over a stand-in's control route, each answering the next ``count``
matching requests (``-1``: every one until cleared), in the order they were added."""

from __future__ import annotations

import threading
from typing import Generic, Protocol, TypeVar


class Fault(Protocol):
    count: int
    served: int

    def matches(self, method: str, target: str | None) -> bool: ...


F = TypeVar("F", bound=Fault)


class FaultQueue(Generic[F]):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: list[F] = []

    def add(self, fault: F) -> None:
        with self._lock:
            self._queue.append(fault)

    def take(self, method: str, target: str | None) -> F | None:
        """The first live fault matching the request, charged one use."""
        with self._lock:
            for fault in self._queue:
                if fault.count != 0 and fault.matches(method, target):
                    if fault.count > 0:
                        fault.count -= 1
                    fault.served += 1
                    return fault
            return None

    def clear(self) -> int:
        """Drop every fault; how many still had uses left."""
        with self._lock:
            live = sum(1 for f in self._queue if f.count != 0)
            self._queue.clear()
            return live

    def faults(self) -> list[F]:
        with self._lock:
            return list(self._queue)
