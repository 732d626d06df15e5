"""What an operator does to a mailbox besides consenting it: pause and resume, the owner's re-consent link, the
status view with token ages, and the daily reports that keep a broken or ageing mailbox in the log until it is
fixed. The HTTP pages and the command line call these; nothing here knows HTTP.

Guarantees:
- a paused mailbox is not collected (only ``active`` ones are), and keep_alive renews its refresh token once a week,
  so a pause never costs a re-consent;
- a re-consent link is signed, expires (RECONSENT_TTL by default), is bound to its mailbox and the mailbox's mode,
  and opens one consent only; an app-mode mailbox has none (it has no user grant);
- report_daily writes one line a day for every mailbox that still needs re-consent, and one for every token that
  will expire unused within TOKEN_WARNING, until it is fixed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from collectors.consent import ConsentService
from collectors.tokens import TokenService
from shared import audit
from shared.errors import CollectorError, ConfigurationError, NeedsReconsentError
from shared.registry import Mailbox, MailboxMode, MailboxRegistry, MailboxStatus, utcnow
from shared.signed_links import MAX_RECONSENT_TTL, RECONSENT_TTL, InvalidLink, LinkSigner, Signed

logger = logging.getLogger(__name__)

ACTIVE, PAUSED, NEEDS_RECONSENT = MailboxStatus.ACTIVE, MailboxStatus.PAUSED, MailboxStatus.NEEDS_RECONSENT

RECONSENT_PURPOSE = "reconsent"
DELEGATED, APP = MailboxMode.DELEGATED.value, MailboxMode.APP.value
# Entra ID: a refresh token not used for 90 days expires (its max inactive time); each renewal starts a new one.
REFRESH_TOKEN_INACTIVE_LIMIT = timedelta(days=90)
TOKEN_WARNING = timedelta(days=14)  # warn this long before a token would expire unused
KEEP_ALIVE_EVERY = timedelta(days=7)  # renew an unused token weekly: a missed week or two still leaves ten
DAILY = timedelta(hours=24)
STALE_AFTER = timedelta(hours=1)  # an active mailbox without a success for this long is named at every run
WHERE_THE_LINK_IS = "the status page (GET /api/status) or GET /api/mailboxes/{address} gives its re-consent link"


def mode_of(mailbox: Mailbox) -> str:
    """The mailbox's mode: ``delegated`` (a user's grant and refresh token) or ``app`` (the app's own token)."""
    return str(mailbox.mode)


def token_expires_at(mailbox: Mailbox) -> datetime | None:
    """When the stored refresh token would expire if nothing used it (None: app mode or never saved)."""
    if mode_of(mailbox) != DELEGATED or mailbox.token_saved_at is None:
        return None
    return mailbox.token_saved_at + REFRESH_TOKEN_INACTIVE_LIMIT


def keep_alive_due(mailbox: Mailbox, now: datetime) -> bool:
    """Whether ``Operations.keep_alive`` renews this mailbox's token now (and may write its row)."""
    if mode_of(mailbox) != DELEGATED or mailbox.status not in (PAUSED, MailboxStatus.DISABLED):
        return False
    return mailbox.token_saved_at is None or now - mailbox.token_saved_at >= KEEP_ALIVE_EVERY


@dataclass(frozen=True)
class ReconsentLink:
    value: str
    expires_at: datetime


class Operations:
    """Operator actions on registered mailboxes. Each action writes an audit line."""

    def __init__(
        self, *, registry: MailboxRegistry, tokens: TokenService, consent: ConsentService, signer: LinkSigner
    ) -> None:
        self._registry = registry
        self._tokens = tokens
        self._consent = consent
        self._signer = signer

    # -- pause and resume ---------------------------------------------------------------------------------------

    def pause(self, address: str, *, admin: str) -> Mailbox:
        """Stop collecting ``address`` (its token is kept alive). Raises NotFoundError when it is not registered and
        ValueError when it needs re-consent (pausing would hide that)."""
        current = self._registry.get(address)
        if current.status == NEEDS_RECONSENT:
            raise ValueError(f"{address} needs re-consent: authorize it again first (pausing would hide that)")
        if current.status != PAUSED:
            self._registry.set_status(address, PAUSED)
            audit.record(
                "pause", mailbox=address, who=admin, before={"status": current.status}, after={"status": PAUSED}
            )
        return self._registry.get(address)

    def resume(self, address: str, *, admin: str) -> Mailbox:
        """Collect ``address`` again from its checkpoint. Raises NotFoundError, or ValueError unless it is paused."""
        current = self._registry.get(address)
        if current.status == ACTIVE:
            return current
        if current.status != PAUSED:
            raise ValueError(f"{address} is {current.status}, not paused: nothing to resume")
        self._registry.set_status(address, ACTIVE)
        audit.record("resume", mailbox=address, who=admin, before={"status": PAUSED}, after={"status": ACTIVE})
        return self._registry.get(address)

    # -- the owner's re-consent link ----------------------------------------------------------------------------

    def reconsent_link(self, address: str, *, admin: str, ttl: timedelta = RECONSENT_TTL) -> ReconsentLink:
        """A signed, single-use link value for the mailbox's owner. Raises NotFoundError, or ValueError for an app-mode
        mailbox or a ttl out of range."""
        if not timedelta(minutes=5) <= ttl <= MAX_RECONSENT_TTL:
            raise ValueError(f"a re-consent link lasts between 5 minutes and {MAX_RECONSENT_TTL.days} days")
        mailbox = self._registry.get(address)
        mode = mode_of(mailbox)
        if mode != DELEGATED:
            raise ValueError(f"{address} is an app-mode mailbox: it has no user grant to renew")
        value, signed = self._signer.sign(RECONSENT_PURPOSE, mailbox.address, ttl=ttl, mode=mode)
        audit.record(
            "reconsent_link",
            mailbox=address,
            who=admin,
            before={},
            after={"expires_at": signed.expires_at.isoformat(), "link_id": signed.link_id},
        )
        return ReconsentLink(value, signed.expires_at)

    def check_reconsent_link(self, value: str) -> tuple[Signed, Mailbox]:
        """The link's mailbox, if the link is good (not redeemed). Raises InvalidLink."""
        signed = self._signer.check_unused(value, RECONSENT_PURPOSE)
        return signed, self._bound_mailbox(signed)

    def open_reconsent_link(self, value: str, *, redirect_uri: str) -> str:
        """Redeem the link (once) and start the consent for its mailbox; returns the Entra authorize URL.

        Raises InvalidLink (bad, expired, used, or the mailbox changed), ConsentProblem or CollectorError.
        """
        signed = self._signer.check(value, RECONSENT_PURPOSE)
        mailbox = self._bound_mailbox(signed)
        self._signer.redeem(value, RECONSENT_PURPOSE)
        delegate = mailbox.signed_in_as if mailbox.signed_in_as and mailbox.signed_in_as != mailbox.address else ""
        url = self._consent.start(
            mailbox.address, redirect_uri=redirect_uri, delegate=delegate, admin=f"re-consent link {signed.link_id}"
        )
        logger.info("reconsent link opened mailbox=%s link_id=%s", mailbox.address, signed.link_id)
        return url

    def _bound_mailbox(self, signed: Signed) -> Mailbox:
        mailbox = self._registry.find(signed.subject)
        if mailbox is None:
            raise InvalidLink("the mailbox of this link is no longer registered: ask the administrator")
        if mode_of(mailbox) != signed.mode:
            raise InvalidLink("the mailbox's mode changed since the link was made: ask for a new one")
        return mailbox

    # -- scheduled reports and the keep-alive -------------------------------------------------------------------

    def keep_alive(self, mailboxes: Iterable[Mailbox]) -> list[str]:
        """Renew the refresh token of every paused or disabled delegated mailbox whose token was last saved more
        than KEEP_ALIVE_EVERY ago. Returns the addresses whose renewed token reached Key Vault; only those get a new
        ``token_saved_at`` (a renewal that wrote nothing leaves the token's age as it was). A failure is logged and
        recorded, never raised.

        Active mailboxes are left to their collection, which renews the token under the mailbox's lease whenever
        the access token runs out (hourly); renewing here too would do it outside the lease."""
        now = utcnow()
        renewed = []
        for mailbox in mailboxes:
            if not keep_alive_due(mailbox, now):
                continue
            try:
                token = self._tokens.renew(
                    mailbox.address, signed_in_as=mailbox.signed_in_as, secret_name=mailbox.token_secret
                )
            except ConfigurationError:
                raise
            except CollectorError as e:
                logger.warning(
                    "token keep-alive failed mailbox=%s outcome=%s error=%s", mailbox.address, e.error_class, e
                )
                if isinstance(e, NeedsReconsentError):
                    self._registry.record_failure(
                        mailbox.address,
                        error_class=e.error_class,
                        error=e.describe(),
                        consecutive_failures=mailbox.consecutive_failures + 1,
                        needs_reconsent=True,
                    )
                continue
            if token.saved_at is None:
                # Renewed at Entra, but nothing reached Key Vault (the write failed or another writer's is newer):
                # the stored token is as old as before, so its age stays; the next keep-alive writes the renewed one.
                logger.warning(
                    "token keep-alive not saved mailbox=%s outcome=token_save_pending status=%s",
                    mailbox.address,
                    mailbox.status,
                )
                continue
            self._registry.record_token_saved(mailbox.address, token.saved_at, token.secret_name)
            logger.info("token kept alive mailbox=%s status=%s", mailbox.address, mailbox.status)
            renewed.append(mailbox.address)
        return renewed

    def report_daily(self, mailboxes: Iterable[Mailbox]) -> int:
        """Once a day per mailbox: a WARNING line for each that still needs re-consent (the alert reads it) and for
        each token that expires unused within TOKEN_WARNING. Returns how many lines were written."""
        now = utcnow()
        written = 0
        for mailbox in mailboxes:
            last = mailbox.reconsent_reported_at
            if last is not None and now - last < DAILY:
                continue
            expires_at = token_expires_at(mailbox)
            if mailbox.status == NEEDS_RECONSENT:
                logger.warning(
                    "mailbox still needs re-consent mailbox=%s outcome=needs_reconsent since=%s "
                    "consecutive_failures=%d -- %s",
                    mailbox.address,
                    (mailbox.last_run_at or now).isoformat(),
                    mailbox.consecutive_failures,
                    WHERE_THE_LINK_IS.replace("{address}", mailbox.address),
                )
            elif expires_at is not None and expires_at - now <= TOKEN_WARNING:
                logger.warning(
                    "token expires unused soon mailbox=%s token_expires_in_days=%d expires_at=%s status=%s",
                    mailbox.address,
                    (expires_at - now).days,
                    expires_at.isoformat(),
                    mailbox.status,
                )
            else:
                continue
            self._registry.record_reported(mailbox.address, now)
            written += 1
        return written

    def report_stale(self, mailboxes: Iterable[Mailbox]) -> int:
        """At every run: a WARNING line for each active mailbox not collected successfully for STALE_AFTER or more
        (failing, throttled, or its lease stuck), with the whole hours since its last success (or its consent).
        The "not collected" alert reads it. Returns how many lines were written."""
        now = utcnow()
        written = 0
        for mailbox in mailboxes:
            since = mailbox.last_success_at or mailbox.consented_at
            if mailbox.status != ACTIVE or since is None or now - since < STALE_AFTER:
                continue
            logger.warning(
                "mailbox not collected mailbox=%s hours_since_success=%d last_success=%s last_error_class=%s",
                mailbox.address,
                int((now - since).total_seconds() // 3600),
                mailbox.last_success_at.isoformat() if mailbox.last_success_at else "never",
                mailbox.last_error_class or "-",
            )
            written += 1
        return written
