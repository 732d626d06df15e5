"""The few errors the app raises, each saying what the operator can do next.

Identity-provider answers (MSAL error dicts, Entra ``AADSTS`` codes) and server answers are turned into these at
one boundary each (``collectors.tokens`` and ``collectors.imap_session``), so the rest of the code and the
mailbox registry deal with four outcomes only.
"""

from __future__ import annotations


class CollectorError(Exception):
    """Base class. ``error_class`` is the stable name written to the registry and to logs."""

    error_class = "error"
    remedy = "see the log line for details"

    def __init__(self, message: str, *, remedy: str | None = None) -> None:
        super().__init__(message)
        if remedy is not None:
            self.remedy = remedy

    def describe(self) -> str:
        return f"{self} -- {self.remedy}"


class ConfigurationError(CollectorError):
    """A setting, the app registration or the deployment is wrong; retrying will not help until it is fixed."""

    error_class = "configuration"
    remedy = "fix the configuration named in the message, then run again"


class TransientError(CollectorError):
    """Network, throttling or a 5xx: nothing is lost and the next run retries. ``retry_after`` in seconds."""

    error_class = "transient"
    remedy = "nothing to do: the next run retries"

    def __init__(self, message: str, *, remedy: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, remedy=remedy)
        self.retry_after = retry_after


class NeedsReconsentError(CollectorError):
    """The stored grant is definitively unusable (``invalid_grant``): an admin must authorize the mailbox again."""

    error_class = "needs_reconsent"
    remedy = "open the mailbox's authorize link and sign in as the mailbox again"


class MailboxAccessError(CollectorError):
    """The token is valid but the server refuses the mailbox (wrong account, missing permission, folder gone)."""

    error_class = "mailbox_access"
    remedy = "check that the signed-in account has access to the mailbox and that the folder exists"
