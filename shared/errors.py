"""The few errors the app raises, each saying what the operator can do next.

Identity-provider answers (MSAL error dicts, Entra ``AADSTS`` codes) and server answers are turned into these at
one boundary each (``collectors.tokens`` and ``collectors.imap_session``), so the rest of the code and the
mailbox registry deal with four outcomes only.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from types import MappingProxyType
from typing import Any, ClassVar


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


# What the operator does next after a run ends so: the remedy an error of that outcome carries unless it names its own.
REMEDIES: Mapping[RunOutcome, str] = MappingProxyType(
    {
        RunOutcome.ERROR: "see the log line for details",
        RunOutcome.CONFIGURATION: "fix the configuration named in the message, then run again",
        RunOutcome.TRANSIENT: "nothing to do: the next run retries",
        RunOutcome.NEEDS_RECONSENT: "open the mailbox's authorize link and sign in as the mailbox again",
        RunOutcome.MAILBOX_ACCESS: (
            "check that the signed-in account has access to the mailbox and that the folder exists"
        ),
        RunOutcome.AFTER_ACTION: (
            "change the mailbox's after-action options (move_to, refuse_to) or fix the folder on the server"
        ),
    }
)


class CollectorError(Exception):
    """Base class. ``error_class`` is the stable name written to the registry and to logs; ``remedy`` says what to
    do next. A subclass names its outcome in its class line, ``class X(CollectorError, outcome=RunOutcome.Y)``,
    and takes that outcome's remedy from ``REMEDIES``; a subclass or an instance may say a more precise one."""

    error_class: ClassVar[RunOutcome] = RunOutcome.ERROR
    remedy: str = REMEDIES[RunOutcome.ERROR]

    def __init_subclass__(cls, *, outcome: RunOutcome | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if outcome is not None:
            cls.error_class = outcome
            cls.remedy = REMEDIES[outcome]

    def __init__(self, message: str, *, remedy: str | None = None) -> None:
        super().__init__(message)
        if remedy is not None:
            self.remedy = remedy

    def describe(self) -> str:
        return f"{self} -- {self.remedy}"


class ConfigurationError(CollectorError, outcome=RunOutcome.CONFIGURATION):
    """A setting, the app registration or the deployment is wrong; retrying will not help until it is fixed."""


class TransientError(CollectorError, outcome=RunOutcome.TRANSIENT):
    """Network, throttling or a 5xx: nothing is lost and the next run retries. ``retry_after`` in seconds."""

    def __init__(self, message: str, *, remedy: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, remedy=remedy)
        self.retry_after = retry_after


class NeedsReconsentError(CollectorError, outcome=RunOutcome.NEEDS_RECONSENT):
    """The stored grant is definitively unusable (``invalid_grant``): an admin must authorize the mailbox again."""


class MailboxAccessError(CollectorError, outcome=RunOutcome.MAILBOX_ACCESS):
    """The token is valid but the server refuses the mailbox (wrong account, missing permission, folder gone)."""


class AfterActionError(MailboxAccessError, outcome=RunOutcome.AFTER_ACTION):
    """The server refused the after-action (a folder it cannot create, a permission) for mail that is already
    stored and queued. The run records it as pending with the checkpoint: the mail is not queued again, and the
    next run applies the after-action first."""
