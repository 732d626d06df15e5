"""Benchmark 5, Key Vault economy: reads per mailbox-hour and writes per mailbox-day at a 5-minute schedule on a
warm worker.

One Services object (a warm worker) runs the collector 12 times per simulated hour for a few mailboxes, over a
little more than a simulated day, with the Entra stand-in issuing access tokens of 60 to 90 minutes (Entra's
random lifetime) and rotating refresh tokens without revoking the redeemed one. The token service writes a renewed
cache only when the stored one is a day old, so the steady-state day (every hour after the first) holds one write
per mailbox and the disabling of the version before: two writes. Time is simulated instead of waited for: the token
service and MSAL read the clock through ``time.time``, and this benchmark moves their clock forward five minutes
before each run (the stand-in's tokens, Dovecot and TLS keep real time, which only makes tokens look older than
they are). Key Vault operations are counted by the local Key Vault endpoint for these mailboxes' secrets only, so
other users of the shared stack do not disturb the figures. The first simulated hour starts with a cold worker
(right after consent); the read goal applies to every hour, the write goal to the 24 hours after the first.

A second part does the same over APP_HOURS for app-mode mailboxes (client credentials, one app token per tenant)
and counts every operation the Key Vault endpoint serves meanwhile, whatever the secret: the goal is none at all.
"""

from __future__ import annotations

import contextlib
import time
import types
from collections.abc import Iterator
from typing import Any

from bench.common import Row, Workspace, _session, say

RUN_EVERY = 300  # seconds: the default COLLECT_SCHEDULE "0 */5 * * * *"
GOAL_READS = 2.0  # per mailbox and hour, every hour
GOAL_WRITES_PER_DAY = 2.0  # per mailbox in the steady-state day: a new version and the disabling of the one before
GOAL_APP_OPERATIONS = 0
HOURS = 26  # the cold first hour, a steady-state day, and an hour to spare
APP_HOURS = 3  # app-mode mailboxes never touch Key Vault: a few hours show it


class ShiftedClock(types.SimpleNamespace):
    """Stands in for the ``time`` module inside the modules that read the wall clock for token expiry."""

    def __init__(self) -> None:
        super().__init__()
        self.offset = 0.0

    def time(self) -> float:
        return time.time() + self.offset

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@contextlib.contextmanager
def shifted_clock() -> Iterator[ShiftedClock]:
    import msal.application
    import msal.token_cache

    import collectors.app_tokens
    import collectors.tokens

    clock = ShiftedClock()
    modules = (collectors.tokens, collectors.app_tokens, msal.application, msal.token_cache)
    saved = [m.time for m in modules]  # type: ignore[attr-defined]
    for module in modules:
        module.time = clock  # type: ignore[attr-defined]
    try:
        yield clock
    finally:
        for module, original in zip(modules, saved, strict=True):
            module.time = original  # type: ignore[attr-defined]


def run(info: dict[str, Any], *, mailboxes: int = 5, hours: int = HOURS) -> list[Row]:
    app_hours = min(hours, APP_HOURS)
    return [
        *run_delegated(info, mailboxes=mailboxes, hours=hours),
        *run_app(info, mailboxes=mailboxes, hours=app_hours),
    ]


