"""The consent flow ("Create an authorization"): an admin opens the start link for a mailbox, signs in to Entra ID
as the mailbox (or as a delegate of a shared mailbox), and the mailbox's token cache lands in Key Vault.

Guarantees:
- MSAL owns PKCE, state and nonce; the flow is kept server-side keyed by ``state``, lives FLOW_TTL, and is used
  once: it is marked taken by an ETag-conditioned update before the code is redeemed (a conditional delete would
  not do: azure-data-tables returns silently when the row is already gone), so of concurrent callbacks with the
  same state exactly one redeems the code;
- expired flows are deleted as new ones start, and a mailbox has at most MAX_OPEN_FLOWS open at a time;
- whatever the callback is sent, a bad field is an INVALID ConsentProblem, never an unexpected error;
- nothing is stored unless the fresh access token logs in to IMAP as ``user=<mailbox>`` and opens the folder: the
  account that signed in is the mailbox or has Full Access to it, whatever its sign-in name (Exchange goes by the
  account, and a UPN often differs from the mailbox's addresses);
- the secret is written before the registry row, so a row never points to a missing secret;
- no token, code, verifier or secret appears in a page or a log line.
"""

from __future__ import annotations

import binascii
import itertools
import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum
from typing import Any

import msal
from azure.core import MatchConditions
from azure.core.exceptions import AzureError, ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import TableClient, UpdateMode

from collectors.app_mailboxes import prove_access
from collectors.entra import RECONSENT_CODES, UNREACHABLE, aadsts_codes, confidential_app, error_from_result
from collectors.tokens import TokenProvider
from shared import audit
from shared.errors import CollectorError, ConfigurationError, MailboxAccessError, TransientError
from shared.mailboxes import InvalidMailboxError, normalize_address
from shared.registry import Mailbox, MailboxMode, MailboxOptions, MailboxRegistry, MailboxStatus, utcnow
from shared.settings import Settings
from shared.token_store import TokenCacheStore

logger = logging.getLogger(__name__)
_GUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

FLOW_TTL = timedelta(minutes=15)  # long enough to sign in with MFA, short enough that a leaked link goes stale
FLOW_PARTITION = "flow"
MAX_OPEN_FLOWS = 5  # per mailbox: an admin retrying a sign-in needs a few; the oldest gives way to a new one
PURGE_BATCH = 100  # expired flows deleted per new flow: the table shrinks faster than a busy admin fills it
_STATE = re.compile(r"^[A-Za-z0-9_-]{8,128}$")

# What an admin sees for the errors Entra sends back to the callback.
AUTHORIZE_ERRORS: Mapping[int, str] = {
    65004: "The user declined to consent. Start again and choose Accept on the permissions page.",
    65001: "The IMAP permission has not been consented to. Sign in as the mailbox and accept, or ask a Global "
    "Administrator to grant admin consent for the app (Entra admin center > App registrations > API permissions).",
    90094: "An administrator must approve this app (user consent is disabled in the tenant). Ask a Global "
    "Administrator to grant admin consent, then start again.",
    90095: "An administrator must approve this app (admin consent workflow). Request approval, then start again.",
    50011: "The redirect URI is not registered on the app. Add the callback URL (see README) to the app's "
    "Web platform redirect URIs.",
    700016: "The application id is not found in the tenant: check ENTRA_CLIENT_ID and ENTRA_TENANT_ID.",
    50105: "The signed-in account is not assigned to the application. Assign it in Enterprise applications.",
    53003: "A Conditional Access policy blocked the sign-in.",
}


class ConsentFailure(Enum):
    """What kind of problem stopped a consent; the HTTP layer chooses the status for each."""

    INVALID = "invalid"  # the request or the sign-in response cannot be used: start over
    REFUSED = "refused"  # the user, the tenant or this app refused the account: act on the account or consent
    PROVIDER = "provider"  # Entra ID refused the app's own configuration: fix the app registration


class ConsentProblem(Exception):
    """A consent that cannot go on. ``kind`` says whose problem it is; ``title``/``detail``/``next_step`` are safe
    to show on a page (they never hold a token, code or secret)."""

    def __init__(
        self,
        kind: ConsentFailure,
        title: str,
        detail: str,
        next_step: str = "Open the mailbox's authorize link again to start over.",
    ) -> None:
        super().__init__(f"{title}: {detail}")
        self.kind = kind
        self.title = title
        self.detail = detail
        self.next_step = next_step


