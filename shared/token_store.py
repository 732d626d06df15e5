"""Each mailbox's MSAL token cache, kept as one Key Vault secret named after the mailbox.

The secret value is the serialized cache (it holds the refresh token); tags carry only the address, the
identity provider and who signed in, never a token.
"""

from __future__ import annotations

import contextlib
import logging
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

from shared.errors import ConfigurationError, TransientError
from shared.mailboxes import mailbox_key

logger = logging.getLogger(__name__)

CONTENT_TYPE = "application/vnd.msal.token-cache+json"
MAX_SECRET_BYTES = 25 * 1024  # Key Vault's limit for a secret value


@dataclass(frozen=True)
class StoredCache:
    serialized: str = field(repr=False)  # holds the refresh token: never in a repr, log or traceback
    version: str


class TokenCacheStore:
    """Reads and writes token caches. Every failure is turned into TransientError or ConfigurationError."""

    def __init__(self, client: SecretClient) -> None:
        self._client = client

    def load(self, address: str) -> StoredCache | None:
        """The latest cache of ``address``, or None when there is no secret (the mailbox was never authorized)."""
        try:
            secret = self._call("read", address, self._client.get_secret, mailbox_key(address))
        except ResourceNotFoundError:
            return None
        return StoredCache(serialized=secret.value or "", version=secret.properties.version or "")

    def save(self, address: str, serialized: str, *, signed_in_as: str) -> str:
        """Store a new version and return its version id. Raises before anything is written if it is too big."""
        if len(serialized.encode()) > MAX_SECRET_BYTES:
            raise ConfigurationError(
                f"token cache of {address} is larger than Key Vault's 25 KB secret limit",
                remedy="revoke and re-authorize the mailbox so that its cache holds one account only",
            )
        write = (
            self._client.set_secret,
            mailbox_key(address),
            serialized,
        )
        options: dict[str, Any] = {
            "content_type": CONTENT_TYPE,
            "tags": {"mailbox": address, "provider": "entra", "signed-in-as": signed_in_as},
        }
        try:
            secret = self._call("write", address, *write, **options)
        except ResourceExistsError:
            # The mailbox was revoked and its secret is soft-deleted (and, with purge protection, cannot be purged):
            # recover it, then write the new cache as its next version.
            self._call("recover", address, self._client.begin_recover_deleted_secret, mailbox_key(address)).wait()
            secret = self._call("write", address, *write, **options)
        return str(secret.properties.version or "")

    def delete(self, address: str) -> None:
        """Delete the secret (soft delete applies in Azure); succeeds when it is already absent."""
        with contextlib.suppress(ResourceNotFoundError):
            self._call("delete", address, self._client.begin_delete_secret, mailbox_key(address)).wait()

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
