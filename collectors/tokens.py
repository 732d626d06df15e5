"""IMAP access tokens for each mailbox, renewed silently from the refresh token kept in Key Vault.

Guarantees:
- a refresh token the identity provider returns is written to Key Vault before it is used again: MSAL renews
  only after the latest stored cache has been read, and the new cache is saved right after;
- if that write fails, the new cache stays in this worker's memory and is written first thing next time;
- a transient failure never discards a stored token; only a definitive answer raises NeedsReconsentError;
- a warm worker whose access token is still fresh touches Key Vault not at all.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

import msal

from collectors.entra import UNREACHABLE, confidential_app, error_from_result
from shared.errors import CollectorError, NeedsReconsentError, TransientError
from shared.registry import utcnow
from shared.settings import Settings
from shared.token_store import TokenCacheStore

logger = logging.getLogger(__name__)

# MSAL itself renews 5 minutes before expiry; we renew a little earlier so that a token handed to an IMAP
# login stays valid through a long run.
ACCESS_TOKEN_MARGIN = 600  # seconds


@dataclass(frozen=True)
class AccessToken:
    token: str
    expires_on: float
    renewed: bool  # a new token was obtained from the identity provider in this call
    saved_at: datetime | None  # when a renewed cache reached Key Vault (None: nothing new to save)

    def __repr__(self) -> str:  # never show the token
        return f"AccessToken(expires_on={self.expires_on!r}, renewed={self.renewed!r})"


@dataclass
class _Warm:
    serialized: str = dataclasses.field(repr=False)  # holds the refresh token
    version: str
    signed_in_as: str
    unsaved: bool = False


class TokenProvider(Protocol):
    """Access tokens for a mailbox's mail source. Delegated per-mailbox token caches today (TokenService);
    app-only tokens (client credentials) are another implementation of the same two methods."""

    def access_token(self, address: str, *, signed_in_as: str, deadline: float | None = None) -> AccessToken:
        """A token valid for a good while yet, obtained by ``deadline`` (a ``time.monotonic`` time) when one is
        given. Raises NeedsReconsentError, ConfigurationError or TransientError."""
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

    def access_token(self, address: str, *, signed_in_as: str, deadline: float | None = None) -> AccessToken:
        """A valid access token for ``address``'s IMAP scope. Key Vault calls end by ``deadline`` (``shared.retry``).

        Raises NeedsReconsentError (definitive), ConfigurationError, or TransientError (retry later; any stored
        or in-memory refresh token is kept).
        """
        with self._lock:
            warm = self._warm.get(address)
        pending_saved_at = None
        if warm is not None and warm.unsaved:
            try:
                pending_saved_at = self._save(address, warm, deadline)
            except TransientError as e:
                # Still kept in memory and tried again next time; collecting meanwhile loses nothing more.
                logger.warning(
                    "rotated token still not saved mailbox=%s outcome=token_save_pending error=%s", address, e
                )
        if warm is not None:
            token = self._cached_token(warm)
            if token is not None:
                # The registry's token age must count the save of the token renewed in an earlier run.
                return dataclasses.replace(token, saved_at=pending_saved_at)
        stored = self._store.load(address, deadline=deadline)
        if stored is None:
            if warm is None or not warm.unsaved:
                raise NeedsReconsentError(f"no token is stored for {address} (its Key Vault secret is missing)")
        elif warm is None or stored.version != warm.version:
            warm = _Warm(stored.serialized, stored.version, signed_in_as or address)
            # A cold worker, or another worker renewed meanwhile: a stored token that is still good is used as is.
            token = self._cached_token(warm)
            if token is not None:
                with self._lock:
                    self._warm[address] = warm
                return dataclasses.replace(token, saved_at=pending_saved_at)
        assert warm is not None
        try:
            token = self._renew(address, warm, deadline)
        except NeedsReconsentError:
            # A re-consent (or another worker) may have stored a newer token meanwhile: only the latest one counts.
            latest = self._store.load(address, deadline=deadline)
            if latest is None or latest.version == warm.version or warm.unsaved:
                raise
            token = self._renew(address, _Warm(latest.serialized, latest.version, signed_in_as or address), deadline)
        if token.saved_at is None and pending_saved_at is not None:
            token = dataclasses.replace(token, saved_at=pending_saved_at)
        return token

    def renew(self, address: str, *, signed_in_as: str) -> AccessToken:
        """Renew now, however fresh the cached access token: the keep-alive of a mailbox nothing collects (Entra
        ID lets a refresh token unused for 90 days expire). Raises as access_token does."""
        with self._lock:
            warm = self._warm.get(address)
        if warm is not None and warm.unsaved:
            return self.access_token(address, signed_in_as=signed_in_as)  # saves the pending cache first
        stored = self._store.load(address)
        if stored is None:
            raise NeedsReconsentError(f"no token is stored for {address} (its Key Vault secret is missing)")
        return self._renew(address, _Warm(stored.serialized, stored.version, signed_in_as or address), None)

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
        saved_at = None
        if renewed:
            warm = _Warm(cache.serialize(), warm.version, warm.signed_in_as, unsaved=True)
            with self._lock:
                self._warm[address] = warm
            try:
                saved_at = self._save(address, warm, deadline)
            except TransientError as e:
                # The access token is good; collection goes on and the next call writes the cache first.
                logger.warning(
                    "token renewed but not yet saved mailbox=%s outcome=token_save_pending error=%s", address, e
                )
        else:
            with self._lock:
                self._warm[address] = warm
        expires_on = time.time() + float(result.get("expires_in", 0))
        return AccessToken(result["access_token"], expires_on, renewed=renewed, saved_at=saved_at)

    def _save(self, address: str, warm: _Warm, deadline: float | None) -> datetime:
        """One write: the Key Vault client retries on its own, within the deadline. A failure keeps the cache in
        memory (``unsaved``) and the next call writes it first (``shared.retry``: no loop around the SDK's)."""
        version = self._store.save(address, warm.serialized, signed_in_as=warm.signed_in_as, deadline=deadline)
        with self._lock:
            warm.version = version
            warm.unsaved = False
        logger.info("token cache saved mailbox=%s", address)
        return utcnow()