def run_delegated(info: dict[str, Any], *, mailboxes: int, hours: int) -> list[Row]:
    from shared.mailboxes import mailbox_key

    ws = Workspace(info, "keyvault")
    session = _session(info)
    try:
        addresses = [ws.address(f"kv{i}") for i in range(mailboxes)]
        ws.consent(addresses)
        names = {mailbox_key(a).lower() for a in addresses}

        def counts() -> tuple[int, int]:
            stats = session.get(f"{info['key_vault_uri']}/_control/stats", timeout=10).json()
            mine = [v for k, v in stats.get("by_secret", {}).items() if k in names]
            return sum(v["reads"] for v in mine), sum(v["writes"] for v in mine)

        per_hour: list[tuple[int, int]] = []
        collector = ws.services.collector
        with shifted_clock() as clock:
            for _hour in range(hours):
                reads0, writes0 = counts()
                for _run in range(3600 // RUN_EVERY):
                    results = collector.run()
                    failed = [r for r in results if r.outcome != "ok"]
                    if failed or len(results) != mailboxes:
                        raise RuntimeError(f"a collection run failed: {failed or results}")
                    clock.offset += RUN_EVERY
                reads1, writes1 = counts()
                per_hour.append((reads1 - reads0, writes1 - writes0))
        worst_reads = max(r for r, _ in per_hour) / mailboxes
        # Steady state: the 24 hours after the cold first hour (consent wrote the first version before it).
        day = per_hour[1:25]
        writes_per_day = sum(w for _, w in day) / mailboxes
        hourly = ", ".join(f"{r / mailboxes:.1f}/{w / mailboxes:.1f}" for r, w in per_hour)
        say(f"key vault: reads/writes per mailbox, hour by hour: {hourly}")
        met = worst_reads <= GOAL_READS and writes_per_day <= GOAL_WRITES_PER_DAY and len(day) == 24
        return [
            Row(
                "5 Key Vault per mailbox",
                f"{worst_reads:.1f} reads an hour (worst hour), {writes_per_day:.1f} writes a day",
                "-",
                None,
                f"<= {GOAL_READS:.0f} reads an hour, <= {GOAL_WRITES_PER_DAY:.0f} writes a day (steady state)",
                met,
                f"{mailboxes} mailboxes, {hours} simulated hours of 12 runs on one warm worker, Entra's 60-90 minute "
                f"tokens; reads/writes per mailbox by hour: {hourly}",
            )
        ]
    finally:
        session.close()
        ws.close()


def run_app(info: dict[str, Any], *, mailboxes: int, hours: int) -> list[Row]:
    """App-mode mailboxes: every Key Vault operation during the simulated hours counts against them."""
    from pathlib import Path

    from devstack import dovecot
    from devstack.stack import app_object_id

    ws = Workspace(info, "keyvault-app")
    session = _session(info)
    try:
        addresses = [ws.address(f"kvapp{i}") for i in range(mailboxes)]
        dovecot.grant_app(Path(info["dovecot_config"]), app_object_id(info), *addresses)
        for address in addresses:
            ws.services.app_mailboxes.add(address, {}, admin="benchmark")
        mailbox_rows = [ws.services.registry.get(a) for a in addresses]

        def operations() -> int:
            stats = session.get(f"{info['key_vault_uri']}/_control/stats", timeout=10).json()
            return int(stats["reads"]) + int(stats["writes"]) + int(stats["challenges"])

        per_hour: list[int] = []
        collector = ws.services.collector
        with shifted_clock() as clock:
            for _hour in range(hours):
                before = operations()
                for _run in range(3600 // RUN_EVERY):
                    results = collector.run(mailbox_rows)
                    failed = [r for r in results if r.outcome != "ok"]
                    if failed or len(results) != mailboxes:
                        raise RuntimeError(f"a collection run failed: {failed or results}")
                    clock.offset += RUN_EVERY
                per_hour.append(operations() - before)
        worst = max(per_hour) / mailboxes
        hourly = ", ".join(f"{n / mailboxes:.1f}" for n in per_hour)
        say(f"key vault: operations per app-mode mailbox, hour by hour: {hourly}")
        return [
            Row(
                "5b Key Vault per app-mode mailbox-hour",
                f"{worst:.1f} operations (worst hour)",
                "-",
                None,
                f"{GOAL_APP_OPERATIONS} operations",
                worst <= GOAL_APP_OPERATIONS,
                f"{mailboxes} app-mode mailboxes, {hours} simulated hours of 12 runs on one warm worker; every "
                f"operation the vault served counted (reads, writes, challenges); per mailbox by hour: {hourly}",
            )
        ]
    finally:
        session.close()
        ws.close()
