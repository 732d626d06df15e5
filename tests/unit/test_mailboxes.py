from __future__ import annotations

import re

import pytest

from shared.mailboxes import InvalidMailboxError, mailbox_key, normalize_address


@pytest.mark.parametrize("text", ["Support@Contoso.com", " support@contoso.com ", "first.last+tag@sub.contoso.com"])
def test_valid_addresses_are_lower_cased(text: str) -> None:
    assert normalize_address(text) == text.strip().lower()


@pytest.mark.parametrize(
    "text",
    [
        "",
        "no-at-sign",
        "a@b",
        "a@@b.com",
        "a b@contoso.com",
        "a@contoso.com\r\nBcc: x@evil.com",
        "a@contoso.com%0d%0aX: y",
        '"quoted"@contoso.com',
        "a..b@contoso.com",
        "x" * 65 + "@contoso.com",
        "a@" + "b" * 250 + ".com",
        "a@-contoso.com",
        "<a@contoso.com>",
    ],
)
def test_invalid_addresses_are_refused(text: str) -> None:
    with pytest.raises(InvalidMailboxError):
        normalize_address(text)


def test_allowed_domains() -> None:
    assert normalize_address("a@contoso.com", allowed_domains=("contoso.com",)) == "a@contoso.com"
    with pytest.raises(InvalidMailboxError, match="ALLOWED_MAIL_DOMAINS"):
        normalize_address("a@fabrikam.com", allowed_domains=("contoso.com",))


def test_keys_are_key_vault_safe_stable_and_distinct() -> None:
    a, b = mailbox_key("a.b@contoso.com"), mailbox_key("a-b@contoso.com")
    assert a != b
    assert a == mailbox_key("A.B@Contoso.com")
    for key in (a, b, mailbox_key("x" * 64 + "@" + "y" * 60 + ".com")):
        assert re.fullmatch(r"[A-Za-z0-9-]{1,127}", key)


def test_keys_are_a_full_digest_without_any_part_of_the_address() -> None:
    import hashlib

    key = mailbox_key("Jane.Doe@Contoso.com")
    assert key == "mbx-" + hashlib.sha256(b"jane.doe@contoso.com").hexdigest()
    assert "jane" not in key and "contoso" not in key
