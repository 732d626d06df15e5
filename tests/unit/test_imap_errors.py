from __future__ import annotations

from typing import Any

import pytest

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


def test_an_app_token_refused_at_login_gets_the_modes_own_remedy_even_when_throttling_is_not_the_cause() -> None:
    own = MailboxAccessError("refused for the app", remedy="Add-MailboxPermission ...")
    app = ImapSession("imap.example", 993, address="shared@contoso.com", access_token="x", refused=lambda: own)
    assert app._login_error("AUTHENTICATE failed.") is own
    assert app._login_error("User is authenticated but not connected.") is own
    throttled = app._login_error("Request is throttled. Suggested Backoff Time: 100 milliseconds")
    assert isinstance(throttled, TransientError), "throttling stays transient in app mode"


def test_an_app_token_refused_at_select_gets_the_modes_own_remedy(monkeypatch: Any) -> None:
    from imapclient import exceptions as imap_errors

    own = MailboxAccessError("refused for the app", remedy="Add-MailboxPermission ...")
    app = ImapSession("imap.example", 993, address="shared@contoso.com", access_token="x", refused=lambda: own)

    class Refusing:
        def select_folder(self, folder: str) -> None:
            raise imap_errors.IMAPClientError("select failed: User is authenticated but not connected.")

    monkeypatch.setattr(ImapSession, "client", property(lambda self: Refusing()))
    with pytest.raises(MailboxAccessError) as refused:
        app.select("INBOX")
    assert refused.value is own

    delegated = session()
    with pytest.raises(MailboxAccessError) as folder:
        delegated.select("INBOX")
    assert "not connected" in str(folder.value) and "Full Access" in folder.value.remedy, "delegated mode's remedy"
    assert "create the folder" not in folder.value.remedy


def test_not_connected_is_an_access_problem_whichever_command_gets_it() -> None:
    from imapclient.exceptions import IMAPClientError

    for command in ("SELECT", "NAMESPACE", "LIST", "UID SEARCH"):
        error = session()._translate(
            IMAPClientError(f"{command} command error: BAD [b'User is authenticated but not connected.']")
        )
        assert isinstance(error, MailboxAccessError), command
        assert "Full Access" in error.remedy and "delegate=" in error.remedy
