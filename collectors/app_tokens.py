"""App-only access tokens: the client-credentials flow with Exchange Online's application permission
``IMAP.AccessAsApp``, for mailboxes in app mode.

Guarantees:
- one token per tenant serves every app-mode mailbox of that tenant: MSAL's app token cache, kept per tenant for the
  worker's lifetime, answers until the token is within ACCESS_TOKEN_MARGIN of its expiry;
- nothing is read from or written to Key Vault: the client credential is the managed identity's federated credential
  or the secret setting, exactly as in delegated mode, and an app token is never stored;
- a failure is a configuration problem (the app, its consent, its credential: every mailbox of the tenant waits for
  the fix) or a transient one, never "needs re-consent": no one signs in for an app-mode mailbox;
- a token without the ``IMAP.AccessAsApp`` role is refused here with the admin consent URL, before any IMAP login.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import msal

from collectors.entra import CONFIGURATION_CODES, RECONSENT_CODES, UNREACHABLE, aadsts_codes, confidential_app
from collectors.tokens import ACCESS_TOKEN_MARGIN, AccessToken
from shared.errors import CollectorError, ConfigurationError, MailboxAccessError, TransientError
from shared.registry import Mailbox
from shared.settings import Settings

logger = logging.getLogger(__name__)

APP_SCOPE = "https://outlook.office365.com/.default"
APP_ROLE = "IMAP.AccessAsApp"
_GUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_DOMAIN = re.compile(r"(?=.{4,253}$)(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}")

# Answers of the client-credentials grant that name what an admin must change, beyond the codes that delegated mode
# shares (collectors.entra.CONFIGURATION_CODES). {tenant} and {consent_url} are filled in.
APP_ONLY_CODES: Mapping[int, str] = {
    700016: "the app is not known in tenant {tenant}: an admin of that tenant must consent to it first ({consent_url})",
    7000112: "the app is disabled in tenant {tenant}: enable its enterprise application (Properties, 'Enabled for "
    "users to sign in')",
    1002012: "the app token was asked with a scope other than https://outlook.office365.com/.default: check IMAP_SCOPE",
    500011: "Exchange Online is not in tenant {tenant}: the tenant may have no Exchange Online licence",
    65001: "the app has no admin consent in tenant {tenant}: an admin opens {consent_url}",
    65002: "the app has no admin consent in tenant {tenant}: an admin opens {consent_url}",
}


def normalize_tenant(text: str) -> str:
    """A tenant id (GUID) or a verified domain of the tenant, lower-cased. Raises ValueError in plain words."""
    value = text.strip(" ").lower()
    if _GUID.fullmatch(value) or _DOMAIN.fullmatch(value):
        return value
    raise ValueError("tenant must be a tenant id (a GUID) or a domain of the tenant, such as contoso.onmicrosoft.com")


@dataclass(frozen=True, repr=False)
class AppToken(AccessToken):
    """An app token and what the refusal messages name: the tenant, the app, its enterprise application's object id."""

    tenant_id: str = ""
    client_id: str = ""
    service_principal_id: str = ""
    roles: tuple[str, ...] = field(default=())


def admin_consent_url(settings: Settings, tenant_id: str) -> str:
    """The URL an admin of ``tenant_id`` opens to consent to the app's permissions, IMAP.AccessAsApp included."""
    host = settings.authority_host.rstrip("/")
    return f"{host}/{quote(tenant_id)}/adminconsent?client_id={quote(settings.client_id)}"


def exchange_refusal(address: str, token: AppToken) -> MailboxAccessError:
    """Exchange refused the app for ``address``: the two PowerShell steps an Exchange admin runs, ids filled in."""
    principal = token.service_principal_id or "<enterprise application object id>"
    return MailboxAccessError(
        f"Exchange refused the app's token for {address} (AUTHENTICATE failed): the app's enterprise application "
        f"{principal} in tenant {token.tenant_id} is not registered in Exchange or has no Full Access to this mailbox",
        remedy=f"in Exchange Online PowerShell (Connect-ExchangeOnline -Organization {token.tenant_id}), once per "
        f'tenant: New-ServicePrincipal -AppId {token.client_id} -ObjectId {principal} -DisplayName "M365 mail '
        f'collector"; then per mailbox: Add-MailboxPermission -Identity {address} -User {principal} -AccessRights '
        "FullAccess. The object id is the enterprise application's (Enterprise applications in the Entra admin "
        "center), not the app registration's. Permissions take a few minutes to apply",
    )


