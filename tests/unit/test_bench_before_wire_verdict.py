"""Benchmark 6d against the old path: its verdict (medians, ratio new / old, the goal) and its refusal to report a
ratio when a mailbox failed on either side. The whole benchmark against the real stack and the old tree is in
tests/integration/test_bench_empty_before_wire.py."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest

from bench import empty_before_wire as bench
from bench.empty_side import Side


def answer(seconds: float = 1.0, mailboxes: int = 500, failed: list[str] | None = None) -> dict[str, Any]:
    failed = failed or []
    return {"seconds": seconds, "mailboxes": mailboxes, "failures": len(failed), "failed": failed}


def test_a_whole_run_gives_its_seconds() -> None:
    assert bench.check_run("new", "timed run 1", answer(7.25), 500) == 7.25


def test_a_failed_mailbox_stops_the_benchmark_naming_side_run_and_mailbox() -> None:
    with pytest.raises(bench.MailboxFailed, match=r"old side, timed run 2: 1 of 500 .*x@example.test: transient"):
        bench.check_run("old", "timed run 2", answer(failed=["x@example.test: transient"]), 500)


def test_a_missing_mailbox_stops_the_benchmark() -> None:
    with pytest.raises(bench.MailboxFailed, match=r"0 of 499 mailboxes failed \(expected 500"):
        bench.check_run("new", "timed run 1", answer(mailboxes=499), 500)


def test_a_side_error_stops_the_benchmark() -> None:
    with pytest.raises(bench.SideFailed, match="new side, warm-up 1: run: TransientError"):
        bench.check_run("new", "warm-up 1", {"error": "run: TransientError: Azurite gone"}, 500)


def test_the_turns_alternate_so_each_side_starts_half_the_rounds() -> None:
    assert bench.order(3) == ["old", "new", "new", "old", "old", "new"]
    assert bench.order(1) == ["old", "new"]


@pytest.mark.parametrize(
    ("new", "old", "ratio", "met"),
    [
        ([7.0, 7.6, 9.0], [15.6, 14.8, 15.2], 7.6 / 15.2, True),  # medians, not means: 9.0 does not count
        ([5.0], [10.0], 0.5, True),  # the goal itself is met
        ([5.1], [10.0], 0.51, False),
        ([12.0, 11.0], [10.0, 9.0], 11.5 / 9.5, False),  # slower than before
    ],
)
def test_the_ratio_is_the_new_median_over_the_old_one(
    new: list[float], old: list[float], ratio: float, met: bool
) -> None:
    row = bench.summarize(500, {"new": new, "old": old}, ["1.0/1.0/1.0"], "seeded")
    assert row.ratio == pytest.approx(ratio)
    assert row.met is met
    assert row.verdict == ("met" if met else "MISSED")
    assert row.goal == "<= 0.5x"
    assert f"spread max/min: new {max(new) / min(new):.2f}x" in row.note
    assert f"round by round {new[0] / old[0]:.2f}" in row.note


def test_no_ratio_without_timed_runs_on_both_sides() -> None:
    with pytest.raises(ValueError):
        bench.summarize(500, {"new": [1.0], "old": []}, [], "seeded")


@dataclass
class FakeResult:
    address: str
    outcome: str = "ok"
    messages: int = 0
    more: bool = False
    error: str = ""


def side_with(results: list[FakeResult]) -> Side:
    side = Side.__new__(Side)  # no stack: the collector is the boundary faked here
    side.services = SimpleNamespace(collector=SimpleNamespace(run=lambda: results))  # type: ignore[assignment]
    return side


def test_the_side_counts_every_mailbox_that_did_not_end_ok_and_empty() -> None:
    results = [
        FakeResult("a@example.test"),
        FakeResult("b@example.test", outcome="transient", error="IMAP connection dropped"),
        FakeResult("c@example.test", messages=1),
        FakeResult("d@example.test", more=True),
    ]
    got = side_with(results).run()
    assert got["mailboxes"] == 4 and got["failures"] == 3
    assert got["failed"][0] == "b@example.test: transient IMAP connection dropped"
    with pytest.raises(bench.MailboxFailed):
        bench.check_run("new", "timed run 1", got, 4)


def test_the_side_passes_a_whole_empty_run() -> None:
    got = side_with([FakeResult(f"{i}@example.test") for i in range(3)]).run()
    assert got["failures"] == 0
    assert bench.check_run("old", "timed run 1", got, 3) == got["seconds"]


class ScriptedSide:
    def __init__(self, answers: list[dict[str, Any]]) -> None:
        self.answers = answers
        self.asked = 0

    def ask(self, command: str) -> dict[str, Any]:
        assert command == "run"
        self.asked += 1
        return self.answers.pop(0)


def test_a_warm_up_that_failed_a_mailbox_is_followed_by_another() -> None:
    side = ScriptedSide([answer(mailboxes=3), answer(mailboxes=3, failed=["x: transient"]), answer(mailboxes=3)])
    bench._warm("old", side, 3)  # type: ignore[arg-type]
    assert side.asked == 3  # the last warm-up before the timed runs was whole


def test_warm_ups_that_keep_failing_stop_the_benchmark() -> None:
    failing = answer(mailboxes=3, failed=["x@example.test: mailbox_access"])
    side = ScriptedSide([dict(failing) for _ in range(bench.WARM_RUNS + bench.WARM_RETRIES)])
    with pytest.raises(bench.MailboxFailed, match=r"x@example\.test: mailbox_access"):
        bench._warm("new", side, 3)  # type: ignore[arg-type]
    assert side.asked == bench.WARM_RUNS + bench.WARM_RETRIES


def test_a_side_that_raised_is_not_warmed_again() -> None:
    side = ScriptedSide([{"error": "run: ConfigurationError: no IMAP host"}])
    with pytest.raises(bench.SideFailed):
        bench._warm("old", side, 3)  # type: ignore[arg-type]
    assert side.asked == 1
