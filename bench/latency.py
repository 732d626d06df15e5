"""Benchmark 1, latency hiding: IMAP fetch throughput through a proxy that adds 20 ms, then 80 ms, of round-trip
time.

Baselines: the standard library's ``imaplib`` over TLS, SASL XOAUTH2, ``UID SEARCH`` then ``UID FETCH`` of 50 UIDs
per command with ``BODY.PEEK[]``; and the link's ceiling, one ``UID FETCH 1:* (BODY.PEEK[])`` over a plain TLS
socket read into a buffer without parsing. Collector: ``ImapSession`` exactly as the collector drives it (select
with the new UIDs' sizes, the batch plan, FETCHes requested ahead). All three log in, through the same proxy, to
the same mailbox, and the runs alternate; the figure is the median.
"""

from __future__ import annotations

import base64
import imaplib
import random
import socket
import ssl
from typing import Any

from bench.common import KB, Row, Timer, Workspace, make_message, median, say
from bench.latency_proxy import LatencyProxy

GOAL = 0.8  # the collector over imaplib's 50-UID batches
CEILING_GOAL = 0.8  # the collector over the raw ceiling
RTTS_MS = (20, 80)  # Exchange Online is 20 to 80 ms from an Azure region
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


def _read_until(tls: ssl.SSLSocket, buffer: bytearray, end: bytes) -> None:
    """Receive into ``buffer`` until it ends with ``end``, a tagged answer's line; only the tail is looked at."""
    chunk = memoryview(bytearray(1 << 18))  # one receive buffer: a fresh 1 MB object per TLS record would cost more
    while not (buffer.endswith(b"\r\n") and end in buffer[-4096:]):
        received = tls.recv_into(chunk)
        if not received:
            raise RuntimeError("the server closed the connection")
        buffer += chunk[:received]


def fetch_raw(port: int, address: str, token: str, ca_bundle: str) -> int:
    """Bytes received for one ``UID FETCH 1:* (BODY.PEEK[])``, unparsed: what the link carries at best."""
    context = ssl.create_default_context(cafile=ca_bundle)
    sasl = base64.b64encode(f"user={address}\x01auth=Bearer {token}\x01\x01".encode())
    with (
        socket.create_connection(("localhost", port)) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buffer = bytearray()
        _read_until(tls, buffer, b"* OK")
        tls.sendall(b"r1 AUTHENTICATE XOAUTH2 " + sasl + b"\r\n")
        _read_until(tls, buffer, b"r1 OK")
        buffer.clear()
        tls.sendall(b"r2 SELECT INBOX\r\nr3 UID FETCH 1:* (BODY.PEEK[])\r\n")
        _read_until(tls, buffer, b"\r\nr3 OK")
        tls.sendall(b"r4 LOGOUT\r\n")
        return len(buffer)


def fetch_like_the_collector(port: int, address: str, token: str, ca_bundle: str) -> int:
    from collectors.collect import Collector
    from collectors.imap_session import ImapSession
    from shared.registry import MailboxOptions

    options = MailboxOptions(max_messages=100_000, max_bytes=10 * 1024**3)
    total = 0
    with ImapSession("localhost", port, address=address, access_token=token, ca_bundle=ca_bundle) as imap:
        imap.select(options.folder, sizes_after=0)
        sizes = imap.new_sizes(0)
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
        rows = [_measure(info, address, token, rtt, messages, size, repeat) for rtt in RTTS_MS]
        return [row for pair in rows for row in pair]
    finally:
        ws.close()


def _measure(
    info: dict[str, Any], address: str, token: str, rtt_ms: int, messages: int, size: int, repeat: int
) -> list[Row]:
    ca = info["ca_bundle"]
    times: dict[str, list[float]] = {"imaplib": [], "ceiling": [], "collector": []}
    with LatencyProxy(info["ports"]["imaps"], delay_ms=rtt_ms / 2) as port:
        got = fetch_with_imaplib(port, address, token, ca)  # warm the page cache and Dovecot's index once
        for _ in range(repeat):
            for name, client in (
                ("imaplib", fetch_with_imaplib),
                ("ceiling", fetch_raw),
                ("collector", fetch_like_the_collector),
            ):
                timer = Timer()
                count = client(port, address, token, ca)
                times[name].append(timer.elapsed())
                if name != "ceiling" and count != got:
                    raise RuntimeError(f"{name} fetched {count} bytes, imaplib {got}")
                if name == "ceiling" and count < got:
                    raise RuntimeError(f"the raw FETCH received {count} bytes, less than the {got} of the bodies")
    mb = got / (1024 * 1024)
    rate = {name: mb / median(values) for name, values in times.items()}
    say(
        f"latency {rtt_ms} ms: imaplib {rate['imaplib']:.1f} MB/s, ceiling {rate['ceiling']:.1f} MB/s, "
        f"collector {rate['collector']:.1f} MB/s over {messages} messages"
    )
    note = f"{messages} x {size // KB} KB, median of {repeat} alternating runs, login included"
    figure = f"{rate['collector']:.1f} MB/s ({messages / median(times['collector']):.0f} msg/s)"
    over_imaplib = rate["collector"] / rate["imaplib"]
    over_ceiling = rate["collector"] / rate["ceiling"]
    return [
        Row(
            f"1 latency hiding ({rtt_ms} ms RTT)",
            figure,
            f"imaplib 50/FETCH {rate['imaplib']:.1f} MB/s",
            over_imaplib,
            f">= {GOAL}x",
            over_imaplib >= GOAL,
            note,
        ),
        Row(
            f"1 link ceiling ({rtt_ms} ms RTT)",
            figure,
            f"raw UID FETCH 1:* {rate['ceiling']:.1f} MB/s",
            over_ceiling,
            f">= {CEILING_GOAL}x",
            over_ceiling >= CEILING_GOAL,
            note,
        ),
    ]
