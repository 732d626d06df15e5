"""Diagnose reads a token's claims without showing the token: what it explains and what it leaves out."""

from __future__ import annotations

import base64
import json

from collectors.diagnose import token_claims


def _jwt(claims: dict[str, object]) -> str:
    def part(data: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256'})}.{part(claims)}.c2lnbmF0dXJl"


def test_a_delegated_token_names_the_user_tenant_scopes_and_expiry() -> None:
    payload = {"upn": "support@contoso.com", "tid": "t-1", "aud": "https://outlook.office.com"}
    payload |= {"scp": "IMAP.AccessAsUser.All", "exp": 1_900_000_000, "iat": 1_899_996_400, "nonce": "n-secret"}
    claims = token_claims(_jwt(payload))
    assert claims["who"] == "support@contoso.com" and claims["tenant"] == "t-1"
    assert claims["scopes"] == ["IMAP.AccessAsUser.All"] and claims["roles"] == []
    assert claims["expires_at"].startswith("2030-03-17") and "nonce" not in json.dumps(claims)


def test_an_app_token_names_the_application_and_its_roles() -> None:
    claims = token_claims(_jwt({"appid": "app-1", "tid": "t-2", "roles": ["IMAP.AccessAsApp", 7]}))
    assert claims["who"] == "the application app-1" and claims["roles"] == ["IMAP.AccessAsApp"]


def test_an_opaque_or_broken_token_is_reported_as_opaque() -> None:
    for token in ("EwBwA8l6BAAU", "a.b.c", "a.!!!.c", f"x.{base64.urlsafe_b64encode(b'[1]').decode()}.y", ""):
        assert token_claims(token)["format"].startswith("opaque"), token
