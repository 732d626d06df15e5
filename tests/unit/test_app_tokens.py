"""App-only tokens without a server: the tenant a mailbox may name, the classification of the client-credentials
grant's refusals (never "needs re-consent"), and the wording of Exchange's refusal with the ids filled in."""

from __future__ import annotations

from typing import Any

import pytest

from collectors.app_tokens import AppToken, AppTokenProvider, admin_consent_url, exchange_refusal, normalize_tenant
from shared.errors import ConfigurationError, NeedsReconsentError, TransientError
from shared.settings import load_settings

ENV = {
    "AzureWebJobsStorage": "UseDevelopmentStorage=true",
    "KEY_VAULT_URI": "https://kv.vault.azure.net/",
    "ENTRA_TENANT_ID": "11111111-2222-3333-4444-555555555555",
    "ENTRA_CLIENT_ID": "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee",
    "ENTRA_CLIENT_SECRET": "not-a-real-secret",
}
TENANT = "99999999-8888-7777-6666-555555555555"


@pytest.fixture
def provider() -> AppTokenProvider:
    return AppTokenProvider(load_settings(ENV))


@pytest.mark.parametrize("text", ["11111111-2222-3333-4444-555555555555", "contoso.onmicrosoft.com", " Contoso.COM "])
def test_a_tenant_is_a_guid_or_a_domain(text: str) -> None:
    assert normalize_tenant(text) == text.strip().lower()


@pytest.mark.parametrize(
    "text", ["", "common", "../common", "x\r\ny.com", "contoso.com/evil", "a" * 300 + ".com", "1111-2222", "c%2fd.com"]
)
def test_anything_else_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="tenant must be"):
        normalize_tenant(text)


def error(code: int, name: str = "invalid_client") -> dict[str, Any]:
    return {"error": name, "error_codes": [code], "error_description": f"AADSTS{code}: words"}


@pytest.mark.parametrize(
    ("result", "kind", "words"),
    [
        (error(700016, "unauthorized_client"), ConfigurationError, "adminconsent?client_id="),
        (error(7000112, "unauthorized_client"), ConfigurationError, "disabled"),
        (error(7000222), ConfigurationError, "client secret has expired"),
        (error(700213, "invalid_request"), ConfigurationError, "federated credential"),
        (error(50173, "invalid_grant"), ConfigurationError, "admin consent"),
        (error(65001, "invalid_grant"), ConfigurationError, "adminconsent"),
        (error(1002012, "invalid_scope"), ConfigurationError, "/.default"),
        ({"error": "invalid_client"}, ConfigurationError, "admin consent for IMAP.AccessAsApp"),
        ({"error": "temporarily_unavailable", "error_codes": [50000]}, TransientError, "Entra ID refused"),
    ],
)
def test_each_refusal_is_classified_with_its_remedy_and_never_needs_reconsent(
    provider: AppTokenProvider, result: dict[str, Any], kind: type[Exception], words: str
) -> None:
    classified = provider._error(result, TENANT, "helpdesk@contoso.com")
    assert type(classified) is kind
    assert not isinstance(classified, NeedsReconsentError)
    assert words in classified.describe()
    assert TENANT in str(classified) and "helpdesk@contoso.com" in str(classified)


def test_the_admin_consent_url_names_the_tenant_and_the_app() -> None:
    settings = load_settings(ENV)
    assert admin_consent_url(settings, TENANT) == (
        f"https://login.microsoftonline.com/{TENANT}/adminconsent?client_id=aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
    )


def test_exchanges_refusal_fills_in_the_enterprise_applications_object_id() -> None:
    token = AppToken(
        "eyJ.token-value.sig",
        0.0,
        renewed=False,
        saved_at=None,
        tenant_id=TENANT,
        client_id="app-id",
        service_principal_id="sp-id",
    )
    refused = exchange_refusal("helpdesk@contoso.com", token)
    assert "New-ServicePrincipal -AppId app-id -ObjectId sp-id" in refused.remedy
    assert "Add-MailboxPermission -Identity helpdesk@contoso.com -User sp-id -AccessRights FullAccess" in refused.remedy
    assert f"Connect-ExchangeOnline -Organization {TENANT}" in refused.remedy
    assert "token-value" not in repr(token), "the token never shows in a repr"
