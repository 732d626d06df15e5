"""Who acted: the principal header counts only behind App Service authentication."""

from __future__ import annotations

import azure.functions as func
import pytest

from api.identity import acting_admin


def request(headers: dict[str, str]) -> func.HttpRequest:
    return func.HttpRequest(method="GET", url="http://localhost/api/mailboxes", headers=headers, body=b"")


def test_without_app_service_authentication_a_sent_principal_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WEBSITE_AUTH_ENABLED", raising=False)
    assert acting_admin(request({"x-ms-client-principal-name": "ceo@contoso.com"})) == "function key"
    monkeypatch.setenv("WEBSITE_AUTH_ENABLED", "False")
    assert acting_admin(request({"x-ms-client-principal-name": "ceo@contoso.com"})) == "function key"


def test_behind_app_service_authentication_the_platforms_principal_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEBSITE_AUTH_ENABLED", "True")
    assert acting_admin(request({"x-ms-client-principal-name": "admin@contoso.com"})) == "admin@contoso.com"
    assert acting_admin(request({})) == "function key"  # a key caller on an app that also allows keys
