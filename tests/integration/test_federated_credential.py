"""The default production mode end to end: no client secret anywhere; the function app's managed identity gets a
token for the token exchange audience from the platform's identity endpoint (served by the Entra stand-in), which
is the app registration's client assertion; the same identity reads and writes Key Vault under RBAC.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests

from collectors.services import build_services
from shared.errors import ConfigurationError, TransientError
from shared.settings import load_settings
from tests.conftest import simple_message
from tests.support.signin import sign_in
from tests.support.stack import Stack

pytestmark = pytest.mark.integration


@pytest.fixture
def federated_env(stack: Stack, app_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """As deployed in federated mode: AZURE_CLIENT_ID is the managed identity, no secret; the platform sets the
    identity endpoint and its header in the environment."""
    monkeypatch.setenv("IDENTITY_ENDPOINT", stack.identity_endpoint)
    monkeypatch.setenv("IDENTITY_HEADER", stack.identity_header)
    env = {
        k: v for k, v in app_env.items() if k not in ("ENTRA_CLIENT_SECRET", "AZURE_CLIENT_SECRET", "AZURE_TENANT_ID")
    }
    env["AZURE_CLIENT_ID"] = stack.managed_identity_client_id
    return env


def authorize(stack: Stack, services: Any, session: requests.Session, address: str) -> None:
    redirect_uri = f"{stack.host_origin}/api/auth/callback"
    auth_uri = services.consent.start(address, redirect_uri=redirect_uri)
    fields = sign_in(auth_uri, login=address, password=stack.user_password, redirect_uri=redirect_uri,
                     session=session)  # fmt: skip
    services.consent.complete(fields)


@pytest.fixture
def federated(federated_env: dict[str, str]) -> Iterator[Any]:
    yield build_services(load_settings(federated_env))


def test_consent_and_collection_run_with_the_managed_identity_as_the_only_credential(
    stack: Stack, federated: Any, entra_session: requests.Session, entra_control: Callable[..., Any],
    new_address: Any, deliver: Any,
) -> None:  # fmt: skip
    before = entra_control("stats", method="GET")
    address = new_address()
    # Below the app's renewal margin: the collection renews too, again with the identity's assertion.
    entra_control("settings", {"access_token_ttl_by_account": {address: 120}})
    authorize(stack, federated, entra_session, address)
    deliver(address, simple_message("federated"))
    federated.tokens.forget(address)
    renewals = entra_control("stats", method="GET")["token_requests"].get("refresh_token", 0)

    [result] = [r for r in federated.collector.run() if r.address == address]

    assert (result.outcome, result.messages) == ("ok", 1), result.error
    after = entra_control("stats", method="GET")
    assert after["assertions_accepted"] > before["assertions_accepted"], "the code was redeemed with the assertion"
    assert after["msi_requests"] > before["msi_requests"]
    assert after["token_requests"]["refresh_token"] > renewals, "the run renewed the access token"


def test_a_failing_identity_endpoint_is_transient_and_an_unknown_identity_is_configuration(
    stack: Stack, federated_env: dict[str, str], entra_session: requests.Session,
    entra_control: Callable[..., Any], new_address: Any,
) -> None:  # fmt: skip
    from collectors.entra import confidential_app

    settings = load_settings(federated_env)
    assertion = confidential_app(settings).client_credential["client_assertion"]  # type: ignore[attr-defined]
    entra_control("faults", {"endpoint": "msi", "status": 503, "count": 10})
    with pytest.raises(TransientError):
        assertion()
    entra_control("faults", method="DELETE")

    unknown = load_settings({**federated_env, "AZURE_CLIENT_ID": "6d0c1e2a-0000-4000-8000-00000000beef"})
    with pytest.raises(ConfigurationError) as raised:
        confidential_app(unknown).client_credential["client_assertion"]()  # type: ignore[attr-defined]
    assert "AZURE_CLIENT_ID" in raised.value.remedy


def test_an_app_mode_mailbox_runs_on_the_managed_identity_alone_without_key_vault(
    stack: Stack, federated: Any, entra_control: Callable[..., Any], keyvault_control: Callable[..., Any],
    new_address: Any, deliver: Any,
) -> None:  # fmt: skip
    from pathlib import Path

    from devstack import dovecot
    from devstack.stack import app_object_id

    address = new_address()
    dovecot.grant_app(Path(stack.dovecot_config), app_object_id(stack.info), address)
    deliver(address, simple_message("app mode, federated"))
    before = entra_control("stats", method="GET")
    vault_before = keyvault_control("stats", method="GET")

    federated.app_mailboxes.add(address, {}, admin="test")
    [result] = federated.collector.run()

    assert (result.outcome, result.messages) == ("ok", 1), result.error
    after = entra_control("stats", method="GET")
    assert after["assertions_accepted"] > before["assertions_accepted"], "the app token came for the assertion"
    assert after["token_requests"].get("client_credentials", 0) > before["token_requests"].get("client_credentials", 0)
    assert keyvault_control("stats", method="GET") == vault_before, "no secret, no Key Vault operation"
