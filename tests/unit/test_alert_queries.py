"""The deployed alerts' queries find the lines the collector writes, and Kusto's term matching is modelled
faithfully enough to catch a filter that would never match (tests/support/kql.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from collectors.collect import MailboxResult
from shared.errors import RunOutcome
from tests.support import kql

ALERTS = Path(__file__).resolve().parents[2] / "infra" / "app" / "alerts.bicep"


def _lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, str]]:
    return [{"timestamp": "t", "message": r.getMessage()} for r in caplog.records]


def test_has_matches_whole_terms_only() -> None:
    assert kql.has("collect mailbox=a@b.example outcome=ok", "collect")
    assert kql.has("North America", "america")
    assert not kql.has("collector started", "collect"), "a term is a whole run of letters and digits"
    with pytest.raises(kql.UnsupportedQuery):
        kql.has("outcome=needs_reconsent", "outcome=needs_reconsent")  # three terms: not what `has` looks up
    with pytest.raises(kql.UnsupportedQuery):
        kql.has("x", "needs_reconsent")


def test_each_alert_finds_the_line_of_its_mailbox(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    queries = kql.alert_queries(ALERTS)
    MailboxResult("ok@example.test", RunOutcome.OK, messages=3).log(0)
    MailboxResult("gone@example.test", RunOutcome.NEEDS_RECONSENT, error="AADSTS50173 -- open the authorize link").log(
        1
    )
    MailboxResult("failing@example.test", RunOutcome.MAILBOX_ACCESS, error="x consecutive_failures=99 y").log(4)

    reconsent = kql.run(queries["reconsentQuery"], _lines(caplog))
    failures = kql.run(queries["failuresQuery"], _lines(caplog))

    assert [r["mailbox"] for r in reconsent] == ["gone@example.test"]
    assert {r["mailbox"]: r["consecutive_failures"] for r in failures} == {
        "ok@example.test": 0,
        "gone@example.test": 1,
        "failing@example.test": 4,  # the count the collector wrote, not a look-alike inside the error text
    }


def test_a_query_the_evaluator_does_not_model_is_refused() -> None:
    with pytest.raises(kql.UnsupportedQuery):
        kql.run("traces\n| summarize count() by bin(timestamp, 5m)", [])
    with pytest.raises(kql.UnsupportedQuery):
        kql.run('traces\n| where message has "outcome=needs_reconsent"', [{"timestamp": "t", "message": "x"}])
