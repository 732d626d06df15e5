from __future__ import annotations

import pytest

from collectors.entra import error_from_result
from shared.errors import ConfigurationError, NeedsReconsentError, TransientError


def result(error: str, code: int | None = None) -> dict[str, object]:
    return {
        "error": error,
        "error_description": f"AADSTS{code}: something. Trace ID: x" if code else "something",
        "error_codes": [code] if code else [],
    }


@pytest.mark.parametrize("code", [700082, 50173, 70043, 65001, 70008, 50076, 53003])
def test_definitive_grant_errors_need_reconsent(code: int) -> None:
    error = error_from_result(result("invalid_grant", code), mailbox="m@contoso.com")
    assert isinstance(error, NeedsReconsentError)
    assert f"AADSTS{code}" in str(error) and "m@contoso.com" in str(error)
    assert "authorize" in error.remedy


@pytest.mark.parametrize(("code", "hint"), [(7000222, "expired"), (700016, "ENTRA_CLIENT_ID"), (7000215, "secret")])
def test_app_registration_errors_are_configuration(code: int, hint: str) -> None:
    error = error_from_result(result("invalid_client", code), mailbox="m@contoso.com")
    assert isinstance(error, ConfigurationError)
    assert hint in error.remedy


@pytest.mark.parametrize("error", ["temporarily_unavailable", "server_error", "unknown_error"])
def test_service_trouble_is_transient(error: str) -> None:
    assert isinstance(error_from_result(result(error), mailbox="m@contoso.com"), TransientError)


def test_invalid_grant_without_a_known_code_still_needs_reconsent() -> None:
    assert isinstance(error_from_result(result("invalid_grant", 9999999), mailbox="m"), NeedsReconsentError)


@pytest.mark.parametrize(
    ("code", "hint"), [(53003, "Conditional Access"), (50076, "multi-factor"), (50079, "mfasetup")]
)
def test_conditional_access_and_mfa_say_what_the_admin_does(code: int, hint: str) -> None:
    error = error_from_result({**result("invalid_grant", code), "suberror": "basic_action"}, mailbox="m@contoso.com")
    assert isinstance(error, NeedsReconsentError)
    assert hint in error.remedy and "basic_action" in str(error)


def test_a_claims_challenge_without_a_known_code_names_conditional_access() -> None:
    answer = {**result("invalid_grant", 9999998), "suberror": "message_only", "claims": '{"access_token": {}}'}
    error = error_from_result(answer, mailbox="m@contoso.com")
    assert isinstance(error, NeedsReconsentError) and "Conditional Access" in str(error)


@pytest.mark.parametrize(("code", "hint"), [(700211, "issuer"), (700212, "audience"), (700213, "principal")])
def test_a_federated_credential_mismatch_names_the_field_to_fix(code: int, hint: str) -> None:
    error = error_from_result(result("invalid_request", code), mailbox="m@contoso.com")
    assert isinstance(error, ConfigurationError)
    assert hint in error.remedy


def test_an_unresolved_key_vault_reference_is_not_reported_as_a_wrong_secret() -> None:
    from collectors.entra import confidential_app
    from shared.settings import load_settings

    env = {"AzureWebJobsStorage": "UseDevelopmentStorage=true", "KEY_VAULT_URI": "https://kv.vault.azure.net",
           "ENTRA_TENANT_ID": "t", "ENTRA_CLIENT_ID": "c",
           "ENTRA_CLIENT_SECRET": "@Microsoft.KeyVault(VaultName=kv;SecretName=entra-client-secret)"}  # fmt: skip
    with pytest.raises(ConfigurationError) as raised:
        confidential_app(load_settings(env))
    assert "unresolved Key Vault reference" in str(raised.value)
    assert "Key Vault Secrets User" in raised.value.remedy


@pytest.mark.parametrize(
    ("host", "audience"),
    [
        ("https://login.microsoftonline.com", "api://AzureADTokenExchange"),
        ("https://login.microsoftonline.us", "api://AzureADTokenExchangeUSGov"),
        ("https://login.chinacloudapi.cn/", "api://AzureADTokenExchangeChina"),
        ("https://localhost:10443", "api://AzureADTokenExchange"),
    ],
)
def test_the_token_exchange_audience_follows_the_cloud(host: str, audience: str) -> None:
    from shared.settings import load_settings

    env = {"AzureWebJobsStorage": "UseDevelopmentStorage=true", "KEY_VAULT_URI": "https://kv.vault.azure.net",
           "ENTRA_TENANT_ID": "t", "ENTRA_CLIENT_ID": "c", "ENTRA_AUTHORITY_HOST": host}  # fmt: skip
    assert load_settings(env).token_exchange_audience == audience
