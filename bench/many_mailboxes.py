"""Benchmark 6, many mailboxes: 500 mailboxes with 10 new messages each in one run, against the same number of
messages in one mailbox, each collected by one ``Collector.run`` (the timer's work) on a warm worker.

Both workers are warmed by an empty run first (tokens read once, connections open), as a worker is between two
timer ticks. The single mailbox is collected before and after the 500, and the baseline is the mean of the two.
The consents of the 500 mailboxes go through the real flow (start, the Entra stand-in's sign-in pages, callback),
eight at a time; their duration is reported too.
"""

from __future__ import annotations

import random
from typing import Any

from bench.common import KB, Row, Timer, Workspace, deliver_maildir, make_message, say, sync_mailboxes

GOAL = 2.0


def collect_all(ws: Workspace, expected: int) -> float:
    timer = Timer()
    results = ws.services.collector.run()
    seconds = timer.elapsed()
    bad = [r for r in results if r.outcome != "ok" or r.more]
    collected = sum(r.messages for r in results)
    if bad or collected != expected:
        raise RuntimeError(f"run collected {collected} of {expected} messages; failed: {bad[:3]}")
    return seconds


def run(info: dict[str, Any], *, mailboxes: int = 500, per_mailbox: int = 10, size: int = 20 * KB) -> list[Row]:
    many = Workspace(info, "many-mailboxes")
    one = Workspace(info, "one-mailbox")
    total = mailboxes * per_mailbox
    try:
        addresses = [many.address(f"m{i:04d}") for i in range(mailboxes)]
        consent_seconds = many.consent(addresses)
        say(f"many mailboxes: {mailboxes} consents in {consent_seconds:.0f} s")
        single = one.address("single")
        one.consent([single], max_messages=str(total), max_bytes=str(4 * 1024**3))

        empty_seconds = collect_all(many, 0)
        collect_all(one, 0)

        rng = random.Random(6)
        serial = iter(range(1, 1 << 30))
        for address in addresses:
            deliver_maildir(
                info, address, (make_message(size, serial=next(serial), rng=rng) for _ in range(per_mailbox))
            )
        sync_mailboxes(info, addresses)
        one.deliver(single, (make_message(size, serial=next(serial), rng=rng) for _ in range(total)))

        # The single mailbox is collected before and after the 500 (its checkpoint reset in between), so that a
        # change of load on the shared machine during the long run weighs on both sides.
        before = collect_all(one, total)
        many_seconds = collect_all(many, total)
        one.reset_checkpoint(single)
        one.clear_queue()
        after = collect_all(one, total)
        one_seconds = (before + after) / 2
        ratio = many_seconds / one_seconds
        say(f"many mailboxes: {mailboxes} x {per_mailbox} in {many_seconds:.1f} s, 1 x {total} in {one_seconds:.1f} s")
        return [
            Row(
                f"6 many mailboxes, {mailboxes} x {per_mailbox}",
                f"{many_seconds:.1f} s ({total / many_seconds:.0f} msg/s)",
                f"1 x {total} in {one_seconds:.1f} s (mean of {before:.1f} and {after:.1f})",
                ratio,
                f"<= {GOAL:.0f}x",
                ratio <= GOAL,
                f"one run each on a warm worker, COLLECT_MAX_CONCURRENCY={many.settings.max_concurrency}, "
                f"{size // KB} KB messages; an empty run over the {mailboxes} mailboxes took {empty_seconds:.1f} s; "
                f"their consents took {consent_seconds:.0f} s",
            )
        ]
    finally:
        many.close()
        one.close()
