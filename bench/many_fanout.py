"""Benchmark 6b, many mailboxes across instances: the timer's fan-out of 2,000 mailboxes with 5 new messages each,
collected by two worker processes (two local Functions hosts taking the work items from the Azurite queue, as two
Flex Consumption instances would), against one mailbox with the same 10,000 messages collected by one worker.

Also timed, first: the empty run over the 2,000 mailboxes (planning and fan-out, then every item collected), which
must fit within one 5-minute schedule period (benchmark 6c; ``per_mailbox=0`` measures it alone). The empty run at
20 ms RTT is benchmark 6d (``bench/empty_before_wire.py``).

The 2,000 mailboxes are set up, by default, as shared mailboxes of one account: that account's own mailbox is
authorized through the real consent flow, and the other rows are written straight into the registry, each signed in
as that account (Full Access granted in Dovecot, as Add-MailboxPermission does) and reading its token cache from the
account's one Key Vault secret. The real flow takes about a second per mailbox on these machines, 2,000 of them most
of an hour; the collection does the same work either way (a lease, a Key Vault read on a cold worker, an IMAP
login as the signed-in account with ``user=`` the mailbox). ``consents="real"`` authorizes each mailbox instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import (
    KB,
    OUT,
    ROOT,
    Row,
    Timer,
    Workspace,
    deliver_maildir,
    free_port,
    make_message,
    say,
    sync_mailboxes,
)
from bench.many_mailboxes import collect_all

GOAL = 1.5  # fan-out time over the single mailbox's
PERIOD_SECONDS = 300.0  # the default schedule, every 5 minutes
WORKERS = 2
START_SECONDS = 60.0
STALLED_SECONDS = 60.0  # no new envelope for this long with the work queue empty: the items left have expired


@contextlib.contextmanager
def _workers(ws: Workspace, count: int, folder: Path) -> Iterator[None]:
    """``count`` local Functions hosts on the workspace's settings, the timer off (the benchmark plays the tick)."""
    folder.mkdir(parents=True, exist_ok=True)
    settings = folder / f"{ws.tag}.settings.json"
    env = {**ws.env, "AzureWebJobs.collect_mail.Disabled": "true"}
    settings.write_text(json.dumps({"IsEncrypted": False, "Values": env}))
    settings.chmod(0o600)
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(count):
            port = free_port()
            command = [sys.executable, "-m", "devstack.host", "--settings", str(settings), "--port", str(port)]
            log = (folder / f"{ws.tag}-{port}.log").open("wb")
            processes.append(subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
            deadline = time.monotonic() + START_SECONDS
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/admin/host/ping", timeout=1).close()
                    break
                except OSError:
                    if processes[-1].poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"worker host did not start; see {log.name}") from None
                    time.sleep(0.2)
        yield
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        settings.unlink(missing_ok=True)


def _fan_out_and_drain(ws: Workspace, expected: int) -> tuple[float, float]:
    """The tick's planning (list, due, fan-out) and then the wait until every work item is settled and the expected
    envelopes are on the queue. Returns (planning seconds, total seconds)."""
    from collectors.collect import WORK_ITEM_TTL
    from collectors.scheduled import run_scheduled
    from shared import azure_clients

    work = ws.services.work_queue()
    mail = azure_clients.queue(ws.settings, ws.settings.mail_queue)
    timer = Timer()
    run_scheduled(ws.services, past_due=False)
    planning = timer.elapsed()
    last, last_change = -1, time.monotonic()
    while True:
        pending = work.get_queue_properties().approximate_message_count
        queued = mail.get_queue_properties().approximate_message_count
        if pending == 0 and queued >= expected:
            break
        if queued != last:
            last, last_change = queued, time.monotonic()
        elif pending == 0 and time.monotonic() - last_change > STALLED_SECONDS:
            # Items the hosts did not take within their time to live expire; the next tick would send them again.
            raise RuntimeError(
                f"fan-out stalled with {queued} of {expected} envelopes queued and the work queue empty: the rest of "
                f"the work items expired untaken after their {WORK_ITEM_TTL} s time to live"
            )
        time.sleep(0.25)
    total = timer.elapsed()
    failed = [m.address for m in ws.services.registry.list() if m.last_error_class]
    if failed or queued != expected:
        raise RuntimeError(f"fan-out run queued {queued} of {expected} envelopes; failed: {failed[:3]}")
    return planning, total


def _seed_shared(ws: Workspace, addresses: list[str]) -> tuple[float, str]:
    """Authorize ``addresses[0]`` through the real flow and register the others as its shared mailboxes (see the
    module's docstring). Returns the seconds it took and how, for the report."""
    from devstack.dovecot import grant_full_access_to_all
    from shared.mailboxes import mailbox_key

    timer = Timer()
    owner, shared = addresses[0], addresses[1:]
    ws.consent([owner])
    row = ws.services.registry.get(owner)
    template = dataclasses.replace(row, signed_in_as=owner, token_secret=row.token_secret or mailbox_key(owner))
    grant_full_access_to_all(Path(ws.info["dovecot_config"]), owner, shared)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda a: ws.services.registry.put(dataclasses.replace(template, address=a)), shared))
    return timer.elapsed(), f"1 real consent, {len(shared)} shared mailboxes of it written to the registry"


