"""The consent callback accepts an id token only from the configured tenant and for this app; the email claim
never stands in for the sign-in name."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from collectors.consent import ConsentProblem, ConsentService

TENANT = "8f4c2a51-0d3e-4b7a-9c61-2e5f7a9b1c30"
CLIENT = "app-client-id"


def service(tenant: str = TENANT) -> ConsentService:
    consent = object.__new__(ConsentService)
    consent._settings = SimpleNamespace(tenant_id=tenant, client_id=CLIENT)  # type: ignore[assignment]
    return consent


def test_a_token_of_this_tenant_and_app_passes() -> None:
    service()._check_token_origin({"tid": TENANT.upper(), "aud": CLIENT}, "m@contoso.example")


@pytest.mark.parametrize(
    "claims",
    [
        {"tid": "00000000-0000-0000-0000-000000000001", "aud": CLIENT},
        {"aud": CLIENT},
        {"tid": TENANT, "aud": "another-app"},
        {"tid": TENANT},
    ],
    ids=["other-tenant", "no-tenant", "other-app", "no-audience"],
)
def test_a_token_from_elsewhere_is_refused(claims: dict[str, str]) -> None:
    with pytest.raises(ConsentProblem) as refused:
        service()._check_token_origin(claims, "m@contoso.example")
    assert refused.value.title == "Wrong tenant"


def test_a_multitenant_authority_accepts_any_tenant_but_still_checks_the_app() -> None:
    service("organizations")._check_token_origin({"tid": "any", "aud": CLIENT}, "m@contoso.example")
    with pytest.raises(ConsentProblem):
        service("organizations")._check_token_origin({"tid": "any", "aud": "another-app"}, "m@contoso.example")
