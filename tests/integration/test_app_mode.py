"""App-mode mailboxes against the real local parts: added through POST /api/mailboxes (access proven first, a
refusal names the missing step with the ids filled in), collected with the app token of their tenant, never a Key
Vault operation, never "needs re-consent", and collected in one run beside delegated mailboxes of another tenant.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import msal.application
import msal.token_cache
import pytest
import requests

import collectors.app_tokens
from devstack import dovecot
from devstack.stack import app_object_id
from shared.errors import ConfigurationError, MailboxAccessError
from shared.registry import MailboxMode, MailboxStatus
from tests.conftest import simple_message
from tests.support.clock import ShiftedClock
from tests.support.faults import check_delivery
from tests.support.stack import Stack

pytestmark = pytest.mark.integration

RUN_EVERY = 300  # seconds: the default schedule


@pytest.fixture
def grant(stack: Stack) -> Callable[..., str]:
    """Add-MailboxPermission for the app's enterprise application of ``tenant`` (default: the home tenant)."""

    def run(address: str, tenant: str | None = None) -> str:
        principal = app_object_id(stack.info, tenant)
        dovecot.grant_app(Path(stack.dovecot_config), principal, address)
        return principal

    return run


@pytest.fixture
def app_mailbox(services: Any, grant: Callable[..., str]) -> Callable[..., Any]:
    """A granted app-mode mailbox, added the way the admin route adds it."""

    def run(address: str, tenant: str = "", **options: Any) -> Any:
        grant(address, tenant or None)
        return services.app_mailboxes.add(address, options, tenant=tenant, admin="test")

    return run


def post(local_host: Any, body: Any) -> requests.Response:
    return requests.post(f"{local_host.origin}/api/mailboxes", params={"code": local_host.key}, json=body, timeout=120)


def key_vault_operations(keyvault_control: Any) -> Any:
    return keyvault_control("stats", method="GET")


def test_an_app_mode_mailbox_is_added_over_http_and_collected_without_key_vault(
    stack: Stack, local_host: Any, services: Any, grant: Any, deliver: Any, new_address: Any,
    queue_messages: Any, keyvault_control: Any,
) -> None:  # fmt: skip
    address = new_address()
    grant(address)
    sent = [simple_message(f"app mode {i}", f"body {i}") for i in range(3)]
    for raw in sent:
        deliver(address, raw)
    before = key_vault_operations(keyvault_control)

    answer = post(local_host, {"address": address, "mode": "app", "options": {"after_action": "seen"}})

    assert answer.status_code == 201, answer.text
    row = answer.json()
    assert (row["address"], row["mode"], row["status"], row["tenant_id"]) == (address, "app", "active", "")
    stored = services.registry.get(address)
    assert stored.mode == MailboxMode.APP and stored.uidvalidity > 0

    [result] = services.collector.run()

    assert (result.address, result.outcome, result.messages) == (address, "ok", 3)
    check_delivery(services, sent, queue_messages(), case="app mode: added and collected")
    after = services.registry.get(address)
    assert after.last_uid == 3 and after.token_saved_at is None
    assert key_vault_operations(keyvault_control) == before, "an app-mode mailbox must not touch Key Vault"


def test_a_mailbox_without_permission_is_refused_with_the_exchange_commands_and_nothing_is_stored(
    stack: Stack, local_host: Any, services: Any, new_address: Any
) -> None:
    address = new_address()  # no Add-MailboxPermission for it

    answer = post(local_host, {"address": address, "mode": "app"})

    assert answer.status_code == 403, answer.text
    body = answer.json()
    principal = app_object_id(stack.info)
    assert body["error"] == "mailbox_access"
    assert f"New-ServicePrincipal -AppId {stack.client_id} -ObjectId {principal}" in body["remedy"]
    assert f"Add-MailboxPermission -Identity {address} -User {principal} -AccessRights FullAccess" in body["remedy"]
    assert services.registry.find(address) is None
    got = requests.get(f"{local_host.origin}/api/mailboxes/{address}", params={"code": local_host.key}, timeout=30)
    assert got.status_code == 404


