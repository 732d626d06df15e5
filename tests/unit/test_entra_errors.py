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
