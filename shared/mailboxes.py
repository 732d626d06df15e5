"""Mailbox addresses and the names derived from them (registry keys, Key Vault secret names, blob names)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

from shared.errors import ConfigurationError

# Deliberately narrower than RFC 5321: the address ends up in URLs, IMAP commands and SASL strings, so anything
# that could smuggle a CR, LF, quote, space or control character is refused outright.
_ADDRESS = re.compile(
    r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+$"
)
MAX_ADDRESS_LENGTH = 254


class InvalidMailboxError(ValueError):
    """The text is not a mailbox address this app accepts; the message says why."""


def normalize_address(text: str, *, allowed_domains: Sequence[str] = ()) -> str:
    """Return the lower-cased address, or raise InvalidMailboxError.

    ``allowed_domains`` (empty: any) limits which domains may be authorized.
    """
    # Only spaces are forgiven: a CR, LF, tab or NUL around an address came from a crafted URL, not a typo.
    # The pattern is checked before lower-casing, which would turn some non-ASCII letters (the Kelvin sign) into
    # ASCII ones, and with fullmatch, because "$" also matches before a final newline.
    stripped = text.strip(" ")
    if len(stripped) > MAX_ADDRESS_LENGTH or not _ADDRESS.fullmatch(stripped) or ".." in stripped:
        raise InvalidMailboxError("not a valid email address")
    address = stripped.lower()
    domain = address.rsplit("@", 1)[1]
    if allowed_domains and domain not in allowed_domains:
        raise InvalidMailboxError(f"the domain {domain} is not in ALLOWED_MAIL_DOMAINS")
    return address


def mailbox_key(address: str) -> str:
    """The registry row key, Key Vault secret name and blob prefix of a mailbox: ``mbx-`` and the full SHA-256 of
    the lower-cased address in hex (68 characters of letters, digits and dashes).

    No part of the address shows: Azure may copy secret names, tags and container names outside the vault's region,
    so they must not hold personal data, and a full digest does not collide (48 bits did, to a minute of search).
    """
    return f"mbx-{hashlib.sha256(address.lower().encode()).hexdigest()}"


def legacy_mailbox_key(address: str) -> str:
    """The key older releases used (readable part of the address and 48 bits of digest): read as a fallback, never
    written, so that a deployed app's rows and secrets move to ``mailbox_key`` as they are used."""
    readable = re.sub(r"[^a-z0-9]+", "-", address.lower()).strip("-")[:80]
    digest = hashlib.sha256(address.lower().encode()).hexdigest()[:12]
    return f"mbx-{readable}-{digest}"


def require_address(text: str) -> str:
    """Like normalize_address for addresses that come from our own storage; a bad one is a configuration error."""
    try:
        return normalize_address(text)
    except InvalidMailboxError as e:
        raise ConfigurationError(f"stored mailbox address {text!r} is invalid: {e}") from e