@dataclass(frozen=True)
class Revocation:
    """What a revoke removed, and what it cannot remove: the grant at Entra ID (delegated), or the app's access to
    the mailbox in Exchange (app mode)."""

    address: str
    existed: bool
    signed_in_as: str
    secret_purged: bool
    mode: MailboxMode = MailboxMode.DELEGATED

    @property
    def in_key_vault(self) -> str:
        if self.mode == MailboxMode.APP:
            return "Nothing was stored in Key Vault for this mailbox: app mode keeps no secret per mailbox."
        if self.secret_purged:
            return "The token secret is deleted with every version and purged."
        return (
            "The token secret is deleted with every version; the vault keeps it soft-deleted (purge protection or "
            "no purge right) until its retention ends, readable by no one unless a vault admin recovers it."
        )

    @property
    def at_entra(self) -> str:
        if self.mode == MailboxMode.APP:
            return (
                f"The app itself can still open {self.address}: Exchange lets it in for as long as the app holds "
                "IMAP.AccessAsApp and its permission on the mailbox. To end that, an Exchange admin runs "
                f"Remove-MailboxPermission -Identity {self.address} -User <enterprise application object id> "
                "-AccessRights FullAccess (Exchange Online PowerShell); if the access was given through RBAC for "
                "Applications instead, remove the mailbox from that role assignment's management scope (or the "
                "assignment, Remove-ManagementRoleAssignment). Removing the app's admin consent to IMAP.AccessAsApp "
                "ends its access to every app-mode mailbox at once."
            )
        account = self.signed_in_as or self.address
        return (
            f"Refresh tokens that Entra ID already issued to this app for {account} stay valid at Entra ID until they "
            "go 90 days unused or are revoked; the app no longer holds any. To end them now, an Entra admin revokes "
            f"the sessions of {account} (Entra admin center > Users > Revoke sessions, or Revoke-MgUserSignInSession) "
            "and, to remove the consent itself, deletes the app's delegated permission grant for that user "
            "(Enterprise applications > the app > Permissions, or Remove-MgOauth2PermissionGrant)."
        )


@dataclass(frozen=True)
class ConsentResult:
    address: str
    signed_in_as: str
    reconsent: bool


