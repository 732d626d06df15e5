"""The error hierarchy: each class ends a run with its own outcome and carries that outcome's remedy."""

from __future__ import annotations

from consumers.glpi.client import GlpiUnavailable
from shared.errors import (
    REMEDIES,
    AfterActionError,
    CollectorError,
    ConfigurationError,
    MailboxAccessError,
    NeedsReconsentError,
    RunOutcome,
    TransientError,
)


def test_each_error_class_has_its_outcome_and_that_outcome_s_remedy() -> None:
    expected = {
        CollectorError: RunOutcome.ERROR,
        ConfigurationError: RunOutcome.CONFIGURATION,
        TransientError: RunOutcome.TRANSIENT,
        NeedsReconsentError: RunOutcome.NEEDS_RECONSENT,
        MailboxAccessError: RunOutcome.MAILBOX_ACCESS,
        AfterActionError: RunOutcome.AFTER_ACTION,
    }
    for cls, outcome in expected.items():
        error = cls("it broke")
        assert error.error_class is outcome, cls
        assert error.remedy == REMEDIES[outcome] and error.remedy, cls
        assert error.describe() == f"it broke -- {REMEDIES[outcome]}"
    assert len({REMEDIES[o] for o in expected.values()}) == len(expected)  # no class says another's remedy


def test_a_subclass_or_an_instance_may_say_a_more_precise_remedy() -> None:
    assert GlpiUnavailable.error_class is RunOutcome.TRANSIENT  # inherited with no outcome of its own
    assert GlpiUnavailable.remedy != REMEDIES[RunOutcome.TRANSIENT]
    error = NeedsReconsentError("gone", remedy="sign in again as the shared mailbox's delegate")
    assert error.remedy == "sign in again as the shared mailbox's delegate"
    assert NeedsReconsentError("gone").remedy == REMEDIES[RunOutcome.NEEDS_RECONSENT]  # the class keeps its own
    assert TransientError("slow", retry_after=30).retry_after == 30
