"""Benchmark 8, round trips: how many times one collector run over one mailbox waits for the IMAP server, counted
by the latency proxy (``--report-turns``) between the collector and Dovecot.

Two runs of ``Collector.run``: over a mailbox with nothing new, and over one with one new message. The proxy counts
the client's turns on each connection (data sent after an answer reached the client); the TLS 1.3 handshake's own
turn (the client's Finished after the server's flight) is taken off, so the figure is the round trips after the
handshake, the wait for the greeting included. The baseline is the count before the wire work (recorded with the
same benchmark at that commit, see RESULTS.md): the wire has no switch back to the old command sequence.
"""

from __future__ import annotations

import random
from typing import Any

from bench.common import KB, Row, Workspace, make_message, say
from bench.latency_proxy import LatencyProxy

GOAL_EMPTY = 3
TLS_HANDSHAKE_TURNS = 1  # TLS 1.3: the client's Finished, sent after the server's first flight
BEFORE = {"empty": 8, "one new message": 11}  # recorded at the commit before the wire work (RESULTS.md)


def _run_once(ws: Workspace, proxy: LatencyProxy, expected: int) -> int:
    results = ws.services.collector.run()
    if [r.outcome for r in results] != ["ok"] or sum(r.messages for r in results) != expected:
        raise RuntimeError(f"the run did not collect {expected} message(s): {results}")
    return proxy.turns() - TLS_HANDSHAKE_TURNS


def run(info: dict[str, Any]) -> list[Row]:
    proxy = LatencyProxy(info["ports"]["imaps"], delay_ms=10, report_turns=True)
    with proxy as port:
        ws = Workspace(info, "round-trips", IMAP_PORT=str(port))
        try:
            address = ws.address("rtt")
            ws.consent([address])
            _run_once(ws, proxy, 0)  # the first run selects the folder for the first time and records its checkpoint
            counts = {"empty": _run_once(ws, proxy, 0)}
            ws.deliver(address, [make_message(20 * KB, serial=1, rng=random.Random(8))])
            counts["one new message"] = _run_once(ws, proxy, 1)
        finally:
            ws.close()
    say(f"round trips: {counts} (before: {BEFORE})")
    return [
        Row(
            f"8 round trips, {case}",
            f"{count} round trips",
            f"{BEFORE[case]} before the wire work",
            count / BEFORE[case],
            f"<= {GOAL_EMPTY}" if case == "empty" else "-",
            count <= GOAL_EMPTY if case == "empty" else count < BEFORE[case],
            "one Collector.run over one mailbox through the latency proxy, after the TLS handshake, greeting included",
        )
        for case, count in counts.items()
    ]
