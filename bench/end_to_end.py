"""Benchmark 2, end to end: the collector against a straight sequential loop doing the same work.

The collector does everything a run does for a mailbox: lease, registry, token, IMAP, raw bytes to blobs,
envelopes to the queue, the after-action (\\Seen) and the checkpoint. The floor, measured in the same run, does
only the same fetches (one FETCH after the other) and the same blob and queue writes, one after another. Whatever
the collector gains comes from overlapping I/O. Runs alternate; the figures are medians.
"""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime
from typing import Any

from bench.common import KB, MB, Row, Timer, Workspace, make_message, median, say

GOAL = 1.3
SETS = (
    ("2,000 x 20 KB", 2000, 20 * KB),
    ("20 x 2 MB", 20, 2 * MB),
    ("1 x 25 MB", 1, 25 * MB),
    ("1 x 150 MB", 1, 150 * MB),
)
LARGE = 100 * MB  # a set of messages this large gets ``repeat`` rounds, not three times as many (each takes seconds)


def floor(ws: Workspace, mailbox: Any) -> int:
    """Fetch every message, write its blob, then its envelope, strictly one thing at a time. Returns bytes."""
    from azure.storage.blob import ContentSettings

    from collectors.collect import Collector, blob_name
    from collectors.envelope import build_envelope, encode_for_queue
    from collectors.imap_session import ImapSession
    from shared import azure_clients

    settings = ws.settings
    address = mailbox.address
    container = azure_clients.container(settings, settings.mail_container)
    queue = azure_clients.queue(settings, settings.mail_queue)
    token = ws.services.tokens.access_token(address, signed_in_as=mailbox.signed_in_as).token
    total = 0
    with ImapSession(
        settings.imap_host, settings.imap_port, address=address, access_token=token, ca_bundle=settings.ca_bundle
    ) as imap:
        uidvalidity = imap.select("INBOX", sizes_after=0)
        sizes = imap.new_sizes(0)
        for uids in Collector._plan(sizes, mailbox.options.max_messages, mailbox.options.max_bytes):
            messages = imap.fetch(uids)
            for uid in uids:
                raw = messages[uid]
                name = blob_name(mailbox.key, uidvalidity, uid)
                blob = container.get_blob_client(name)
                blob.upload_blob(raw, overwrite=True, content_settings=ContentSettings(content_type="message/rfc822"))
                envelope = build_envelope(
                    raw,
                    mailbox=address,
                    folder="INBOX",
                    uidvalidity=uidvalidity,
                    uid=uid,
                    blob_url=blob.url,
                    blob_name=name,
                    collected_at=datetime.now(UTC),
                )
                queue.send_message(encode_for_queue(envelope))
                total += len(raw)
    return total


def collect(ws: Workspace, mailbox: Any) -> int:
    result = ws.services.collector.collect_mailbox(mailbox, deadline=time.monotonic() + 3600)
    if result.outcome != "ok":
        raise RuntimeError(f"collection of {mailbox.address} failed: {result.outcome} {result.error}")
    return result.bytes


def run(info: dict[str, Any], *, scale: float = 1.0, repeat: int = 3) -> list[Row]:
    """``scale`` multiplies the message count of the first set (2,000 x 20 KB)."""
    ws = Workspace(info, "end-to-end")
    rows = []
    try:
        rng = random.Random(2)
        sets = [(label, max(1, int(count * scale)) if i == 0 else count, size) for i, (label, count, size) in
                enumerate(SETS)]  # fmt: skip
        addresses = [ws.address(f"e2e{i}") for i in range(len(sets))]
        ws.consent(addresses, max_messages="100000", max_bytes=str(4 * 1024**3))
        for address, (_, count, size) in zip(addresses, sets, strict=True):
            ws.deliver(address, (make_message(size, serial=i, rng=rng) for i in range(count)))
        for address, (label, count, size) in zip(addresses, sets, strict=True):
            collect(ws, ws.services.registry.get(address))  # warm-up: token, connections, Dovecot, page cache
            floors, runs = [], []
            # The sets of few messages take a second: more rounds; the largest takes many seconds a round.
            rounds = repeat if count > 100 or size >= LARGE else 3 * repeat
            for _ in range(rounds):
                # The mailbox's row is read before the clock starts, as a run lists all rows once; the collector
                # still reads it again under the lease, as it always does.
                ws.reset_checkpoint(address)
                ws.clear_queue()
                mailbox = ws.services.registry.get(address)
                timer = Timer()
                expected = floor(ws, mailbox)
                floors.append(timer.elapsed())
                ws.reset_checkpoint(address)
                ws.clear_queue()
                mailbox = ws.services.registry.get(address)
                timer = Timer()
                got = collect(ws, mailbox)
                runs.append(timer.elapsed())
                if got != expected:
                    raise RuntimeError(f"collector stored {got} bytes, the floor {expected}")
            ratio = median(floors) / median(runs)
            say(f"end to end {label}: collector {median(runs):.2f} s, floor {median(floors):.2f} s")
            shown = label if count == dict((lbl, c) for lbl, c, _ in SETS)[label] else f"{count} x {size // KB} KB"
            rows.append(
                Row(
                    f"2 end to end, {shown}",
                    f"{median(runs):.2f} s ({count / median(runs):.0f} msg/s)",
                    f"sequential {median(floors):.2f} s",
                    ratio,
                    f">= {GOAL}x",
                    ratio >= GOAL,
                    f"median of {rounds} alternating runs; ratio = floor time / collector time",
                )
            )
        return rows
    finally:
        ws.close()
