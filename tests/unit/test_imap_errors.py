from __future__ import annotations

from collectors.imap_session import DEFAULT_THROTTLE_BACKOFF, ImapSession, _throttle
from shared.errors import MailboxAccessError, TransientError


def test_exchange_throttling_answer_gives_its_backoff() -> None:
    error = _throttle("b'Request is throttled. Suggested Backoff Time: 2470 milliseconds'")
    assert isinstance(error, TransientError) and error.retry_after == 2.47


def test_throttling_without_a_figure_uses_the_default() -> None:
    error = _throttle("BAD User is throttled")
    assert error is not None and error.retry_after == DEFAULT_THROTTLE_BACKOFF


def test_other_answers_are_not_throttling() -> None:
    assert _throttle("NO AUTHENTICATE failed.") is None


def session() -> ImapSession:
    return ImapSession(
        "imap.example", 993, address="shared@contoso.com", access_token="x", signed_in_as="d@contoso.com"
    )


def test_not_connected_is_explained_as_an_access_problem() -> None:
    error = session()._login_error("User is authenticated but not connected.")
    assert isinstance(error, MailboxAccessError)
    assert "Full Access" in error.remedy and "d@contoso.com" in str(error)


def test_authenticate_failed_names_the_usual_causes() -> None:
    error = session()._login_error("AUTHENTICATE failed.")
    assert isinstance(error, MailboxAccessError)
    assert "IMAP is enabled" in error.remedy and "IMAP.AccessAsUser.All" in error.remedy