def _claims(token: str) -> dict[str, Any]:
    """The token's payload, read without checking the signature: only for naming ids in messages."""
    try:
        payload = token.split(".")[1]
        data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class AppTokenProvider:
    """App tokens per tenant for app-mode mailboxes. Thread-safe; share one per worker."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._apps: dict[str, msal.ConfidentialClientApplication] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def forget(self) -> None:
        """Drop every cached app token, so that the next call asks Entra ID (after a change of credential or consent,
        the tokens already issued still carry the old roles)."""
        with self._lock:
            self._apps.clear()

    def tenant_of(self, mailbox: Mailbox) -> str:
        return mailbox.tenant_id or self._settings.tenant_id

    def access_token(self, mailbox: Mailbox) -> AppToken:
        """A valid app token for the tenant of ``mailbox``.

        Raises ConfigurationError (the app, its consent or credential: an admin must act) or TransientError.
        """
        return self.for_tenant(self.tenant_of(mailbox), mailbox=mailbox.address)

    def for_tenant(self, tenant_id: str, *, mailbox: str = "") -> AppToken:
        """A valid app token for ``tenant_id`` (see access_token)."""
        with self._tenant_lock(tenant_id):
            app = self._app(tenant_id)
            self._drop_expiring(app)
            try:
                result = app.acquire_token_for_client([APP_SCOPE])
            except UNREACHABLE as e:
                raise TransientError(
                    f"Entra ID unreachable while getting the app token for tenant {tenant_id}: {type(e).__name__}"
                ) from e
        if "access_token" not in result:
            raise self._error(result, tenant_id, mailbox)
        claims = _claims(result["access_token"])
        roles = tuple(str(r) for r in claims.get("roles") or ())
        expires_on = time.time() + float(result.get("expires_in", 0))
        token = AppToken(
            result["access_token"],
            expires_on,
            renewed=result.get("token_source") == "identity_provider",
            saved_at=None,
            tenant_id=tenant_id,
            client_id=self._settings.client_id,
            service_principal_id=str(claims.get("oid", "")),
            roles=roles,
        )
        if token.renewed:
            logger.info("app token renewed tenant=%s expires_in=%d", tenant_id, int(expires_on - time.time()))
        if APP_ROLE not in roles:
            raise ConfigurationError(
                f"the app token for tenant {tenant_id} has no {APP_ROLE} role (no roles claim): the application "
                "permission has no admin consent there, so Exchange would refuse every app-mode mailbox of it",
                remedy=f"an admin of tenant {tenant_id} opens {admin_consent_url(self._settings, tenant_id)} and "
                f"consents (the app registration must list {APP_ROLE} of Office 365 Exchange Online as an application "
                "permission: ENTRA_APP_ONLY=true); the role reaches new tokens within an hour, the next run retries",
            )
        return token

    def _tenant_lock(self, tenant_id: str) -> threading.Lock:
        # One request per tenant at a time: concurrent mailboxes of a tenant wait for the one token, not ask for many.
        with self._lock:
            return self._locks.setdefault(tenant_id, threading.Lock())

    def _app(self, tenant_id: str) -> msal.ConfidentialClientApplication:
        app = self._apps.get(tenant_id)
        if app is None:
            # MSAL's default in-memory cache is the app token cache: kept with the app, for the worker's lifetime.
            app = self._apps[tenant_id] = confidential_app(self._settings, tenant_id=tenant_id)
        return app

    @staticmethod
    def _drop_expiring(app: msal.ConfidentialClientApplication) -> None:
        """MSAL hands out a cached token until 5 minutes before its expiry; a run needs more left than that."""
        cache = app.token_cache
        now = time.time()
        for entry in list(cache.search(msal.TokenCache.CredentialType.ACCESS_TOKEN, target=[APP_SCOPE])):
            if float(entry.get("expires_on", 0)) - now <= ACCESS_TOKEN_MARGIN:
                cache.remove_at(entry)

    def _error(self, result: Mapping[str, Any], tenant_id: str, mailbox: str) -> CollectorError:
        error = str(result.get("error") or "unknown_error")
        codes = aadsts_codes(result)
        code_text = ", ".join(f"AADSTS{c}" for c in codes) or "no AADSTS code"
        what = f"Entra ID refused the app token for tenant {tenant_id} ({error}, {code_text})"
        if mailbox:
            what += f", needed for {mailbox}"
        consent_url = admin_consent_url(self._settings, tenant_id)
        for code in codes:
            if code in APP_ONLY_CODES:
                remedy = APP_ONLY_CODES[code].format(tenant=tenant_id, consent_url=consent_url)
                return ConfigurationError(what, remedy=remedy)
            if code in CONFIGURATION_CODES:
                return ConfigurationError(what, remedy=CONFIGURATION_CODES[code])
            if code in RECONSENT_CODES:
                # A user-grant problem cannot happen without a user: whatever it is, the app's setup must change.
                return ConfigurationError(what, remedy=f"{RECONSENT_CODES[code]}; check the app's admin consent "
                                          f"({consent_url})")  # fmt: skip
        if error in ("server_error", "temporarily_unavailable") or not error.startswith(("invalid_", "unauthorized")):
            return TransientError(what)
        return ConfigurationError(
            what,
            remedy="check the app registration (client id, credential) and its admin consent for IMAP.AccessAsApp "
            f"in tenant {tenant_id} ({consent_url})",
        )