class ConsentService:
    def __init__(
        self,
        settings: Settings,
        *,
        flows: TableClient,
        registry: MailboxRegistry,
        store: TokenCacheStore,
        tokens: TokenProvider | None = None,
        app_factory: Callable[[Settings, msal.TokenCache | None], msal.ConfidentialClientApplication] = (
            confidential_app
        ),
        prove: Callable[..., int] = prove_access,
    ) -> None:
        self._settings = settings
        self._app_factory = app_factory  # the identity provider's client (a fake one in unit tests)
        self._flows = flows
        self._registry = registry
        self._store = store
        self._tokens = tokens
        self._prove = prove  # the IMAP login and SELECT of collectors.app_mailboxes (a fake one in unit tests)

    def start(
        self,
        address_text: str,
        *,
        redirect_uri: str,
        delegate: str = "",
        options: Mapping[str, str] | None = None,
        admin: str = "",
    ) -> str:
        """Begin a flow and return the Entra authorize URL to redirect the admin's browser to.

        Raises ConsentProblem for a bad address, delegate or option; TransientError when storage is down.
        """
        address = self._address(address_text, "mailbox")
        signer = self._address(delegate, "delegate") if delegate else address
        existing = self._registry.find(address)
        if existing is not None and existing.mode == MailboxMode.APP:
            # A sign-in would silently turn an unattended mailbox into one that a password reset can stop.
            raise ConsentProblem(
                ConsentFailure.INVALID,
                "Mailbox collected in app mode",
                f"{address} is collected by the app itself (IMAP.AccessAsApp): it needs no sign-in.",
                f"To collect it as a signed-in account instead, revoke it first (DELETE /api/mailboxes/{address}).",
            )
        try:
            chosen = MailboxOptions.from_mapping(options or {}, existing.options if existing else None)
        except ValueError as e:
            raise ConsentProblem(ConsentFailure.INVALID, "Invalid mailbox option", str(e)) from None
        app = self._app_factory(self._settings, None)
        try:
            flow = app.initiate_auth_code_flow(
                [self._settings.imap_scope],
                redirect_uri=redirect_uri,
                login_hint=signer,
                response_mode="form_post",
            )
        except ValueError as e:
            raise ConfigurationError(f"cannot start the authorization flow: {e}") from e
        now = utcnow()
        self.purge_expired_flows(now)
        self._cap_open_flows(address, now)
        entity = {
            "PartitionKey": FLOW_PARTITION,
            "RowKey": flow["state"],
            "flow": json.dumps(flow),
            "address": address,
            "signer": signer,
            "options": json.dumps(chosen.__dict__),
            "admin": admin[:200],
            "expires_at": now + FLOW_TTL,
        }
        try:
            self._flows.create_entity(entity)
        except AzureError as e:
            raise TransientError(f"cannot keep the consent flow (Table storage): {type(e).__name__}") from e
        logger.info("consent started mailbox=%s signer=%s", address, signer)
        return str(flow["auth_uri"])

    def complete(self, form: Mapping[str, str]) -> ConsentResult:
        """Finish a flow from the fields Entra posted to the callback. Stores the token cache, then the row.

        Raises ConsentProblem (with the page to show) for anything the admin must act on; nothing is stored then.
        """
        state = form.get("state", "")
        if not state:
            raise ConsentProblem(
                ConsentFailure.INVALID, "Missing state", "The callback was opened without a sign-in response."
            )
        if not _STATE.match(state):
            raise ConsentProblem(
                ConsentFailure.INVALID, "Invalid state", "The sign-in response does not belong to this app."
            )
        entity = self._take_flow(state)
        address, signer = str(entity["address"]), str(entity["signer"])
        if "error" in form:
            raise self._authorize_error(form, address)
        flow = json.loads(str(entity["flow"]))
        cache = msal.SerializableTokenCache()
        app = self._app_factory(self._settings, cache)
        try:
            result = app.acquire_token_by_auth_code_flow(flow, dict(form), scopes=[self._settings.imap_scope])
        except UNREACHABLE as e:
            raise TransientError(f"Entra ID unreachable while redeeming the code: {type(e).__name__}") from e
        except Exception as e:
            # Whatever MSAL raises here comes from the posted fields checked against the flow: a state mismatch
            # (ValueError), an id token whose nonce is not this flow's (RuntimeError), a client_info that is not
            # base64 JSON of an object (binascii, JSON or Type errors). The message may quote the nonce: not logged.
            logger.warning(
                "consent callback refused mailbox=%s reason=%s error=%s",
                address,
                _msal_reason(e, form),
                type(e).__name__,
            )
            raise ConsentProblem(
                ConsentFailure.INVALID,
                "Invalid sign-in response",
                "The response does not match the sign-in. Nothing was stored.",
            ) from None
        if "error" in result:
            raise self._redeem_error(result, address)
        claims: Mapping[str, Any] = result.get("id_token_claims") or {}
        self._check_token_origin(claims, address)
        # The sign-in name is shown and kept, never compared: it is the UPN, which may differ from every address of
        # the mailbox, and Microsoft says not to authorize on preferred_username or email (id token claims
        # reference). The grant is proven where it counts instead: IMAP with the fresh token.
        signed_in = str(claims.get("preferred_username") or claims.get("upn") or "").lower()
        options = MailboxOptions(**json.loads(str(entity["options"])))
        self._prove_grant(address, signer, signed_in, str(result.get("access_token") or ""), options.folder)
        previous = self._registry.find(address)
        # A consent after a revoke writes the secret again, purged first or with every older version disabled.
        saved = self._store.save(
            address, cache.serialize(), name=previous.token_secret if previous else "", new_consent=True
        )
        now = utcnow()
        self._registry.put(
            Mailbox(
                address=address,
                status=MailboxStatus.ACTIVE,
                options=options,
                signed_in_as=signed_in,
                consented_by=str(entity.get("admin") or ""),
                consented_at=now,
                token_saved_at=now,
                token_secret=saved.name,
                # A re-consent keeps the checkpoint: the mail already collected is not collected again.
                uidvalidity=previous.uidvalidity if previous else 0,
                last_uid=previous.last_uid if previous else 0,
                collected_total=previous.collected_total if previous else 0,
                folder_checkpoints=previous.folder_checkpoints if previous else "",
                pending_after_action=previous.pending_after_action if previous else "",
            )
        )
        if self._tokens is not None:
            self._tokens.forget(address)
        logger.info("consent stored mailbox=%s signed_in=%s reconsent=%s", address, signed_in, previous is not None)
        audit.record(
            "consent",
            mailbox=address,
            who=str(entity.get("admin") or audit.FUNCTION_KEY),
            before={"status": previous.status, "signed_in_as": previous.signed_in_as} if previous else {},
            after={"status": MailboxStatus.ACTIVE, "signed_in_as": signed_in},
        )
        return ConsentResult(address, signed_in, reconsent=previous is not None)

    def _prove_grant(self, address: str, signer: str, signed_in: str, access_token: str, folder: str) -> None:
        """Log in as ``user=<address>`` with the fresh token and SELECT the folder, or refuse with the account named.

        Raises ConsentProblem (nothing is stored then) or TransientError (IMAP unreachable: start over later).
        """
        account = signed_in or "an account whose name Entra ID did not send"
        try:
            self._prove(
                self._settings,
                address,
                access_token,
                folder,
                signed_in_as=signed_in or signer,
                refused=lambda: _AccountRefused(f"IMAP refused the token of {account} for {address}"),
            )
        except _AccountRefused:
            logger.warning(
                "consent refused mailbox=%s signer=%s signed_in=%s reason=no_mailbox_access", address, signer, account
            )
            raise ConsentProblem(
                ConsentFailure.REFUSED,
                "Wrong account",
                f"You signed in as {account}, but this account cannot open the mailbox {address}: the mail server "
                "refused its login. Nothing was stored.",
                "Sign out of Microsoft (or use a private window), open the authorize link again and sign in as the "
                f"mailbox {address} itself or as an account with Full Access to it (Add-MailboxPermission -Identity "
                f"{address} -User <account> -AccessRights FullAccess; for a shared mailbox add delegate=<account> to "
                "the link). Also check that IMAP is enabled for the mailbox (Exchange admin center > mailbox > Email "
                "apps).",
            ) from None
        except MailboxAccessError as e:
            logger.warning("consent refused mailbox=%s signed_in=%s reason=folder folder=%s", address, account, folder)
            raise ConsentProblem(
                ConsentFailure.REFUSED,
                "Folder cannot be opened",
                f"Signed in as {account}, the mailbox {address} opened but its folder {folder!r} did not. "
                "Nothing was stored.",
                f"{e.remedy[:1].upper()}{e.remedy[1:]}, then open the authorize link again.",
            ) from None

    def _check_token_origin(self, claims: Mapping[str, Any], address: str) -> None:
        """The id token was issued for this app (``aud``) in the configured tenant (``tid``); a GUID tenant only, as
        ``organizations`` or ``common`` (a multitenant app) accepts any. MSAL checks the signature and the nonce."""
        expected = self._settings.tenant_id.lower()
        tenant = str(claims.get("tid") or "").lower()
        wrong_tenant = _GUID.fullmatch(expected) is not None and tenant != expected
        if claims.get("aud") == self._settings.client_id and not wrong_tenant:
            return
        logger.warning(
            "consent refused mailbox=%s reason=token_origin tid=%s aud_matches=%s",
            address,
            tenant or "-",
            claims.get("aud") == self._settings.client_id,
        )
        raise ConsentProblem(
            ConsentFailure.REFUSED,
            "Wrong tenant",
            "The sign-in was made in another Microsoft Entra tenant or for another application than this app's. "
            "Nothing was stored.",
            f"Sign in with an account of tenant {self._settings.tenant_id}, or set ENTRA_TENANT_ID to the mailbox's "
            "tenant.",
        )

    def change_options(self, address: str, changes: Mapping[str, Any], *, admin: str) -> Mailbox:
        """Apply an admin's option changes to a registered mailbox and audit them. Returns the updated row.

        Raises NotFoundError when the mailbox is not registered, ValueError (in plain words) for a bad option.
        """
        current = self._registry.get(address)
        options = MailboxOptions.from_mapping(changes, current.options)
        self._registry.set_options(address, options)
        before, after = audit.changes(current.options.__dict__, options.__dict__)
        if after:
            audit.record("options", mailbox=address, who=admin, before=before, after=after)
        return self._registry.get(address)

    def revoke(self, address_text: str, *, admin: str = audit.FUNCTION_KEY) -> Revocation:
        """Delete the mailbox's registry row, then (delegated) its secret with every version, purged when the vault
        allows; an app-mode mailbox has no secret and its revoke touches no Key Vault.

        A run collecting the mailbox meanwhile stops at its next checkpoint (the row is gone). What stays valid
        elsewhere (at Entra ID, or in Exchange for app mode) is said in ``Revocation.at_entra``.
        """
        address = self._address(address_text, "mailbox")
        previous = self._registry.find(address)
        mode = previous.mode if previous is not None else MailboxMode.DELEGATED
        self._registry.delete(address)
        purged = False
        after: dict[str, object] = {"status": "revoked"}
        if mode == MailboxMode.DELEGATED:
            # An app-mode mailbox has no secret, and its revoke makes no Key Vault call; an unregistered address
            # is cleaned up as delegated, in case a failed consent left its secret behind.
            purged = self._store.remove(address, previous.token_secret if previous else "").purged
            after["secret_purged"] = purged
            if self._tokens is not None:
                self._tokens.forget(address)
        logger.info(
            "mailbox revoked mailbox=%s mode=%s existed=%s secret_purged=%s",
            address,
            mode,
            previous is not None,
            purged,
        )
        audit.record(
            "revoke",
            mailbox=address,
            who=admin,
            before={"status": previous.status, "signed_in_as": previous.signed_in_as} if previous else {},
            after=after,
        )
        return Revocation(
            address=address,
            existed=previous is not None,
            signed_in_as=previous.signed_in_as if previous else "",
            secret_purged=purged,
            mode=mode,
        )

    # -- helpers ------------------------------------------------------------------------------------------------

    def _address(self, text: str, what: str) -> str:
        try:
            return normalize_address(text, allowed_domains=self._settings.allowed_domains)
        except InvalidMailboxError as e:
            raise ConsentProblem(
                ConsentFailure.INVALID,
                f"Invalid {what} address",
                f"The {what} address is refused: {e}.",
                "Check the address.",
            ) from None

    def _take_flow(self, state: str) -> Mapping[str, Any]:
        used = ConsentProblem(
            ConsentFailure.INVALID,
            "Unknown or already used sign-in",
            "This sign-in response is not expected: it was already used, it expired, or it was not started here.",
        )
        try:
            entity = self._flows.get_entity(FLOW_PARTITION, state)
            if entity.get("taken"):
                raise used
            # The one request whose conditional update succeeds owns the flow: Table storage answers 412 to every
            # other request that read the same ETag, and 404 once the row is deleted.
            self._flows.update_entity(
                {"PartitionKey": FLOW_PARTITION, "RowKey": state, "taken": True},
                mode=UpdateMode.MERGE,
                etag=entity.metadata["etag"],
                match_condition=MatchConditions.IfNotModified,
            )
        except (ResourceNotFoundError, ResourceModifiedError):
            raise used from None
        except AzureError as e:
            raise TransientError(f"cannot read the consent flow (Table storage): {type(e).__name__}") from e
        try:
            self._flows.delete_entity(FLOW_PARTITION, state)
        except AzureError as e:  # the row is marked taken: a later purge removes it
            logger.warning("consent flow not deleted error=%s", type(e).__name__)
        if entity["expires_at"] < utcnow():
            raise ConsentProblem(
                ConsentFailure.INVALID, "Sign-in expired", "The sign-in took too long and the flow has expired."
            )
        return entity

    def purge_expired_flows(self, now: datetime | None = None) -> None:
        """Delete up to PURGE_BATCH expired flows (each new flow and each scheduled run calls it). Best effort: a
        failure leaves them for the next call."""
        now = now or utcnow()
        try:
            expired = self._flows.query_entities(
                "PartitionKey eq @p and expires_at lt @now",
                parameters={"p": FLOW_PARTITION, "now": now},
                select=["PartitionKey", "RowKey"],
                results_per_page=PURGE_BATCH,
            )
            count = 0
            for entity in itertools.islice(expired, PURGE_BATCH):
                self._flows.delete_entity(FLOW_PARTITION, entity["RowKey"])
                count += 1
        except AzureError as e:
            logger.warning("expired consent flows not purged error=%s", type(e).__name__)
            return
        if count:
            logger.info("consent flows purged expired=%d", count)

    def _cap_open_flows(self, address: str, now: datetime) -> None:
        """Make room for one more open flow of ``address``: the oldest beyond MAX_OPEN_FLOWS - 1 are cancelled."""
        try:
            open_flows = sorted(
                self._flows.query_entities(
                    "PartitionKey eq @p and address eq @a and expires_at ge @now",
                    parameters={"p": FLOW_PARTITION, "a": address, "now": now},
                    select=["RowKey", "expires_at"],
                ),
                key=lambda e: e["expires_at"],
            )
            for entity in open_flows[: max(0, len(open_flows) - (MAX_OPEN_FLOWS - 1))]:
                self._flows.delete_entity(FLOW_PARTITION, entity["RowKey"])
                logger.info("consent flow cancelled mailbox=%s reason=too_many_open_flows", address)
        except AzureError as e:
            raise TransientError(f"cannot count the open consent flows (Table storage): {type(e).__name__}") from e

    def _authorize_error(self, form: Mapping[str, str], address: str) -> ConsentProblem:
        error = form.get("error", "")[:64]
        codes = [int(c) for c in re.findall(r"AADSTS(\d{4,7})", form.get("error_description", ""))]
        explained = next((AUTHORIZE_ERRORS[c] for c in codes if c in AUTHORIZE_ERRORS), None)
        code_text = ", ".join(f"AADSTS{c}" for c in codes)
        logger.warning("consent failed at sign-in mailbox=%s error=%s codes=%s", address, error, code_text or "-")
        detail = explained or f"Entra ID ended the sign-in with {error or 'an error'}."
        refused = error in ("access_denied", "consent_required", "unauthorized_client")
        kind = ConsentFailure.REFUSED if refused else ConsentFailure.INVALID
        title = "Consent declined" if 65004 in codes else "Sign-in did not complete"
        return ConsentProblem(kind, title, f"{detail} ({code_text or error})")

    def _redeem_error(self, result: Mapping[str, Any], address: str) -> ConsentProblem | CollectorError:
        error = error_from_result(result, mailbox=address)
        codes = aadsts_codes(result)
        logger.warning("consent code not redeemed mailbox=%s error_class=%s", address, error.error_class)
        if isinstance(error, TransientError):
            return error
        reason = next((RECONSENT_CODES[c] for c in codes if c in RECONSENT_CODES), None)
        detail = error.remedy if isinstance(error, ConfigurationError) else (reason or "the sign-in code was refused")
        return ConsentProblem(
            ConsentFailure.PROVIDER if isinstance(error, ConfigurationError) else ConsentFailure.INVALID,
            "Sign-in could not be completed",
            f"Entra ID refused to redeem the sign-in ({result.get('error')}, "
            f"{', '.join(f'AADSTS{c}' for c in codes) or 'no AADSTS code'}): {detail}.",
        )


class _AccountRefused(MailboxAccessError):
    """IMAP refused the signed-in account for the mailbox (the login, or Exchange's "authenticated but not
    connected"): the account is neither the mailbox nor a Full Access delegate."""


def _msal_reason(error: Exception, form: Mapping[str, str]) -> str:
    """A short, secret-free name for why MSAL refused the posted fields (the log's ``reason=``)."""
    text = str(error).lower()
    if "nonce" in text:
        return "nonce_mismatch"
    if "state" in text and isinstance(error, ValueError) and not isinstance(error, json.JSONDecodeError):
        return "state_mismatch"
    if form.get("client_info") and isinstance(error, binascii.Error | UnicodeError | ValueError | TypeError | KeyError):
        return "malformed_client_info"
    return "invalid_response"
