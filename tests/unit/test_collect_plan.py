from __future__ import annotations

from collectors.collect import BATCH_BYTES, BATCH_MESSAGES, Collector, blob_name


def plan(sizes: dict[int, int], max_messages: int = 1000, max_bytes: int = 10**12) -> list[list[int]]:
    return list(Collector._plan(sizes, max_messages, max_bytes))


def test_batches_are_in_uid_order_and_bounded_by_count() -> None:
    sizes = {uid: 100 for uid in range(120, 0, -1)}
    batches = plan(sizes)
    assert [uid for b in batches for uid in b] == list(range(1, 121))
    assert all(len(b) <= BATCH_MESSAGES for b in batches)


def test_batches_are_bounded_by_bytes_but_a_big_message_goes_alone() -> None:
    sizes = {1: 1000, 2: BATCH_BYTES * 2, 3: 1000}
    assert plan(sizes) == [[1], [2], [3]]


def test_per_run_caps_leave_the_rest_for_next_time() -> None:
    sizes = {uid: 10 for uid in range(1, 11)}
    assert sum(map(len, plan(sizes, max_messages=4))) == 4
    assert [u for b in plan(sizes, max_bytes=35) for u in b] == [1, 2, 3]


def test_the_first_message_is_taken_even_above_the_byte_cap() -> None:
    assert plan({7: 500, 8: 1}, max_bytes=100) == [[7]]


def test_blob_names_derive_from_identity_only() -> None:
    assert blob_name("mbx-a", 42, 7) == "mbx-a/42/0000000007.eml"
    # A retried upload must hit the same blob, and no two messages may share one: every part of the identity counts.
    names = {blob_name(key, v, uid) for key in ("mbx-a", "mbx-b") for v in (42, 43) for uid in (7, 70, 2**32 - 1)}
    assert len(names) == 12


def test_blob_names_list_in_uid_order() -> None:
    # The zero padding makes a container listing come back in UID order (UIDs are unsigned 32-bit).
    uids = [1, 9, 10, 99, 100, 12345, 2**32 - 1]
    assert sorted(blob_name("mbx-a", 42, uid) for uid in uids) == [blob_name("mbx-a", 42, uid) for uid in uids]
