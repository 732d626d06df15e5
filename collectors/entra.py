"""The boundary to Microsoft Entra ID: MSAL applications built from the settings, and the one place where MSAL's
error dicts and ``AADSTS`` codes become the app's errors, each with the remedy an admin can act on.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

import msal
import requests

from shared.errors import CollectorError, ConfigurationError, NeedsReconsentError, TransientError
from shared.settings import Settings

logger = logging.getLogger(__name__)

HTTP_TIMEOUT = (10, 30)  # seconds: connect, read
KEY_VAULT_REFERENCE = "@Microsoft.KeyVault("  # what an app setting still reads when the platform could not resolve it

# Definitive answers for one mailbox's grant: only a new sign-in fixes them.
RECONSENT_CODES: Mapping[int, str] = {
    50173: "the grant was revoked, usually by a password reset or an admin revoking sessions",
    70043: "the refresh token expired or was revoked by a Conditional Access sign-in frequency policy",
    700082: "the refresh token expired after 90 days without use",
    70008: "the refresh token or code has expired",
    65001: "the mailbox account has not consented to the IMAP permission",
    50076: "multi-factor authentication is now required",
    50079: "the account must register for multi-factor authentication",
    50078: "the multi-factor authentication claim expired",
    53003: "a Conditional Access policy blocks the sign-in",
    50057: "the account is disabled",
    50034: "the account does not exist in the tenant any more",
    50053: "the account is locked",
    50055: "the account's password has expired",
    54005: "the authorization code was already redeemed",
}
# What an admin does about the grant errors that a plain new sign-in does not fix by itself.
RECONSENT_REMEDIES: Mapping[int, str] = {
    53003: "a Conditional Access policy blocks this sign-in (often a location, device or app condition that the "
    "function app's outbound addresses do not meet): have an admin exclude the app or its addresses in Entra admin "
    "center > Conditional Access > Sign-in logs shows which policy, then authorize the mailbox again",
    50076: "open the mailbox's authorize link and sign in again with multi-factor authentication",
    50079: "sign in once as the mailbox at https://aka.ms/mfasetup to register for multi-factor authentication, "
    "then open the mailbox's authorize link",
    50078: "open the mailbox's authorize link and sign in again with multi-factor authentication",
    50055: "change the account's password, then open the mailbox's authorize link",
    50057: "enable the account in Entra ID, then open the mailbox's authorize link",
}
# Problems with the app registration or the deployment: they affect every mailbox until fixed.
CONFIGURATION_CODES: Mapping[int, str] = {
    7000222: "the app's client secret has expired: create a new one and update ENTRA_CLIENT_SECRET",
    7000215: "the client secret is wrong: copy the secret's value (not its id) into ENTRA_CLIENT_SECRET",
    700016: "the application id is not found in the tenant: check ENTRA_CLIENT_ID and ENTRA_TENANT_ID",
    90002: "the tenant is not found: check ENTRA_TENANT_ID",
    700027: "the client assertion or certificate is invalid: check the federated credential of the identity",
    70021: "no federated credential of the app matches the managed identity: add one (see README)",
    700211: "no federated credential of the app registration has the managed identity's issuer: set the "
    "credential's issuer to <authority host>/<tenant id>/v2.0 of this tenant",
    700212: "no federated credential of the app registration has the token exchange audience: set its audience to "
    "api://AzureADTokenExchange (api://AzureADTokenExchangeUSGov or ...China in national clouds)",
    700213: "no federated credential of the app registration names the managed identity: set the credential's "
    "subject to the identity's principal (object) id, not its client id",
    7000112: "the application is disabled in the tenant",
    50011: "the redirect URI is not registered on the app: add the callback URL shown on the start page",
    500011: "the IMAP resource is not in the tenant: Exchange Online may not be licensed",
    65002: "consent between the app and the IMAP resource must be configured by an admin",
    700024: "the client assertion is not within its valid time range",
}


class _RequestsClient(requests.Session):
    """MSAL's HTTP client: our CA bundle, no proxy/CA settings from the environment, bounded timeouts."""

    def __init__(self, ca_bundle: str | None) -> None:
        super().__init__()
        # The environment's REQUESTS_CA_BUNDLE would override ``verify``; the settings are the single source.
        self.trust_env = False
        self.verify = ca_bundle or True

    def request(self, *args: Any, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", HTTP_TIMEOUT)
        return super().request(*args, **kwargs)


# MSAL raises (rather than returns an error dict) for 5xx answers and for network failures.
UNREACHABLE = (requests.RequestException, msal.exceptions.MsalServiceError)

_http_cache: dict[Any, Any] = {}  # discovery documents, shared so that each new app does not fetch them again
_http_clients: dict[str | None, _RequestsClient] = {}
_lock = threading.Lock()


def _http_client(settings: Settings) -> _RequestsClient:
    with _lock:
        client = _http_clients.get(settings.ca_bundle)
        if client is None:
            client = _http_clients[settings.ca_bundle] = _RequestsClient(settings.ca_bundle)
        return client


def _client_credential(settings: Settings) -> str | dict[str, Callable[[], str]]:
    if settings.client_secret:
        if settings.client_secret.startswith(KEY_VAULT_REFERENCE):
            # The platform leaves the reference itself in the setting when it cannot read the secret; sent to Entra
            # it would read as a wrong secret (AADSTS7000215).
            raise ConfigurationError(
                "ENTRA_CLIENT_SECRET is an unresolved Key Vault reference: the platform could not read the secret",
                remedy="check the reference's status under the function app's Environment variables, that the secret "
                "exists, and that the identity named by keyVaultReferenceIdentity has the Key Vault Secrets User role",
            )
        return settings.client_secret
    if not settings.managed_identity_client_id:
        raise ConfigurationError(
            "no Entra client credential: ENTRA_CLIENT_SECRET is not set and AZURE_CLIENT_ID (the managed "
            "identity for a federated credential) is not set either",
            remedy="deploy with the federated credential (azd up) or set ENTRA_CLIENT_SECRET as a Key Vault reference",
        )
    identity = managed_identity(settings)
    scope = f"{settings.token_exchange_audience}/.default"

    def assertion() -> str:
        return managed_identity_token(identity, scope, client_id=settings.managed_identity_client_id or "")

    return {"client_assertion": assertion}


def managed_identity(settings: Settings) -> Any:
    """The user-assigned managed identity named by AZURE_CLIENT_ID (its endpoint comes from the platform)."""
    from azure.identity import ManagedIdentityCredential

    options: dict[str, Any] = {"connection_verify": settings.ca_bundle} if settings.ca_bundle else {}
    return ManagedIdentityCredential(client_id=settings.managed_identity_client_id, **options)


def managed_identity_token(identity: Any, scope: str, *, client_id: str) -> str:
    """A token of the managed identity, its failures classified: a missing or unknown identity is a configuration
    error with its remedy, a throttled, failing or unreachable endpoint is transient."""
    from azure.core.exceptions import AzureError, ClientAuthenticationError
    from azure.identity import CredentialUnavailableError

    try:
        return str(identity.get_token(scope).token)
    except CredentialUnavailableError as e:
        text = str(e)
        if any(f" {status}," in text or f"({status})" in text for status in (429, 500, 502, 503, 504)):
            raise TransientError(f"the managed identity endpoint failed ({_first_line(text)})") from e
        raise ConfigurationError(
            f"the managed identity {client_id} is not available to the function app ({_first_line(text)})",
            remedy="attach the user-assigned identity to the function app and set AZURE_CLIENT_ID to its client id",
        ) from e
    except ClientAuthenticationError as e:
        status = getattr(e, "status_code", None)
        if status is None or status == 429 or status >= 500:
            raise TransientError(f"the managed identity endpoint failed ({type(e).__name__} {status})") from e
        raise ConfigurationError(
            f"the managed identity {client_id} was refused a token (HTTP {status})",
            remedy="check that AZURE_CLIENT_ID is the client id of the identity attached to the function app",
        ) from e
    except (AzureError, requests.RequestException) as e:
        raise TransientError(f"the managed identity endpoint is unreachable ({type(e).__name__})") from e


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0][:300] if text.strip() else "no detail"


