"""Warn before the Entra client secret expires, the classic way collectors silently stop.

With the federated credential (the default deployment) there is nothing to expire. In secret mode the secret sits
in Key Vault under ENTRA_CLIENT_SECRET_NAME, stored with an expiry date; this check reads that date at most once a
day per worker and logs ``credential_expires_in_days=N``, which the deployed alert watches.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

from azure.core.exceptions import AzureError
from azure.keyvault.secrets import SecretClient

logger = logging.getLogger(__name__)

CHECK_EVERY = 24 * 3600  # seconds
WARN_BELOW_DAYS = 30  # Entra secrets last 6-24 months: a month is time enough to roll one


class CredentialExpiryCheck:
    def __init__(
        self, client: SecretClient, secret_name: str | None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._client = client
        self._name = secret_name
        self._clock = clock
        self._checked_at: float | None = None
        self._lock = threading.Lock()

    def run(self) -> int | None:
        """Log the days left (once a day at most) and return them; None when there is nothing to check."""
        if not self._name:
            return None
        with self._lock:
            now = self._clock()
            if self._checked_at is not None and now - self._checked_at < CHECK_EVERY:
                return None
            self._checked_at = now
        try:
            expires = self._client.get_secret(self._name).properties.expires_on
        except AzureError as e:
            logger.warning("cannot read the client secret's expiry secret=%s error=%s", self._name, type(e).__name__)
            return None
        if expires is None:
            logger.warning(
                "client secret has no expiry date in Key Vault secret=%s: set one (az keyvault secret set-attributes "
                "--expires) so that the expiry alert can warn before it stops working",
                self._name,
            )
            return None
        days = (expires - datetime.now(UTC)).days
        level = logging.WARNING if days < WARN_BELOW_DAYS else logging.INFO
        logger.log(
            level,
            "client secret check secret=%s credential_expires_in_days=%d%s",
            self._name,
            days,
            " -- create a new secret in the app registration and store it in Key Vault"
            if days < WARN_BELOW_DAYS
            else "",
        )
        return days
