"""The few errors the app raises, each saying what the operator can do next.

Identity-provider answers (MSAL error dicts, Entra ``AADSTS`` codes) and server answers are turned into these at
one boundary each (``collectors.tokens`` and ``collectors.imap_session``), so the rest of the code and the
mailbox registry deal with four outcomes only.
"""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar


class RunOutcome(StrEnum):
    """How one mailbox's run ended, as logged (``outcome=``) and as the registry's ``last_error_class``."""

    OK = "ok"
    BUSY = "busy"  # another run holds the mailbox's lease
    DEFERRED = "deferred"  # the mailbox was revoked or disabled while the run was starting
    TRANSIENT = "transient"
    NEEDS_RECONSENT = "needs_reconsent"
    MAILBOX_ACCESS = "mailbox_access"
    AFTER_ACTION = "after_action"  # mail is queued, but the server refused to flag, move or delete it
    CONFIGURATION = "configuration"
    ERROR = "error"  # a defect: reported with its traceback

    @property
    def failed(self) -> bool:
        """An outcome that counts as a failure (and alerts); ok, busy and deferred do not."""
        return self not in _NOT_FAILED


_NOT_FAILED = frozenset({RunOutcome.OK, RunOutcome.BUSY, RunOutcome.DEFERRED})


class NotFoundError(LookupError):
    """The named mailbox is not registered (never authorized, or revoked). ``get`` raises it; ``find`` returns None.

    Not a CollectorError: nothing failed, there is nothing to collect; authorize the mailbox to collect it.
    """

    def __init__(self, address: str) -> None:
        super().__init__(f"mailbox {address} is not authorized")
        self.address = address


class CollectorError(Exception):
    """Base class. ``error_class`` is the stable name written to the registry and to logs."""

    error_class: ClassVar[RunOutcome] = RunOutcome.ERROR
    remedy = "see the log line for details"

    def __init__(self, message: str, *, remedy: str | None = None) -> None:
        super().__init__(message)
        if remedy is not None:
            self.remedy = remedy

    def describe(self) -> str:
        return f"{self} -- {self.remedy}"


class ConfigurationError(CollectorError):
    """A setting, the app registration or the deployment is wrong; retrying will not help until it is fixed."""

    error_class = RunOutcome.CONFIGURATION
    remedy = "fix the configuration named in the message, then run again"


class TransientError(CollectorError):
    """Network, throttling or a 5xx: nothing is lost and the next run retries. ``retry_after`` in seconds."""

    error_class = RunOutcome.TRANSIENT
    remedy = "nothing to do: the next run retries"

    def __init__(self, message: str, *, remedy: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, remedy=remedy)
        self.retry_after = retry_after


class NeedsReconsentError(CollectorError):
    """The stored grant is definitively unusable (``invalid_grant``): an admin must authorize the mailbox again."""

    error_class = RunOutcome.NEEDS_RECONSENT
    remedy = "open the mailbox's authorize link and sign in as the mailbox again"


class MailboxAccessError(CollectorError):
    """The token is valid but the server refuses the mailbox (wrong account, missing permission, folder gone)."""

    error_class = RunOutcome.MAILBOX_ACCESS
    remedy = "check that the signed-in account has access to the mailbox and that the folder exists"


class AfterActionError(MailboxAccessError):
    """The server refused the after-action (a folder it cannot create, a permission) for mail that is already
    stored and queued. The run records it as pending with the checkpoint: the mail is not queued again, and the
    next run applies the after-action first."""

    error_class = RunOutcome.AFTER_ACTION
    remedy = "change the mailbox's after-action options (move_to, refuse_to) or fix the folder on the server"