def test_a_tenant_without_admin_consent_for_the_role_gets_the_consent_url(
    stack: Stack, services: Any, grant: Any, new_address: Any
) -> None:
    address = new_address()
    tenant = stack.info["unconsented_tenant_id"]
    grant(address, tenant)

    with pytest.raises(ConfigurationError) as refused:
        services.app_mailboxes.add(address, {}, tenant=tenant, admin="test")

    assert "no IMAP.AccessAsApp role" in str(refused.value)
    assert f"{stack.entra_origin}/{tenant}/adminconsent?client_id={stack.client_id}" in refused.value.remedy
    assert services.registry.find(address) is None


def test_a_missing_folder_is_refused_before_anything_is_stored(services: Any, grant: Any, new_address: Any) -> None:
    address = new_address()
    grant(address)
    with pytest.raises(MailboxAccessError) as refused:
        services.app_mailboxes.add(address, {"folder": "Support/Tickets"}, admin="test")
    assert "Support/Tickets" in str(refused.value)
    assert services.registry.find(address) is None


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"address": "a@example.test", "mode": "delegated"}, 400, "authorize"),
        ({"address": "a@example.test"}, 400, 'mode must be "app"'),
        ({"address": "a@example.test", "mode": "app", "tenant": "../../common"}, 400, "tenant must be"),
        ({"address": "a@example.test", "mode": "app", "tenant": "x\r\ny"}, 400, "tenant must be"),
        ({"address": "a@example.test\r\nA1 LOGOUT", "mode": "app"}, 400, "not a valid email address"),
        ({"address": ["a@example.test"], "mode": "app"}, 400, "must be text"),
        ({"address": "a@example.test", "mode": "app", "options": {"folder": "INBOX\r\nA1 DELETE x"}}, 400, "folder"),
        ({"address": "a@example.test", "mode": "app", "options": {"max_messages": "1e9"}}, 400, "max_messages"),
        ({"address": "a@example.test", "mode": "app", "options": "INBOX"}, 400, "options must be a JSON object"),
        ({"address": "a@example.test", "mode": "app", "password": "x"}, 400, "unknown field"),
        ([1, 2], 400, "JSON object"),
    ],
    ids=["delegated", "no-mode", "tenant-path", "tenant-crlf", "address-crlf", "address-list", "folder-crlf",
         "number", "options-text", "unknown-field", "array"],
)  # fmt: skip
def test_hostile_input_gets_a_clear_error_and_stores_nothing(
    local_host: Any, services: Any, body: Any, status: int, words: str
) -> None:
    answer = post(local_host, body)
    assert answer.status_code == status, answer.text
    assert words in answer.json()["message"]
    assert services.registry.list() == []


def test_a_body_that_is_not_json_or_too_large_is_refused(local_host: Any) -> None:
    url = f"{local_host.origin}/api/mailboxes"
    garbage = requests.post(url, params={"code": local_host.key}, data=b"{not json", timeout=30)
    assert garbage.status_code == 400
    huge = requests.post(url, params={"code": local_host.key}, data=b" " * 20_000, timeout=30)
    assert huge.status_code == 413
    anonymous = requests.post(url, json={"address": "a@example.test", "mode": "app"}, timeout=30)
    assert anonymous.status_code == 401


def test_a_registered_address_is_not_added_twice(local_host: Any, app_mailbox: Any, new_address: Any) -> None:
    address = new_address()
    app_mailbox(address)
    again = post(local_host, {"address": address, "mode": "app"})
    assert again.status_code == 409 and "registered already" in again.json()["message"]


def test_permission_taken_back_is_mailbox_access_never_reconsent(
    stack: Stack, services: Any, app_mailbox: Any, new_address: Any, deliver: Any
) -> None:
    address = new_address()
    app_mailbox(address)
    deliver(address, simple_message("after removal"))
    dovecot.revoke_app(Path(stack.dovecot_config), app_object_id(stack.info), address)

    [result] = services.collector.run()

    assert result.outcome == "mailbox_access" and "Add-MailboxPermission" in result.error
    row = services.registry.get(address)
    assert row.status == MailboxStatus.ACTIVE and row.last_error_class == "mailbox_access"


