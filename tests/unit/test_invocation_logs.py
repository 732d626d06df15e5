"""Tasks handed to pools carry the invocation that created them, as the Functions host needs to keep their logs."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from shared import invocation_logs


def _seen(storage: threading.local) -> str | None:
    return getattr(storage, "invocation_id", None)


def test_a_carried_task_logs_under_its_invocation_on_a_pool_thread_and_leaves_the_thread_clean() -> None:
    storage = threading.local()
    with ThreadPoolExecutor(1) as pool:
        with invocation_logs.invocation(storage, "inv-1"):
            inner = pool.submit(invocation_logs.carried(_seen), storage).result()
            plain = pool.submit(_seen, storage).result()
        after = pool.submit(_seen, storage).result()
    assert (inner, plain, after) == ("inv-1", None, None)


def test_tasks_submitted_by_a_carried_task_are_carried_too() -> None:
    storage = threading.local()
    with ThreadPoolExecutor(1) as outer, ThreadPoolExecutor(1) as inner:

        def submit_more() -> str | None:
            return inner.submit(invocation_logs.carried(_seen), storage).result()

        with invocation_logs.invocation(storage, "inv-2"):
            assert outer.submit(invocation_logs.carried(submit_more)).result() == "inv-2"


def test_outside_an_invocation_nothing_is_wrapped() -> None:
    assert invocation_logs.carried(_seen) is _seen