def _unseed_shared(ws: Workspace, addresses: list[str]) -> None:
    from devstack.dovecot import grant_full_access_to_all

    grant_full_access_to_all(Path(ws.info["dovecot_config"]), addresses[0], addresses[1:], revoke=True)


def _load() -> str:
    return "/".join(f"{n:.1f}" for n in os.getloadavg())


def run(
    info: dict[str, Any],
    *,
    mailboxes: int = 2000,
    per_mailbox: int = 5,
    consents: str = "seeded",
) -> list[Row]:
    many = Workspace(info, "fan-out")
    one = Workspace(info, "one-worker")
    folder = OUT / "fan-out"
    rows: list[Row] = []
    loads = [_load()]
    addresses = [many.address(f"f{i:04d}") for i in range(mailboxes)]
    seeded = consents == "seeded" and mailboxes > 1
    try:
        if seeded:
            consent_seconds, how = _seed_shared(many, addresses)
        else:
            consent_seconds, how = many.consent(addresses), f"{mailboxes} real consents"
        say(f"fan-out: {how} in {consent_seconds:.0f} s (load {loads[0]})")

        with _workers(many, WORKERS, folder):
            # The first tick after the mailboxes arrive also creates each one's lease blob and has each host read its
            # token cache; every later tick is the second one's kind, and that one is the benchmark.
            first_planning, first_seconds = _fan_out_and_drain(many, 0)
            empty_planning, empty_seconds = _fan_out_and_drain(many, 0)
            loads.append(_load())
            say(
                f"fan-out: empty run over {mailboxes} in {empty_seconds:.1f} s (planning {empty_planning:.1f} s); "
                f"the first tick {first_seconds:.1f} s (planning {first_planning:.1f} s)"
            )
            if per_mailbox:
                rows.append(_fan_out_against_one(info, many, one, addresses, per_mailbox, loads, how, consent_seconds))
        rows.append(
            Row(
                f"6c empty run, {mailboxes} mailboxes over {WORKERS} workers",
                f"{empty_seconds:.1f} s (planning {empty_planning:.1f} s)",
                f"one schedule period {PERIOD_SECONDS:.0f} s",
                empty_seconds / PERIOD_SECONDS,
                "<= 1x",
                empty_seconds <= PERIOD_SECONDS,
                f"from the tick's start until every work item is settled, the second tick; the first (lease blobs "
                f"created, token caches read) {first_seconds:.1f} s, planning {first_planning:.1f} s",
            )
        )
    finally:
        if seeded:
            _unseed_shared(many, addresses)
        many.close()
        one.close()
    return rows


def _fan_out_against_one(
    info: dict[str, Any],
    many: Workspace,
    one: Workspace,
    addresses: list[str],
    per_mailbox: int,
    loads: list[str],
    how: str,
    consent_seconds: float,
) -> Row:
    """Benchmark 6b, with the worker hosts up: ``per_mailbox`` new messages in each mailbox, fanned out, against the
    same number of messages in one mailbox collected by one worker."""
    mailboxes, total = len(addresses), len(addresses) * per_mailbox
    single = one.address("single")
    one.consent([single], max_messages=str(total), max_bytes=str(4 * 1024**3))
    collect_all(one, 0)

    rng = random.Random(66)
    serial = iter(range(1, 1 << 30))
    for address in addresses:
        deliver_maildir(
            info, address, (make_message(20 * KB, serial=next(serial), rng=rng) for _ in range(per_mailbox))
        )
    sync_mailboxes(info, addresses)
    one.deliver(single, (make_message(20 * KB, serial=next(serial), rng=rng) for _ in range(total)))

    before = collect_all(one, total)
    planning, many_seconds = _fan_out_and_drain(many, total)
    one.reset_checkpoint(single)
    one.clear_queue()
    after = collect_all(one, total)
    loads.append(_load())
    one_seconds = (before + after) / 2
    ratio = many_seconds / one_seconds
    say(f"fan-out: {mailboxes} x {per_mailbox} in {many_seconds:.1f} s, 1 x {total} in {one_seconds:.1f} s")
    return Row(
        f"6b fan-out, {mailboxes} x {per_mailbox} over {WORKERS} workers",
        f"{many_seconds:.1f} s ({total / many_seconds:.0f} msg/s; planning {planning:.1f} s)",
        f"1 x {total} on one worker in {one_seconds:.1f} s (mean of {before:.1f} and {after:.1f})",
        ratio,
        f"<= {GOAL}x",
        ratio <= GOAL,
        f"{WORKERS} local Functions hosts on the Azurite work queue, 20 KB messages; "
        f"mailboxes set up as {how} in {consent_seconds:.0f} s; load average (1/5/15 min) "
        f"{', then '.join(loads)}",
    )