def test_the_app_token_is_renewed_before_expiry_for_every_mailbox_of_the_tenant_without_key_vault(
    services: Any, app_mailbox: Any, new_address: Any, entra_control: Any, keyvault_control: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    issued_before = entra_control("app_tokens", method="GET")["issued"]
    vault_before = key_vault_operations(keyvault_control)
    mailboxes = [app_mailbox(new_address()) for _ in range(3)]
    provider = services.app_tokens
    clock = ShiftedClock()
    for module in (collectors.app_tokens, msal.application, msal.token_cache):
        monkeypatch.setattr(module, "time", clock)

    tokens: list[str] = []
    for _ in range(2 * 3600 // RUN_EVERY):  # two hours of five-minute runs
        clock.offset += RUN_EVERY
        for mailbox in mailboxes:
            token = provider.access_token(mailbox)
            assert token.expires_on - clock.time() > collectors.app_tokens.ACCESS_TOKEN_MARGIN
            tokens.append(token.token)

    distinct = len(set(tokens))
    issued = entra_control("app_tokens", method="GET")["issued"] - issued_before
    # 60-90 minute tokens renewed ten minutes before expiry: two or three in two hours, each shared by all three
    # mailboxes; the stand-in issued exactly those (none per mailbox).
    assert 2 <= distinct <= 4
    assert issued == distinct
    assert key_vault_operations(keyvault_control) == vault_before


def test_delegated_and_app_mode_mailboxes_of_two_tenants_are_collected_in_one_run(
    stack: Stack, services: Any, consent: Any, app_mailbox: Any, new_address: Any, deliver: Any,
    queue_messages: Any,
) -> None:  # fmt: skip
    delegated, home_app, customer_app = new_address(), new_address(), new_address()
    consent(delegated)
    app_mailbox(home_app)
    app_mailbox(customer_app, tenant=stack.info["other_tenant_id"])
    sent = []
    for address in (delegated, home_app, customer_app):
        for i in range(2):
            raw = simple_message(f"{address} {i}")
            deliver(address, raw)
            sent.append(raw)

    results = {r.address: r for r in services.collector.run()}

    assert {a: (r.outcome, r.messages) for a, r in results.items()} == {
        delegated: ("ok", 2), home_app: ("ok", 2), customer_app: ("ok", 2)
    }  # fmt: skip
    check_delivery(services, sent, queue_messages(), case="app mode: two tenants, both modes")
    assert services.registry.get(customer_app).tenant_id == stack.info["other_tenant_id"]
    assert services.registry.get(delegated).mode == MailboxMode.DELEGATED


def test_an_authorize_link_does_not_turn_an_app_mode_mailbox_into_a_delegated_one(
    stack: Stack, services: Any, app_mailbox: Any, new_address: Any
) -> None:
    from collectors.consent import ConsentProblem

    address = new_address()
    app_mailbox(address)
    with pytest.raises(ConsentProblem) as refused:
        services.consent.start(address, redirect_uri=f"{stack.host_origin}/api/auth/callback")
    assert "app mode" in refused.value.title and "DELETE /api/mailboxes/" in refused.value.next_step
    assert services.registry.get(address).mode == MailboxMode.APP


def test_revoking_an_app_mode_mailbox_touches_no_key_vault_and_names_what_ends_its_access(
    local_host: Any, services: Any, app_mailbox: Any, new_address: Any, keyvault_control: Any
) -> None:
    address = new_address()
    app_mailbox(address)
    vault_before = key_vault_operations(keyvault_control)

    answer = requests.delete(
        f"{local_host.origin}/api/mailboxes/{address}", params={"code": local_host.key}, timeout=60
    )

    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["revoked"] is True and services.registry.find(address) is None
    assert key_vault_operations(keyvault_control) == vault_before, "an app-mode revoke must not touch Key Vault"
    assert "Nothing was stored in Key Vault" in body["key_vault"]
    assert f"Remove-MailboxPermission -Identity {address}" in body["entra_id"]
    assert "RBAC for Applications" in body["entra_id"]
    assert "refresh token" not in (body["key_vault"] + body["entra_id"]).lower()
