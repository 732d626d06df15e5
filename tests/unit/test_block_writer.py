"""The block writer of a streamed message against a fake blob client: blocks of the set size in order, a bounded
number staged at once, the commit naming every block with the mail's content type, and nothing committed when the
writer is aborted or a block fails (the real Azurite path is in tests/integration/test_collect.py)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from azure.core.exceptions import ServiceRequestError

from collectors.sinks import BlockWriter
from shared.errors import TransientError


class FakeBlob:
    def __init__(self, *, fail_at: int | None = None, hold: threading.Event | None = None) -> None:
        self.staged: dict[str, bytes] = {}
        self.committed: list[str] | None = None
        self.content_type = ""
        self.in_flight = 0
        self.most_in_flight = 0
        self._fail_at = fail_at
        self._hold = hold
        self._lock = threading.Lock()

    def stage_block(self, block_id: str, data: bytes) -> None:
        with self._lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self._hold is not None:
                self._hold.wait(10)
            if self._fail_at is not None and int(block_id) == self._fail_at:
                raise ServiceRequestError("connection reset")
            self.staged[block_id] = data
        finally:
            with self._lock:
                self.in_flight -= 1

    def commit_block_list(self, blocks: list[Any], *, content_settings: Any) -> None:
        self.committed = [block.id for block in blocks]
        self.content_type = content_settings.content_type

    def content(self) -> bytes:
        assert self.committed is not None
        return b"".join(self.staged[block_id] for block_id in self.committed)


@pytest.fixture
def pool() -> Any:
    with ThreadPoolExecutor(8) as executor:
        yield executor


def test_the_bytes_go_up_in_blocks_of_the_set_size_and_are_committed_in_order(pool: ThreadPoolExecutor) -> None:
    blob = FakeBlob()
    writer = BlockWriter(blob, pool, name="m.eml", block_bytes=10, in_flight=2)
    data = bytes(range(256)) * 3
    for start in range(0, len(data), 7):  # chunks that straddle the block borders
        writer.write(data[start : start + 7])
    writer.commit()
    assert blob.content() == data
    assert blob.committed == [f"{i:08d}" for i in range((len(data) + 9) // 10)]
    assert {len(blob.staged[i]) for i in blob.committed[:-1]} == {10}
    assert blob.content_type == "message/rfc822"
    assert blob.most_in_flight <= 2


def test_no_more_blocks_are_staged_at_once_than_allowed(pool: ThreadPoolExecutor) -> None:
    hold = threading.Event()
    blob = FakeBlob(hold=hold)
    writer = BlockWriter(blob, pool, name="m.eml", block_bytes=4, in_flight=3)
    writing = threading.Thread(target=lambda: writer.write(b"x" * 40), daemon=True)
    writing.start()
    writing.join(0.3)
    assert writing.is_alive(), "the writer must wait while its blocks in flight are all taken"
    assert blob.in_flight == 3
    hold.set()
    writing.join(10)
    writer.commit()
    assert blob.content() == b"x" * 40 and blob.most_in_flight == 3


def test_a_failed_block_is_a_transient_error_and_nothing_is_committed(pool: ThreadPoolExecutor) -> None:
    blob = FakeBlob(fail_at=1)
    writer = BlockWriter(blob, pool, name="m.eml", block_bytes=4, in_flight=1)
    with pytest.raises(TransientError, match=r"storage write failed for m\.eml"):
        writer.write(b"y" * 12)
        writer.commit()
    writer.abort()
    assert blob.committed is None


def test_an_aborted_writer_commits_nothing(pool: ThreadPoolExecutor) -> None:
    blob = FakeBlob()
    writer = BlockWriter(blob, pool, name="m.eml", block_bytes=4, in_flight=2)
    writer.write(b"z" * 10)
    writer.abort()
    assert blob.committed is None
