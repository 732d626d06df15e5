"""IMAP access tokens for each mailbox, renewed silently from the refresh token kept in Key Vault.

Entra returns a new refresh token at every renewal and does not revoke the one redeemed: each stays valid for 90
days from its issue unless the grant is revoked. Key Vault keeps every write as a version. So:
- a renewed cache is used from memory, and written to Key Vault only when the stored one is older than
  TOKEN_REWRITE_AFTER: the stored refresh token never comes near its 90 days, and a mailbox costs Key Vault at
  most one new version (and the disabling of the one before) a day;
- a pending write is applied only if Key Vault still holds the version it was renewed from: a re-consent or
  another worker's newer token is never replaced by this worker's (instances share no memory);
- if a due write fails, the new cache stays in this worker's memory and is written first thing next time;
- a transient failure never discards a stored token; only a definitive answer raises NeedsReconsentError, and a
  renewal never brings back a token whose secret was deleted (a revoked mailbox);
- a warm worker whose access token is still fresh touches Key Vault not at all.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

import msal

from collectors.entra import UNREACHABLE, confidential_app, error_from_result
from shared.errors import CollectorError, NeedsReconsentError, TransientError
from shared.registry import utcnow
from shared.settings import Settings
from shared.token_store import SavedCache, StaleTokenError, StoredCache, TokenCacheStore

logger = logging.getLogger(__name__)

# MSAL itself renews 5 minutes before expiry; we renew a little earlier so that a token handed to an IMAP
# login stays valid through a long run.
ACCESS_TOKEN_MARGIN = 600  # seconds
# A renewed refresh token is written when the stored one is this old. Entra keeps the stored one valid for 90 days
# from its issue (rotation does not revoke it), so a day leaves 89 days of margin; the no-loss tests against the
# stand-in's strict rotation set it to 0 (write every rotation).
TOKEN_REWRITE_AFTER = 24 * 3600  # seconds


@dataclass(frozen=True)
class AccessToken:
    token: str
    expires_on: float
    renewed: bool  # a new token was obtained from the identity provider in this call
    saved_at: datetime | None  # when a renewed cache reached Key Vault (None: nothing new was written)
    secret_name: str = ""  # the secret it was written to (set with saved_at)

    def __repr__(self) -> str:  # never show the token
        return f"AccessToken(expires_on={self.expires_on!r}, renewed={self.renewed!r})"


@dataclass
class _Warm:
    serialized: str = dataclasses.field(repr=False)  # holds the refresh token
    stored: StoredCache  # the Key Vault version this cache was read as or renewed from
    signed_in_as: str
    unsaved: bool = False  # ``serialized`` holds a newer refresh token than ``stored``


class TokenProvider(Protocol):
    """Access tokens for a mailbox's mail source. Delegated per-mailbox token caches today (TokenService);
    app-only tokens (client credentials) are another implementation of the same two methods."""

    def access_token(
        self, address: str, *, signed_in_as: str, deadline: float | None = None, secret_name: str = ""
    ) -> AccessToken:
        """A token valid for a good while yet, obtained by ``deadline`` (a ``time.monotonic`` time) when one is
        given; ``secret_name`` is where the registry says the token is kept. Raises NeedsReconsentError,
        ConfigurationError or TransientError."""
        ...

    def forget(self, address: str) -> None:
        """Drop what is kept in memory for ``address`` (after a re-consent or a revocation)."""
        ...


class TokenService:
    """Hands out access tokens per mailbox. Thread-safe; callers hold the mailbox's lease."""

    def __init__(
        self,
        settings: Settings,
        store: TokenCacheStore,
        *,
        app_factory: Callable[[Settings, msal.TokenCache], msal.ConfidentialClientApplication] = confidential_app,
    ) -> None:
        self._settings = settings
        self._store = store
        self._app_factory = app_factory  # the identity provider's client (a fake one in unit tests)
        self._warm: dict[str, _Warm] = {}
        self._lock = threading.Lock()

    @property
    def scopes(self) -> list[str]:
        return [self._settings.imap_scope]

    def forget(self, address: str) -> None:
        """Drop the warm copy (after re-consent or revocation, the stored cache is the truth)."""
        with self._lock:
            self._warm.pop(address, None)

    def access_token(
        self, address: str, *, signed_in_as: str, deadline: float | None = None, secret_name: str = ""
    ) -> AccessToken:
        """A valid access token for ``address``'s IMAP scope; ``secret_name`` is the registry's (empty: the
        mailbox's key). Key Vault calls end by ``deadline`` (``shared.retry``).

        Raises NeedsReconsentError (definitive), ConfigurationError, or TransientError (retry later; any stored
        or in-memory refresh token is kept).
        """
        with self._lock:
            warm = self._warm.get(address)
        saved: SavedCache | None = None
        if warm is not None and warm.unsaved and self._due(warm):
            saved = self._persist_or_keep(address, warm, deadline)
            with self._lock:
                warm = self._warm.get(address)  # dropped when Key Vault holds a newer token
        if warm is not None:
            token = self._cached_token(warm)
            if token is not None:
                return _with_save(token, saved)
        stored = self._store.load(address, secret_name, deadline=deadline)
        if stored is None:
            self.forget(address)
            raise NeedsReconsentError(f"no token is stored for {address} (its Key Vault secret is missing)")
        if warm is None or stored.version != warm.stored.version:
            # A cold worker, or another worker or a re-consent wrote meanwhile: the stored token is the one to use.
            warm = _Warm(stored.serialized, stored, signed_in_as or address)
            token = self._cached_token(warm)
            if token is not None:
                with self._lock:
                    self._warm[address] = warm
                return _with_save(token, saved)
        try:
            token = self._renew(address, warm, deadline)
        except NeedsReconsentError:
            # A re-consent (or another worker) may have stored a newer token meanwhile: only the latest one counts.
            latest = self._store.load(address, secret_name, deadline=deadline)
            if latest is None or latest.version == warm.stored.version:
                raise
            token = self._renew(address, _Warm(latest.serialized, latest, signed_in_as or address), deadline)
        return token if token.saved_at is not None else _with_save(token, saved)

    def _due(self, warm: _Warm) -> bool:
        written = warm.stored.written_at
        return written is None or time.time() - written.timestamp() >= TOKEN_REWRITE_AFTER

    def renew(self, address: str, *, signed_in_as: str, secret_name: str = "") -> AccessToken:
        """Renew now, however fresh the cached access token: the keep-alive of a mailbox nothing collects (Entra
        ID lets a refresh token expire 90 days after its issue). The renewed token is written when the stored one
        is older than TOKEN_REWRITE_AFTER, which a keep-alive's stored token always is. Raises as access_token
        does."""
        with self._lock:
            warm = self._warm.get(address)
        if warm is not None and warm.unsaved and self._due(warm):
            return self.access_token(address, signed_in_as=signed_in_as, secret_name=secret_name)  # saves it first
        stored = self._store.load(address, secret_name)
        if stored is None:
            self.forget(address)
            raise NeedsReconsentError(f"no token is stored for {address} (its Key Vault secret is missing)")
        return self._renew(address, _Warm(stored.serialized, stored, signed_in_as or address), None)

    def _cached_token(self, warm: _Warm) -> AccessToken | None:
        cache = msal.SerializableTokenCache()
        cache.deserialize(warm.serialized)
        now = time.time()
        for entry in cache.search(msal.TokenCache.CredentialType.ACCESS_TOKEN, target=self.scopes):
            expires_on = float(entry.get("expires_on", 0))
            if expires_on - now > ACCESS_TOKEN_MARGIN:
                return AccessToken(entry["secret"], expires_on, renewed=False, saved_at=None)
        return None

    def _renew(self, address: str, warm: _Warm, deadline: float | None) -> AccessToken:
        cache = msal.SerializableTokenCache()
        cache.deserialize(warm.serialized)
        app = self._app_factory(self._settings, cache)
        accounts = app.get_accounts()
        account = next(
            (a for a in accounts if str(a.get("username", "")).lower() == warm.signed_in_as.lower()),
            accounts[0] if accounts else None,
        )
        if account is None:
            raise NeedsReconsentError(f"the stored token cache of {address} holds no account")
        try:
            # Only reached when no cached token outlives ACCESS_TOKEN_MARGIN. MSAL's own margin is shorter (5 minutes):
            # left to itself it would hand back the same expiring token, and the next run would read Key Vault again.
            result = app.acquire_token_silent_with_error(self.scopes, account, force_refresh=True)
        except UNREACHABLE as e:
            raise TransientError(
                f"Entra ID unreachable while renewing the token of {address}: {type(e).__name__}"
            ) from e
        if not result:
            raise NeedsReconsentError(f"the stored token cache of {address} holds no refresh token")
        if "access_token" not in result:
            error: CollectorError = error_from_result(result, mailbox=address)
            raise error
        renewed = cache.has_state_changed
        saved = None
        if renewed:
            warm = _Warm(cache.serialize(), warm.stored, warm.signed_in_as, unsaved=True)
            with self._lock:
                self._warm[address] = warm
            if self._due(warm):
                saved = self._persist_or_keep(address, warm, deadline)
        else:
            with self._lock:
                self._warm[address] = warm
        expires_on = time.time() + float(result.get("expires_in", 0))
        token = AccessToken(result["access_token"], expires_on, renewed=renewed, saved_at=None)
        return _with_save(token, saved)

    def _persist_or_keep(self, address: str, warm: _Warm, deadline: float | None) -> SavedCache | None:
        """Write a due cache; on a transient failure keep it in memory for the next call (the access token is
        good meanwhile). Returns None when nothing was written."""
        try:
            return self._save(address, warm, deadline)
        except StaleTokenError as e:
            # A re-consent or another worker wrote a newer token: ours must not replace it.
            logger.info("renewed token dropped mailbox=%s outcome=token_superseded reason=%s", address, e)
            self.forget(address)
            return None
        except TransientError as e:
            logger.warning("renewed token not yet saved mailbox=%s outcome=token_save_pending error=%s", address, e)
            return None
        except NeedsReconsentError:
            self.forget(address)
            raise

    def _save(self, address: str, warm: _Warm, deadline: float | None) -> SavedCache:
        """One write: the Key Vault client retries on its own, within the deadline. A failure keeps the cache in
        memory (``unsaved``) and the next call writes it first (``shared.retry``: no loop around the SDK's)."""
        saved = self._store.save(
            address, warm.serialized, name=warm.stored.name, based_on=warm.stored, deadline=deadline
        )
        with self._lock:
            # Aged by this worker's clock from now on: Key Vault's clock may differ from ours.
            written = datetime.fromtimestamp(time.time(), UTC)
            warm.stored = StoredCache(warm.serialized, saved.version, saved.name, written)
            warm.unsaved = False
        logger.info("token cache saved mailbox=%s", address)
        return saved


def _with_save(token: AccessToken, saved: SavedCache | None) -> AccessToken:
    """The token, carrying the save of a cache renewed in this or an earlier call (the registry records it)."""
    if saved is None:
        return token
    return dataclasses.replace(token, saved_at=saved.written_at or utcnow(), secret_name=saved.name)
