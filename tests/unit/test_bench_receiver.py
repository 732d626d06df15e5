"""The latency benchmark's raw reader stops at the tagged answer however the bytes are cut into records."""

from __future__ import annotations

from typing import Any

import pytest

from bench.latency import _Receiver

ANSWER = b"* 1 FETCH (UID 1 BODY[] {5}\r\nhello)\r\nf0 OK Fetch completed (0.001 + 0.000 secs).\r\n"


class _Records:
    def __init__(self, records: list[bytes]) -> None:
        self._records = records

    def recv_into(self, view: Any) -> int:
        if not self._records:
            raise AssertionError("read past the answer")
        record = self._records.pop(0)
        view[: len(record)] = record
        return len(record)


@pytest.mark.parametrize("cut", range(1, len(ANSWER)))
def test_the_answer_is_found_wherever_the_records_are_cut(cut: int) -> None:
    receiver = _Receiver(_Records([ANSWER[:cut], ANSWER[cut:]]), len(ANSWER))  # type: ignore[arg-type]
    receiver.until(b"\r\nf0 OK")
    assert receiver.received == len(ANSWER)


def test_the_tag_and_the_rest_of_its_line_in_records_of_their_own() -> None:
    head, tail = ANSWER.split(b"f0 OK")
    records = [head, b"f0 OK", tail[:10], tail[10:]]
    receiver = _Receiver(_Records(records), len(ANSWER))  # type: ignore[arg-type]
    receiver.until(b"\r\nf0 OK")
    assert receiver.received == len(ANSWER)


def test_a_line_ending_before_the_tag_does_not_stop_it() -> None:
    head = ANSWER[: ANSWER.index(b"f0 OK")]
    receiver = _Receiver(_Records([head, ANSWER[len(head) :]]), len(ANSWER))  # type: ignore[arg-type]
    receiver.until(b"\r\nf0 OK")
    assert receiver.received == len(ANSWER)
