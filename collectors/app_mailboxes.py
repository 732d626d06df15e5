"""Adding an app-mode mailbox: no browser, no sign-in, no secret per mailbox. Access is proven before anything is
stored: an app token for the mailbox's tenant, an IMAP login with it as ``user=<mailbox>``, and a SELECT of the
folder. A refusal names the missing step with the ids filled in; nothing is written then.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from collectors.app_tokens import AppTokenProvider, exchange_refusal, normalize_tenant
from collectors.imap_session import ImapSession
from shared import audit
from shared.registry import Mailbox, MailboxMode, MailboxOptions, MailboxRegistry, utcnow
from shared.settings import Settings

logger = logging.getLogger(__name__)


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
        with ImapSession(
            self._settings.imap_host,
            self._settings.imap_port,
            address=address,
            access_token=token.token,
            ca_bundle=self._settings.ca_bundle,
            refused=lambda: exchange_refusal(address, token),
        ) as imap:
            uidvalidity = imap.select(chosen.folder)
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