def confidential_app(
    settings: Settings, cache: msal.TokenCache | None = None, *, tenant_id: str | None = None
) -> msal.ConfidentialClientApplication:
    """An MSAL app for the configured Entra app registration, with ``cache`` (a new empty one by default), in
    ``tenant_id`` (default: ENTRA_TENANT_ID; another tenant for a multitenant app's app-only mailboxes).

    Raises TransientError when the authority cannot be reached, ConfigurationError when it is wrong.
    """
    authority = settings.authority if tenant_id is None else f"{settings.authority_host.rstrip('/')}/{tenant_id}"
    try:
        return msal.ConfidentialClientApplication(
            settings.client_id,
            client_credential=_client_credential(settings),
            authority=authority,
            token_cache=cache,
            http_client=_http_client(settings),
            http_cache=_http_cache,
            instance_discovery=settings.is_public_cloud_authority,
        )
    except UNREACHABLE as e:
        raise TransientError(f"Entra ID unreachable ({type(e).__name__}) at {settings.authority_host}") from e
    except ValueError as e:
        raise ConfigurationError(f"Entra authority {authority} is not usable: {e}") from e


def aadsts_codes(result: Mapping[str, Any]) -> list[int]:
    codes = result.get("error_codes") or []
    return [int(c) for c in codes if str(c).isdigit()]


def error_from_result(result: Mapping[str, Any], *, mailbox: str) -> CollectorError:
    """Turn an MSAL error dict into NeedsReconsentError, ConfigurationError or TransientError.

    The message carries the error name and AADSTS code (never the description's tokens or trace of secrets).
    """
    error = str(result.get("error") or "unknown_error")
    codes = aadsts_codes(result)
    code_text = ", ".join(f"AADSTS{c}" for c in codes) or "no AADSTS code"
    for code in codes:
        if code in CONFIGURATION_CODES:
            return ConfigurationError(
                f"Entra ID refused the app ({error}, {code_text}) for {mailbox}", remedy=CONFIGURATION_CODES[code]
            )
    suberror = str(result.get("suberror") or "")
    detail = f"{error}, {code_text}" + (f", {suberror}" if suberror else "")
    for code in codes:
        if code in RECONSENT_CODES:
            return NeedsReconsentError(
                f"the stored sign-in of {mailbox} is no longer valid ({detail}): {RECONSENT_CODES[code]}",
                remedy=RECONSENT_REMEDIES.get(code),
            )
    if suberror == "message_only" or result.get("claims"):
        # A Conditional Access challenge without a code we know: a sign-in must satisfy the policy.
        return NeedsReconsentError(
            f"the stored sign-in of {mailbox} must satisfy a Conditional Access policy ({detail})",
            remedy=RECONSENT_REMEDIES[53003],
        )
    if error in ("invalid_client", "unauthorized_client", "invalid_request", "invalid_scope"):
        return ConfigurationError(
            f"Entra ID refused the app ({error}, {code_text}) for {mailbox}",
            remedy="check the app registration: client id, credential, redirect URI and API permissions",
        )
    if error in ("invalid_grant", "interaction_required", "consent_required", "login_required"):
        return NeedsReconsentError(f"the stored sign-in of {mailbox} is no longer valid ({detail})")
    return TransientError(f"Entra ID could not renew the token of {mailbox} now ({error}, {code_text})")
