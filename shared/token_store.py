"""Each mailbox's MSAL token cache, kept as one Key Vault secret named after the mailbox.

The secret value is the serialized cache (it holds the refresh token); tags carry only the address, the
identity provider and who signed in, never a token.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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
from shared.mailboxes import mailbox_key
from shared.retry import call_options

logger = logging.getLogger(__name__)

CONTENT_TYPE = "application/vnd.msal.token-cache+json"
MAX_SECRET_BYTES = 25 * 1024  # Key Vault's limit for a secret value
TRANSITION_ATTEMPTS = 10
TRANSITION_WAIT = 1.0  # seconds between attempts while Key Vault finishes a delete or purge


@dataclass(frozen=True)
class Removal:
    existed: bool  # there was a live secret to delete
    purged: bool  # nothing of it is left in the vault (False: soft-deleted, recoverable by a vault admin)


@dataclass(frozen=True)
class StoredCache:
    serialized: str = field(repr=False)  # holds the refresh token: never in a repr, log or traceback
    version: str


class TokenCacheStore:
    """Reads and writes token caches. Every failure is turned into TransientError or ConfigurationError."""

    def __init__(self, client: SecretClient) -> None:
        self._client = client

    def load(self, address: str, *, deadline: float | None = None) -> StoredCache | None:
        """The latest cache of ``address``, or None when there is no secret (the mailbox was never authorized).

        With ``deadline`` (a ``time.monotonic`` time) the read and the client's retries end by then (``shared.retry``).
        """
        options = call_options(deadline)
        try:
            secret = self._call("read", address, self._client.get_secret, mailbox_key(address), **options)
        except ResourceNotFoundError:
            return None
        return StoredCache(serialized=secret.value or "", version=secret.properties.version or "")

    def save(
        self,
        address: str,
        serialized: str,
        *,
        signed_in_as: str,
        new_consent: bool = False,
        deadline: float | None = None,
    ) -> str:
        """Store a new version and return its version id. Raises before anything is written if it is too big.

        One call: the client retries on its own, and ends by ``deadline`` when one is given (``shared.retry``).

        A revoked mailbox's secret stays deleted: a renewal raises NeedsReconsentError. Only ``new_consent`` writes
        it again, and never with an old version readable (see ``_replace_deleted``).
        """
        if len(serialized.encode()) > MAX_SECRET_BYTES:
            raise ConfigurationError(
                f"token cache of {address} is larger than Key Vault's 25 KB secret limit",
                remedy="revoke and re-authorize the mailbox so that its cache holds one account only",
            )
        options: dict[str, Any] = {
            **call_options(deadline),
            "content_type": CONTENT_TYPE,
            "tags": {"mailbox": address, "provider": "entra", "signed-in-as": signed_in_as},
        }

        def write() -> Any:
            return self._call("write", address, self._client.set_secret, mailbox_key(address), serialized, **options)

        try:
            secret = write()
        except ResourceExistsError:
            if not new_consent:
                raise NeedsReconsentError(
                    f"the token of {address} was revoked (its Key Vault secret is deleted); the renewed token is "
                    "not stored"
                ) from None
            secret = self._replace_deleted(address, write)
        return str(secret.properties.version or "")

    def _replace_deleted(self, address: str, write: Callable[[], Any]) -> Any:
        """Write a new consent where a revoked secret is soft-deleted. Purged first when the vault allows it;
        otherwise (purge protection) the name can only be recovered: the new cache is written and every older
        version is disabled, so that no pre-revoke refresh token can be read again."""
        if self._purge(address):
            return self._retry_while_deleting(address, write)
        self._call("recover", address, self._client.begin_recover_deleted_secret, mailbox_key(address)).wait()
        secret = write()
        for version in self._client.list_properties_of_secret_versions(mailbox_key(address)):
            if version.version != secret.properties.version and version.enabled:
                self._call(
                    "disable an old version",
                    address,
                    self._client.update_secret_properties,
                    mailbox_key(address),
                    version.version,
                    enabled=False,
                )
        return secret

    def remove(self, address: str) -> Removal:
        """Revoke: delete the secret with every version, then purge it when the vault allows it.

        Succeeds when it is already absent. ``Removal.purged`` is False when the vault keeps it soft-deleted
        (purge protection, or no purge right): a vault admin could still recover it until the retention ends.
        """
        existed = True
        try:
            self._call("delete", address, self._client.begin_delete_secret, mailbox_key(address)).wait()
        except ResourceNotFoundError:
            existed = False  # never written, or deleted before: a soft-deleted one is still purged below
        return Removal(existed=existed, purged=self._purge(address))

    def delete(self, address: str) -> None:
        """Delete the secret and purge it when allowed (as ``remove``); succeeds when it is already absent."""
        self.remove(address)

    def _purge(self, address: str) -> bool:
        """Purge the soft-deleted secret. True when nothing of it is left; False when the vault refuses (403)."""
        try:
            self._retry_while_deleting(address, lambda: self._client.purge_deleted_secret(mailbox_key(address)))
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

    @staticmethod
    def _retry_while_deleting(address: str, fn: Callable[[], Any]) -> Any:
        """Key Vault deletes, purges and recovers asynchronously: it answers 409 (ObjectIsBeingDeleted) meanwhile."""
        for attempt in range(TRANSITION_ATTEMPTS):
            try:
                return fn()
            except ResourceExistsError:
                if attempt == TRANSITION_ATTEMPTS - 1:
                    raise TransientError(
                        f"Key Vault is still deleting the old token secret of {address}",
                        remedy="open the authorize link again in a minute",
                    ) from None
                time.sleep(TRANSITION_WAIT)
        raise AssertionError("unreachable")

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
                    remedy="grant the app's identity the 'Key Vault Secrets Officer' role on the vault",
                ) from e
            retry_after = _retry_after(e)
            raise TransientError(
                f"Key Vault {action} failed for {address} (HTTP {e.status_code})", retry_after=retry_after
            ) from e
        except AzureError as e:
            raise TransientError(f"Key Vault unreachable during {action} for {address}: {type(e).__name__}") from e


def _retry_after(error: HttpResponseError) -> float | None:
    response = error.response
    value = response.headers.get("Retry-After") if response is not None else None  # type: ignore[attr-defined]
    try:
        return float(value) if value else None
    except ValueError:
        return None
