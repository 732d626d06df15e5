"""Carry the Functions invocation onto the threads the app starts, so that their log lines reach the log.

The Python worker tags a log record with its invocation id only on the invocation's own thread, and the Functions
host drops records whose id matches no running invocation (Microsoft's Python developer reference, "Logging from
created threads"). The collector writes its per-mailbox line, its warnings and its exceptions from pool threads,
so each task handed to a pool is wrapped by ``carried``: on whatever thread it runs, it first sets
``context.thread_local_storage.invocation_id`` to the invocation that created it. Outside a Functions invocation
(the command line, tests) nothing is bound and ``carried`` returns the callable unchanged.

No import of ``azure.functions`` here: the entry point hands in the two values it reads from its ``context``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class _Binding:
    thread_local_storage: Any  # the worker's thread-local: context.thread_local_storage
    invocation_id: str


_current: contextvars.ContextVar[_Binding | None] = contextvars.ContextVar("invocation", default=None)


@contextlib.contextmanager
def invocation(thread_local_storage: Any, invocation_id: str) -> Iterator[None]:
    """Bind the running invocation for the block: tasks wrapped by ``carried`` inside it log under this id."""
    token = _current.set(_Binding(thread_local_storage, invocation_id))
    try:
        yield
    finally:
        _current.reset(token)


def carried(function: Callable[P, R]) -> Callable[P, R]:
    """``function``, made to log under the invocation bound where it is wrapped, on whatever thread it runs.

    Wrap at submission (``pool.submit(carried(f), ...)``): pool threads outlive invocations, so the id is set for
    each task and put back afterwards, never once per thread."""
    binding = _current.get()
    if binding is None:
        return function

    @functools.wraps(function)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        storage = binding.thread_local_storage
        previous = getattr(storage, "invocation_id", None)
        storage.invocation_id = binding.invocation_id
        token = _current.set(binding)  # tasks this one submits are carried too
        try:
            return function(*args, **kwargs)
        finally:
            _current.reset(token)
            storage.invocation_id = previous

    return run
