"""Adding an app-mode mailbox: no browser, no sign-in, no secret per mailbox. Access is proven before anything is
stored: an app token for the mailbox's tenant, an IMAP login with it as ``user=<mailbox>``, and a SELECT of the
folder. A refusal names the missing step with the ids filled in; nothing is written then.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from collectors.app_tokens import AppTokenProvider, exchange_refusal, normalize_tenant
from collectors.imap_session import ImapSession
from shared import audit
from shared.errors import MailboxAccessError
from shared.registry import Mailbox, MailboxMode, MailboxOptions, MailboxRegistry, utcnow
from shared.settings import Settings

logger = logging.getLogger(__name__)


def prove_access(
    settings: Settings,
    address: str,
    access_token: str,
    folder: str,
    *,
    signed_in_as: str = "",
    refused: Callable[[], MailboxAccessError] | None = None,
) -> int:
    """Log in to IMAP with ``access_token`` as ``user=<address>`` and SELECT ``folder``, as a collection run will:
    the one proof that the token opens this mailbox (Exchange goes by the token's account, not by a name).

    Returns the folder's UIDVALIDITY. Raises MailboxAccessError (the server refuses the account or the folder is
    missing) or TransientError.
    """
    with ImapSession(
        settings.imap_host,
        settings.imap_port,
        address=address,
        access_token=access_token,
        ca_bundle=settings.ca_bundle,
        signed_in_as=signed_in_as,
        refused=refused,
    ) as imap:
        return imap.select(folder)


class MailboxExistsError(ValueError):
    """The address is registered already; the message says how to change or replace it."""


class AppMailboxes:
    def __init__(self, settings: Settings, *, registry: MailboxRegistry, tokens: AppTokenProvider) -> None:
        self._settings = settings
        self._registry = registry
        self._tokens = tokens

    def add(
        self, address: str, options: Mapping[str, Any] | MailboxOptions, *, tenant: str = "", admin: str
    ) -> Mailbox:
        """Prove that the app can open ``address`` and register it in app mode. ``address`` is already normalized.

        Raises ValueError (a bad option or tenant, in plain words), MailboxExistsError, ConfigurationError (the app
        token cannot be had, or has no IMAP.AccessAsApp role: the admin consent URL is in the remedy),
        MailboxAccessError (Exchange refuses the app for this mailbox or the folder is missing: the PowerShell
        commands are in the remedy) or TransientError. Nothing is stored unless it returns.
        """
        chosen = options if isinstance(options, MailboxOptions) else MailboxOptions.from_mapping(options)
        tenant_id = normalize_tenant(tenant) if tenant else ""
        existing = self._registry.find(address)
        if existing is not None:
            raise MailboxExistsError(
                f"{address} is registered already ({existing.mode} mode): change its options with PATCH, or revoke it "
                "with DELETE first to add it again"
            )
        mailbox = Mailbox(address=address, options=chosen, mode=MailboxMode.APP, tenant_id=tenant_id)
        token = self._tokens.access_token(mailbox)
        uidvalidity = prove_access(
            self._settings, address, token.token, chosen.folder, refused=lambda: exchange_refusal(address, token)
        )
        now = utcnow()
        # The checkpoint starts at the folder's current UIDVALIDITY and UID 0: the first run collects what is there.
        registered = Mailbox(
            address=address,
            options=chosen,
            mode=MailboxMode.APP,
            tenant_id=tenant_id,
            consented_by=admin,
            consented_at=now,
            uidvalidity=uidvalidity,
        )
        self._registry.put(registered)
        logger.info(
            "app-mode mailbox added mailbox=%s tenant=%s folder=%s",
            address,
            token.tenant_id,
            chosen.folder,
        )
        audit.record(
            "add",
            mailbox=address,
            who=admin,
            before={},
            after={"mode": str(MailboxMode.APP), "tenant": token.tenant_id, **chosen.__dict__},
        )
        return registered
