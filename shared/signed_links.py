"""Signed, expiring values for the operations pages: the re-consent link a mailbox's owner opens without the
function key, and the status page's session and CSRF tokens.

A signed value is ``base64url(JSON payload) "." base64url(HMAC-SHA256)``. The HMAC key is a Key Vault secret
(SIGNING_KEY_SECRET), made on first use; each payload names its purpose, so a value signed for one use is refused
for another. Single use is kept in Table storage: the first redemption creates a row named after the value's nonce,
and creating it again fails, across workers and instances.

Guarantees: a value whose signature, purpose or expiry does not check is refused before anything is read from
storage; a redeemed link is refused the second time; nothing secret is in the payload (a mailbox address, a mode,
a nonce and dates), and the key never leaves this module.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import itertools
import json
import logging
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from azure.core.exceptions import AzureError, ResourceExistsError, ResourceNotFoundError
from azure.data.tables import TableClient
from azure.keyvault.secrets import SecretClient

from shared.errors import ConfigurationError, TransientError

logger = logging.getLogger(__name__)

SIGNING_KEY_SECRET = "operations-signing-key"  # noqa: S105 - the secret's name, not its value
KEY_BYTES = 32
USED_PARTITION = "used-link"
PURGE_BATCH = 50  # expired used-link records deleted per redemption
MAX_VALUE_CHARS = 2048  # a link is a few hundred characters; anything longer is not ours
RECONSENT_TTL = timedelta(days=7)  # long enough for an owner on holiday for a week, short enough to go stale
MAX_RECONSENT_TTL = timedelta(days=30)
LINK_ID_CHARS = 12  # hex digits of the SHA-256 of a nonce: 48 bits tell a day's links apart in a log
ALREADY_USED = "the link was already used: ask for a new one"


class InvalidLink(Exception):
    """A signed value that cannot be used; the message says why in words fit to show."""


@dataclass(frozen=True)
class Signed:
    purpose: str
    subject: str  # the mailbox (re-consent) or the admin (session)
    mode: str
    nonce: str
    expires_at: datetime

    @property
    def link_id(self) -> str:
        """Names the value in logs and audit lines: a digest of the nonce, so that no part of the nonce (the
        used-link record's key) is ever written out."""
        return hashlib.sha256(self.nonce.encode()).hexdigest()[:LINK_ID_CHARS]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class LinkSigner:
    """Signs and checks values with the key kept in Key Vault; records single use in ``used`` (a table)."""

    def __init__(self, secrets_client: SecretClient, used: TableClient) -> None:
        self._secrets = secrets_client
        self._used = used
        self._key: bytes | None = None
        self._lock = threading.Lock()

    def _signing_key(self) -> bytes:
        with self._lock:
            if self._key is None:
                self._key = self._load_or_create_key()
            return self._key

    def _load_or_create_key(self) -> bytes:
        try:
            try:
                value = self._secrets.get_secret(SIGNING_KEY_SECRET).value or ""
            except ResourceNotFoundError:
                value = secrets.token_hex(KEY_BYTES)
                self._secrets.set_secret(SIGNING_KEY_SECRET, value, content_type="application/octet-stream")
                # Another worker may have made its own at the same moment: the latest version is the one all use.
                value = self._secrets.get_secret(SIGNING_KEY_SECRET).value or value
                logger.info("signing key created secret=%s", SIGNING_KEY_SECRET)
        except AzureError as e:
            raise TransientError(
                f"cannot read the signing key from Key Vault: {type(e).__name__}",
                remedy="check Key Vault and the app identity's Key Vault Secrets Officer role, then try again",
            ) from e
        try:
            key = bytes.fromhex(value)
        except ValueError:
            key = b""
        if len(key) < KEY_BYTES // 2:
            raise ConfigurationError(
                f"the Key Vault secret {SIGNING_KEY_SECRET} is not a signing key",
                remedy=f"delete the secret {SIGNING_KEY_SECRET} (a new one is made on first use; "
                "links already given stop working)",
            )
        return key

    def sign(self, purpose: str, subject: str, *, ttl: timedelta, mode: str = "") -> tuple[str, Signed]:
        """A signed value for ``purpose`` and ``subject`` that expires after ``ttl``."""
        expires_at = datetime.now(UTC) + ttl
        signed = Signed(purpose, subject, mode, secrets.token_urlsafe(16), expires_at.replace(microsecond=0))
        payload = json.dumps(
            {"p": purpose, "s": subject, "m": mode, "n": signed.nonce, "e": int(signed.expires_at.timestamp())},
            separators=(",", ":"),
        ).encode()
        mac = hmac.new(self._signing_key(), payload, hashlib.sha256).digest()
        return f"{_b64(payload)}.{_b64(mac)}", signed

    def check(self, value: str, purpose: str) -> Signed:
        """The payload of a value signed for ``purpose`` that has not expired. Raises InvalidLink."""
        if not value or len(value) > MAX_VALUE_CHARS or value.count(".") != 1:
            raise InvalidLink("the link is incomplete or not one of this app's links")
        body, mac_text = value.split(".")
        try:
            payload, mac = _unb64(body), _unb64(mac_text)
        except (binascii.Error, ValueError):
            raise InvalidLink("the link is incomplete or not one of this app's links") from None
        expected = hmac.new(self._signing_key(), payload, hashlib.sha256).digest()
        if not hmac.compare_digest(mac, expected):
            raise InvalidLink("the link's signature does not check: it was changed or not made by this app")
        data: Mapping[str, Any] = json.loads(payload)
        if data.get("p") != purpose:
            raise InvalidLink("the link was made for something else")
        expires_at = datetime.fromtimestamp(int(data["e"]), UTC)
        if expires_at <= datetime.now(UTC):
            raise InvalidLink(f"the link expired on {expires_at:%Y-%m-%d %H:%M} UTC")
        return Signed(str(data["p"]), str(data["s"]), str(data.get("m", "")), str(data["n"]), expires_at)

    def check_unused(self, value: str, purpose: str) -> Signed:
        """As ``check``, and refused when the value was already redeemed (a read; ``redeem`` is what decides)."""
        signed = self.check(value, purpose)
        try:
            self._used.get_entity(USED_PARTITION, signed.nonce)
        except ResourceNotFoundError:
            return signed
        except AzureError as e:
            raise TransientError(f"cannot read the link's use (Table storage): {type(e).__name__}") from e
        raise InvalidLink(ALREADY_USED)

    def redeem(self, value: str, purpose: str) -> Signed:
        """Check the value and mark it used; the second redemption of the same value raises InvalidLink."""
        signed = self.check(value, purpose)
        try:
            self._used.create_entity(
                {
                    "PartitionKey": USED_PARTITION,
                    "RowKey": signed.nonce,
                    "purpose": purpose,
                    "subject": signed.subject,
                    "expires_at": signed.expires_at,
                    "used_at": datetime.now(UTC),
                }
            )
        except ResourceExistsError:
            raise InvalidLink(ALREADY_USED) from None
        except AzureError as e:
            raise TransientError(f"cannot record the link's use (Table storage): {type(e).__name__}") from e
        self._purge_used()
        return signed

    def _purge_used(self) -> None:
        """Delete up to PURGE_BATCH records of used links that have expired anyway (their signature no longer
        passes, so the record has nothing left to refuse). Best effort: a failure leaves them for the next use."""
        try:
            expired = self._used.query_entities(
                "PartitionKey eq @p and expires_at lt @now",
                parameters={"p": USED_PARTITION, "now": datetime.now(UTC)},
                select=["RowKey"],
                results_per_page=PURGE_BATCH,
            )
            for entity in itertools.islice(expired, PURGE_BATCH):
                self._used.delete_entity(USED_PARTITION, entity["RowKey"])
        except AzureError as e:
            logger.warning("used links not purged error=%s", type(e).__name__)

    def mac(self, purpose: str, text: str) -> str:
        """A keyed digest of ``text`` for ``purpose`` (the CSRF token of a session)."""
        return _b64(hmac.new(self._signing_key(), f"{purpose}\0{text}".encode(), hashlib.sha256).digest())


def seconds_left(signed: Signed) -> int:
    return max(0, int(signed.expires_at.timestamp() - time.time()))
