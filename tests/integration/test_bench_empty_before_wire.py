"""Benchmark 6d against the old path, small, against the real local parts: the commit before the wire work taken
from git and the current tree each run in a process of their own through the latency proxy, and a mailbox that
fails on one side stops the benchmark with no ratio (here: one shared mailbox left without its Full Access grant,
so its IMAP login is refused as Exchange refuses a delegate without the permission)."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

import devstack.dovecot
from bench import empty_before_wire
from bench.common import ROOT, OwnKeyVault
from tests.support.stack import Stack


def _baseline_in_history() -> bool:
    found = subprocess.run(
        ["git", "-C", str(ROOT), "cat-file", "-e", f"{empty_before_wire.BASELINE}^{{commit}}"],
        capture_output=True,
        check=False,
    )
    return found.returncode == 0


# The old side's code comes from git: a shallow clone (CI systems often make one) lacks it.
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not _baseline_in_history(),
        reason=f"commit {empty_before_wire.BASELINE} is not in this clone's history (git fetch --unshallow)",
    ),
]


def test_both_sides_run_and_give_a_ratio(stack: Stack) -> None:
    with OwnKeyVault(stack.info) as info:
        [row] = empty_before_wire.run(info, mailboxes=3, rounds=1)
    assert row.ratio is not None and row.ratio > 0
    assert row.bench.startswith("6d empty run, 3 mailboxes, 20 ms RTT, against 03e5b7d")
    assert "median of" in row.figure and "before the wire work, median of" in row.baseline


def test_a_mailbox_failing_on_one_side_stops_it_without_a_ratio(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    real = devstack.dovecot.grant_full_access_to_all
    grants: list[Sequence[str]] = []

    def grant_all_but_the_new_sides_last(config: Path, delegate: str, mailboxes: Sequence[str], **kw: Any) -> None:
        if not kw.get("revoke"):
            grants.append(mailboxes)
            if len(grants) == 2:  # the sides are set up old, then new
                mailboxes = mailboxes[:-1]
        real(config, delegate, mailboxes, **kw)

    monkeypatch.setattr(devstack.dovecot, "grant_full_access_to_all", grant_all_but_the_new_sides_last)
    with OwnKeyVault(stack.info) as info, pytest.raises(empty_before_wire.MailboxFailed) as failed:
        empty_before_wire.run(info, mailboxes=3, rounds=1)
    left_out = grants[1][-1]
    last = empty_before_wire.WARM_RUNS + empty_before_wire.WARM_RETRIES  # a failing mailbox is given more warm-ups
    assert f"new side, warm-up {last}: 1 of 3 mailboxes failed" in str(failed.value)
    assert left_out in str(failed.value)
