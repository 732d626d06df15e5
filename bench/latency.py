"""Benchmark 1, latency hiding: IMAP fetch throughput through a proxy that adds 20 ms of round-trip time.

Baseline: the standard library's ``imaplib`` over TLS, SASL XOAUTH2, ``UID SEARCH`` then ``UID FETCH`` of 50 UIDs
per command with ``BODY.PEEK[]``. Collector: ``ImapSession`` exactly as the collector drives it (select, UIDs
above the checkpoint, their sizes, the batch plan, one FETCH per batch with the next one already sent). Both log
in, through the same proxy, to the same mailbox, and the runs alternate; the figure is the median.
"""

from __future__ import annotations

import imaplib
import random
import ssl
from typing import Any

from bench.common import KB, Row, Timer, Workspace, make_message, median, say
from bench.latency_proxy import LatencyProxy

GOAL = 0.8
BASELINE_BATCH = 50  # UIDs per FETCH command in the baseline


def fetch_with_imaplib(port: int, address: str, token: str, ca_bundle: str) -> int:
    """Bytes of every message in INBOX, fetched 50 UIDs per command. The plain reference client."""
    context = ssl.create_default_context(cafile=ca_bundle)
    sasl = f"user={address}\x01auth=Bearer {token}\x01\x01".encode()
    total = 0
    with imaplib.IMAP4_SSL("localhost", port, ssl_context=context) as imap:
        imap.authenticate("XOAUTH2", lambda _challenge: sasl)
        imap.select("INBOX")
        _, found = imap.uid("SEARCH", "UID", "1:*")
        uids = found[0].split()
        for start in range(0, len(uids), BASELINE_BATCH):
            chunk = b",".join(uids[start : start + BASELINE_BATCH]).decode()
            status, data = imap.uid("FETCH", chunk, "(BODY.PEEK[])")
            if status != "OK":
                raise RuntimeError(f"UID FETCH answered {status}")
            total += sum(len(part[1]) for part in data if isinstance(part, tuple))
        imap.logout()
    return total


def fetch_like_the_collector(port: int, address: str, token: str, ca_bundle: str) -> int:
    from collectors.collect import Collector
    from collectors.imap_session import ImapSession
    from shared.registry import MailboxOptions

    options = MailboxOptions(max_messages=100_000, max_bytes=10 * 1024**3)
    total = 0
    with ImapSession("localhost", port, address=address, access_token=token, ca_bundle=ca_bundle) as imap:
        imap.select(options.folder)
        sizes = imap.sizes(imap.uids_after(0))
        batches = Collector._plan(sizes, options.max_messages, options.max_bytes)
        for _, messages in imap.fetch_batches(batches):
            total += sum(len(raw) for raw in messages.values())
    return total


def run(info: dict[str, Any], *, messages: int = 2000, size: int = 20 * KB, repeat: int = 3) -> list[Row]:
    ws = Workspace(info, "latency")
    try:
        address = ws.address("latency")
        ws.consent([address], max_messages="100000")
        rng = random.Random(1)
        ws.deliver(address, (make_message(size, serial=i, rng=rng) for i in range(messages)))
        row = ws.services.registry.get(address)
        token = ws.services.tokens.access_token(address, signed_in_as=row.signed_in_as).token
        ca = info["ca_bundle"]
        baseline: list[float] = []
        collector: list[float] = []
        with LatencyProxy(info["ports"]["imaps"], delay_ms=10) as port:
            fetch_with_imaplib(port, address, token, ca)  # warm the page cache and Dovecot's index once
            for _ in range(repeat):
                timer = Timer()
                got = fetch_with_imaplib(port, address, token, ca)
                baseline.append(timer.elapsed())
                timer = Timer()
                mine = fetch_like_the_collector(port, address, token, ca)
                collector.append(timer.elapsed())
                if got != mine:
                    raise RuntimeError(f"the two clients fetched different byte counts ({got} and {mine})")
        mb = got / (1024 * 1024)
        base_rate, mine_rate = mb / median(baseline), mb / median(collector)
        say(f"latency: imaplib {base_rate:.1f} MB/s, collector {mine_rate:.1f} MB/s over {messages} messages")
        return [
            Row(
                "1 latency hiding (20 ms RTT)",
                f"{mine_rate:.1f} MB/s ({messages / median(collector):.0f} msg/s)",
                f"imaplib 50/FETCH {base_rate:.1f} MB/s",
                mine_rate / base_rate,
                f">= {GOAL}x",
                mine_rate / base_rate >= GOAL,
                f"{messages} x {size // KB} KB, median of {repeat} alternating runs, login included",
            )
        ]
    finally:
        ws.close()
