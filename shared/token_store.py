"""Each mailbox's MSAL token cache, kept as a Key Vault secret whose name is a digest of the address.

Key Vault makes every write a new version, versions cannot be deleted, and a secret with more than 500 versions
cannot be backed up; names and tags may be copied outside the vault's region. So:
- names and tags hold no personal data: the name is ``mailbox_key`` (a full SHA-256 of the address), tags hold
  the provider and a version count; the address lives in the mailbox registry only;
- a write disables the version before it, so old refresh tokens are no longer readable from the vault;
- before a secret reaches ROLLOVER_VERSIONS versions the next write goes to a new name (``<key>-g<n>``) and the
  old secret is deleted; the registry row records the current name;
- a write based on an earlier read (``based_on``) is applied only if that version is still the latest, so a
  worker's stale token never replaces a newer consent;
- a deleted (revoked) secret is never written again by a renewal (NeedsReconsentError); only a new consent writes
  it again, purged first where the vault allows it, or else recovered with every older version disabled, so no
  refresh token from before a revoke can be read again;
- a revoke deletes every name of the mailbox with every version, and purges them where the vault allows it;
- a delete or recovery in progress (409 ``ObjectIsBeingDeleted``/``ObjectIsBeingRecovered``) is retried with
  backoff until the caller's deadline, then reported as transient.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
)
from azure.keyvault.secrets import SecretClient

from shared.errors import ConfigurationError, NeedsReconsentError, TransientError
from shared.mailboxes import legacy_mailbox_key, mailbox_key
from shared.retry import MIN_CALL_SECONDS, call_options

logger = logging.getLogger(__name__)

CONTENT_TYPE = "application/vnd.msal.token-cache+json"
MAX_SECRET_BYTES = 25 * 1024  # Key Vault's limit for a secret value
ROLLOVER_VERSIONS = 450  # a new secret name before Key Vault's 500-version backup limit
BUSY_CODES = ("ObjectIsBeingDeleted", "ObjectIsBeingRecovered")
BUSY_BACKOFF = (0.5, 4.0)  # seconds: first wait, longest wait between retries of a busy secret
DEFAULT_BUSY_WAIT = 30.0  # seconds to keep retrying a busy secret when the caller gives no deadline
VERSIONS_TAG = "versions"
_GENERATION = re.compile(r"-g(\d+)$")


@dataclass(frozen=True)
class Removal:
    existed: bool  # there was a live secret to delete
    purged: bool  # nothing of it is left in the vault (False: soft-deleted, recoverable by a vault admin)


@dataclass(frozen=True)
class StoredCache:
    serialized: str = field(repr=False)  # holds the refresh token: never in a repr, log or traceback
    version: str
    name: str = ""  # the secret it was read from
    written_at: datetime | None = None  # when this version was written (so: the age of its refresh token)
    versions: int = 1  # versions of the secret so far, as counted by the writes


@dataclass(frozen=True)
class SavedCache:
    name: str
    version: str
    written_at: datetime | None


class StaleTokenError(TransientError):
    """The secret holds a newer version than the one a pending write was based on: the pending write is dropped."""


class TokenCacheStore:
    """Reads and writes token caches. Every failure is turned into TransientError, NeedsReconsentError or
    ConfigurationError."""

    def __init__(self, client: SecretClient, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._client = client
        self._clock = clock

    @staticmethod
    def names(address: str, current: str = "") -> list[str]:
        """Every secret name the app may hold for ``address``: the current one (from the registry), the
        digest name, and the name older releases used. Revoking a mailbox deletes them all."""
        found = [n for n in (current, mailbox_key(address), legacy_mailbox_key(address)) if n]
        return list(dict.fromkeys(found))

    def load(self, address: str, name: str = "", *, deadline: float | None = None) -> StoredCache | None:
        """The latest cache of ``address`` (from ``name`` when the registry names one; else the digest name, then
        the name of older releases), or None when there is no secret.

        With ``deadline`` (a ``time.monotonic`` time) each read and the client's retries end by then (``shared.retry``).
        """
        for candidate in self.names(address, name)[: 1 if name else None]:
            try:
                secret = self._call("read", address, self._client.get_secret, candidate, **call_options(deadline))
            except ResourceNotFoundError:
                continue
            tags = getattr(secret.properties, "tags", None) or {}
            return StoredCache(
                serialized=secret.value or "",
                version=secret.properties.version or "",
                name=candidate,
                written_at=_created(secret),
                versions=_count(tags.get(VERSIONS_TAG)),
            )
        return None

    def save(
        self,
        address: str,
        serialized: str,
        *,
        name: str = "",
        based_on: StoredCache | None = None,
        new_consent: bool = False,
        deadline: float | None = None,
    ) -> SavedCache:
        """Store a new version and return where it went.

        ``based_on``: the version this cache was renewed from; the write is refused (StaleTokenError) when the
        secret holds another latest version now. ``new_consent``: a new sign-in, which may write a revoked
        (deleted) secret again (see ``_replace_deleted``); a renewal may not (NeedsReconsentError). Raises
        ConfigurationError before anything is written when the cache is too big, TransientError when Key Vault
        stays busy until ``deadline``.
        """
        if len(serialized.encode()) > MAX_SECRET_BYTES:
            raise ConfigurationError(
                f"token cache of {address} is larger than Key Vault's 25 KB secret limit",
                remedy="revoke and re-authorize the mailbox so that its cache holds one account only",
            )
        current = self.load(address, (based_on.name if based_on is not None else "") or name, deadline=deadline)
        deadline = deadline if deadline is not None else self._clock() + DEFAULT_BUSY_WAIT
        if based_on is not None and (current is None or current.version != based_on.version):
            raise StaleTokenError(
                f"Key Vault holds a newer token for {address} than the one this worker renewed; the worker's is dropped"
            )
        # A secret under the name of older releases is read, never written: its successor takes the digest name.
        candidates = (name, current.name if current is not None else "")
        target = next((n for n in candidates if n and n != legacy_mailbox_key(address)), mailbox_key(address))
        versions = current.versions if current is not None and current.name == target else 0
        if versions + 1 >= ROLLOVER_VERSIONS:
            target, versions = _next_generation(address, target), 0
        try:
            secret = self._write(address, target, serialized, versions + 1, deadline)
        except ResourceExistsError:
            # The secret is deleted: the mailbox was revoked.
            if not new_consent:
                raise NeedsReconsentError(
                    f"the token of {address} was revoked (its Key Vault secret is deleted); the renewed token is "
                    "not stored"
                ) from None
            secret = self._replace_deleted(address, target, serialized, deadline)
            current = None  # _replace_deleted left no older version enabled
        saved = SavedCache(target, str(secret.properties.version or ""), _created(secret))
        if current is not None and current.name == target:
            self._disable(address, target, current.version)
        elif current is not None:
            self._retire(address, current.name)
        return saved

    def remove(self, address: str, name: str = "") -> Removal:
        """Revoke: delete every secret of ``address`` with every version, then purge them when the vault allows it.

        Succeeds when they are already absent. ``Removal.purged`` is False when the vault keeps one soft-deleted
        (purge protection, or no purge right): a vault admin could still recover it until the retention ends.
        """
        existed, purged = False, True
        for candidate in self.names(address, name):
            try:
                self._call("delete", address, self._client.begin_delete_secret, candidate).wait()
                existed = True
            except ResourceNotFoundError:
                pass  # never written, or deleted before: a soft-deleted one is still purged below
            purged = self._purge(address, candidate) and purged
        return Removal(existed=existed, purged=purged)

    def delete(self, address: str, name: str = "") -> None:
        """Delete and purge where allowed (as ``remove``); succeeds when nothing is there."""
        self.remove(address, name)

    # -- internals ----------------------------------------------------------------------------------------------

    def _replace_deleted(self, address: str, name: str, serialized: str, deadline: float) -> Any:
        """Write a new consent where a revoked secret is soft-deleted. Purged first when the vault allows it;
        otherwise (purge protection) the name can only be recovered: the new cache is written and every older
        version is disabled, so that no pre-revoke refresh token can be read again."""
        if self._purge(address, name, deadline):
            return self._write(address, name, serialized, 1, deadline)
        self._busy(address, lambda: self._call("recover", address, self._client.begin_recover_deleted_secret, name),
                   deadline).wait()  # fmt: skip
        secret = self._write(address, name, serialized, 1, deadline)
        for version in self._client.list_properties_of_secret_versions(name):
            if version.version != secret.properties.version and version.enabled:
                self._disable(address, name, str(version.version))
        return secret

    def _purge(self, address: str, name: str, deadline: float | None = None) -> bool:
        """Purge a soft-deleted secret. True when nothing of it is left; False when the vault refuses (403)."""
        deadline = deadline if deadline is not None else self._clock() + DEFAULT_BUSY_WAIT
        try:
            self._busy(address, lambda: self._client.purge_deleted_secret(name), deadline)
        except ResourceNotFoundError:
            return True
        except HttpResponseError as e:
            if e.status_code == 403:
                logger.warning("token secret not purged mailbox=%s reason=purge_refused status=403", address)
                return False
            raise TransientError(f"Key Vault purge failed for {address} (HTTP {e.status_code})") from e
        except AzureError as e:
            raise TransientError(f"Key Vault unreachable during purge for {address}: {type(e).__name__}") from e
        return True

    def _busy(self, address: str, fn: Callable[[], Any], deadline: float) -> Any:
        """Key Vault deletes, purges and recovers asynchronously and answers 409 (``ObjectIsBeingDeleted``,
        ``ObjectIsBeingRecovered``) meanwhile: retry with backoff until ``deadline``, then TransientError."""
        delay = BUSY_BACKOFF[0]
        while True:
            try:
                return fn()
            except ResourceExistsError as e:
                code = getattr(getattr(e, "error", None), "code", "")
                if code not in BUSY_CODES:
                    raise
                if self._clock() + delay + MIN_CALL_SECONDS > deadline:
                    raise TransientError(
                        f"Key Vault is still finishing a delete or recovery of the token of {address} ({code})",
                        remedy="nothing to do: the next run retries (a consent: open the authorize link again in a "
                        "minute)",
                        retry_after=delay,
                    ) from e
                logger.info("token secret busy mailbox=%s code=%s retry_in=%.1f", address, code, delay)
                time.sleep(delay)
                delay = min(delay * 2, BUSY_BACKOFF[1])

    def _write(self, address: str, name: str, serialized: str, versions: int, deadline: float) -> Any:
        tags = {"provider": "entra", VERSIONS_TAG: str(versions)}
        # One call each time: the client retries on its own within the deadline (``shared.retry``); only a busy
        # secret (a 409 the client does not retry) is tried again.
        return self._busy(address, lambda: self._call("write", address, self._client.set_secret, name, serialized,
                                                      content_type=CONTENT_TYPE, tags=tags,
                                                      **call_options(deadline)), deadline)  # fmt: skip

    def _disable(self, address: str, name: str, version: str) -> None:
        """Disable the version a new one replaced: its refresh token is no longer readable from the vault."""
        if not version:
            return
        try:
            self._call("disable", address, self._client.update_secret_properties, name, version, enabled=False)
        except (TransientError, ResourceNotFoundError) as e:
            logger.warning("earlier token version not disabled mailbox=%s error=%s", address, e)

    def _retire(self, address: str, name: str) -> None:
        """Delete the secret a rollover left behind (its versions hold older refresh tokens)."""
        try:
            with contextlib.suppress(ResourceNotFoundError, ResourceExistsError):
                self._call("delete", address, self._client.begin_delete_secret, name)
        except TransientError as e:
            logger.warning("old token secret not deleted mailbox=%s error=%s", address, e)

    @staticmethod
    def _call(action: str, address: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ResourceNotFoundError, ResourceExistsError):
            raise
        except ClientAuthenticationError as e:
            raise ConfigurationError(
                f"Key Vault refused to authenticate the app while trying to {action} the token of {address}",
                remedy="check KEY_VAULT_URI and the identity the app runs as",
            ) from e
        except HttpResponseError as e:
            if e.status_code == 403:
                raise ConfigurationError(
                    f"Key Vault denied the {action} of the token of {address} (403)",
                    remedy="give the app's identity the 'Key Vault Secrets Officer' role on the vault; right after "
                    "provisioning the role assignment may still be propagating (up to about 10 minutes): wait, then "
                    "the next run retries",
                ) from e
            retry_after = _retry_after(e)
            raise TransientError(
                f"Key Vault {action} failed for {address} (HTTP {e.status_code})", retry_after=retry_after
            ) from e
        except AzureError as e:
            raise TransientError(f"Key Vault unreachable during {action} for {address}: {type(e).__name__}") from e


def _next_generation(address: str, name: str) -> str:
    base = mailbox_key(address)
    match = _GENERATION.search(name) if name.startswith(base) else None
    return f"{base}-g{int(match.group(1)) + 1 if match else 2}"


def _created(secret: Any) -> datetime | None:
    created: datetime | None = getattr(secret.properties, "created_on", None)
    return created


def _count(value: str | None) -> int:
    try:
        return max(1, int(value or 1))
    except ValueError:
        return 1


def _retry_after(error: HttpResponseError) -> float | None:
    response = error.response
    value = response.headers.get("Retry-After") if response is not None else None  # type: ignore[attr-defined]
    try:
        return float(value) if value else None
    except ValueError:
        return None
