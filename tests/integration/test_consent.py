"""The consent flow against the real parts: Entra stand-in, Key Vault endpoint, Table storage (Azurite)."""

from __future__ import annotations

import json
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from azure.core.exceptions import ResourceNotFoundError
from azure.data.tables import TableClient

from collectors.consent import FLOW_PARTITION, ConsentFailure, ConsentProblem, ConsentService
from devstack import dovecot
from shared import azure_clients, redaction
from shared.errors import NeedsReconsentError, TransientError
from shared.mailboxes import mailbox_key
from shared.registry import MailboxRegistry, MailboxStatus, utcnow
from tests.conftest import simple_message
from tests.support.faults import collect
from tests.support.signin import sign_in
from tests.support.stack import Stack
from tests.support.standins import tls_session

pytestmark = pytest.mark.integration


@pytest.fixture
def redirect_uri(stack: Stack) -> str:
    return f"{stack.host_origin}/api/auth/callback"


@pytest.fixture
def signed_in(stack: Stack, services: Any, redirect_uri: str, entra_session: requests.Session) -> Any:
    """Start a flow and sign in at the stand-in; return the fields it posts back (not yet completed)."""

    def run(address: str, *, login: str | None = None, delegate: str = "", accept: bool = True) -> dict[str, str]:
        auth_uri = services.consent.start(address, redirect_uri=redirect_uri, delegate=delegate)
        return sign_in(
            auth_uri,
            login=login or delegate or address,
            password=stack.user_password,
            redirect_uri=redirect_uri,
            session=entra_session,
            accept=accept,
        )

    return run


@pytest.fixture
def new_sign_in(signed_in: Any, new_address: Any) -> Any:
    """A fresh address signed in at the stand-in: (the address, the fields posted back, not yet completed)."""

    def run(**options: Any) -> tuple[str, dict[str, str]]:
        address = new_address()
        return address, signed_in(address, **options)

    return run


def stack_port(settings: Any) -> int:
    return int(re.search(r"TableEndpoint=http://127.0.0.1:(\d+)/", settings.storage.connection_string).group(1))


def nothing_stored(services: Any, address: str) -> bool:
    return services.registry.find(address) is None and services.tokens._store.load(address) is None


def test_consent_stores_the_token_in_key_vault_and_registers_the_mailbox(
    services: Any, signed_in: Any, new_address: Any, keyvault_control: Any, stack: Stack
) -> None:
    address = new_address()
    result = services.consent.complete(signed_in(address))
    assert (result.address, result.signed_in_as, result.reconsent) == (address, address, False)
    row = services.registry.get(address)
    assert row.status == "active" and row.consented_at is not None
    secret = azure_clients.secret_client(services.settings).get_secret(mailbox_key(address))
    assert secret.properties.content_type == "application/vnd.msal.token-cache+json"
    # Names and tags may be copied outside the vault's region: no part of the address is in them.
    assert secret.properties.tags == {"provider": "entra", "versions": "1"}
    local = address.split("@")[0]
    assert local not in secret.name and row.token_secret == secret.name
    assert "RefreshToken" in (secret.value or "")


def test_a_reused_state_is_refused_and_stores_nothing_more(services: Any, new_sign_in: Any) -> None:
    _, fields = new_sign_in()
    services.consent.complete(fields)
    with pytest.raises(ConsentProblem) as problem:
        services.consent.complete(fields)
    assert problem.value.kind is ConsentFailure.INVALID and "already used" in problem.value.detail


def test_a_double_submit_completes_once(services: Any, new_sign_in: Any) -> None:
    _, fields = new_sign_in()
    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(lambda _: _outcome(services, fields), range(4)))
    assert sorted(outcomes) == ["invalid", "invalid", "invalid", "stored"]


def _outcome(services: Any, fields: dict[str, str]) -> str:
    try:
        services.consent.complete(fields)
        return "stored"
    except ConsentProblem as e:
        return e.kind.value


@pytest.mark.parametrize(
    ("fields", "title"),
    [
        ({}, "Missing state"),
        ({"state": "short"}, "Invalid state"),
        ({"state": "x' or PartitionKey ne '"}, "Invalid state"),
        ({"state": "A" * 40, "code": "forged"}, "Unknown or already used sign-in"),
    ],
)
def test_missing_forged_and_unknown_state(services: Any, fields: dict[str, str], title: str) -> None:
    with pytest.raises(ConsentProblem) as problem:
        services.consent.complete(fields)
    assert (problem.value.kind, problem.value.title) == (ConsentFailure.INVALID, title)


def expire_flow(services: Any, state: str) -> TableClient:
    """Move a started flow's expiry into the past; returns the flows' table."""
    flows = azure_clients.table(services.settings, services.settings.consent_table)
    entity = flows.get_entity(FLOW_PARTITION, state)
    entity["expires_at"] = utcnow() - timedelta(seconds=1)
    flows.update_entity(entity)
    return flows


def test_an_expired_flow_is_refused(services: Any, new_sign_in: Any) -> None:
    address, fields = new_sign_in()
    expire_flow(services, fields["state"])
    with pytest.raises(ConsentProblem) as problem:
        services.consent.complete(fields)
    assert problem.value.title == "Sign-in expired"
    assert nothing_stored(services, address)


def test_the_scheduled_upkeep_deletes_expired_flows(services: Any, new_sign_in: Any) -> None:
    from collectors.scheduled import upkeep

    _, fields = new_sign_in()
    flows = expire_flow(services, fields["state"])
    upkeep(services)
    with pytest.raises(ResourceNotFoundError):
        flows.get_entity(FLOW_PARTITION, fields["state"])


def test_signing_in_as_another_account_stores_nothing(services: Any, signed_in: Any, new_address: Any) -> None:
    address, other = new_address(), new_address()
    fields = signed_in(address, login=other)
    with pytest.raises(ConsentProblem) as problem:
        services.consent.complete(fields)
    assert problem.value.kind is ConsentFailure.REFUSED
    assert problem.value.title == "Wrong account"
    assert other in problem.value.detail and address in problem.value.next_step
    assert "Full Access" in problem.value.next_step
    assert nothing_stored(services, address)


def test_a_shared_mailbox_is_authorized_by_its_delegate(
    stack: Stack, services: Any, signed_in: Any, new_address: Any
) -> None:
    shared, delegate, stranger = new_address(), new_address(), new_address()
    # Another account than the one named in delegate= is refused by IMAP: it has no access.
    with pytest.raises(ConsentProblem, match="Wrong account"):
        services.consent.complete(signed_in(shared, delegate=delegate, login=stranger))
    # The delegate named at the start, but with no Full Access yet: refused too, by IMAP, not by its name.
    with pytest.raises(ConsentProblem, match="Wrong account"):
        services.consent.complete(signed_in(shared, delegate=delegate))
    assert nothing_stored(services, shared)
    dovecot.grant_full_access(Path(stack.dovecot_config), delegate, shared)
    result = services.consent.complete(signed_in(shared, delegate=delegate))
    assert (result.address, result.signed_in_as) == (shared, delegate)
    assert services.registry.get(shared).signed_in_as == delegate


def test_an_account_whose_upn_differs_from_its_mailbox_authorizes_it(
    stack: Stack, services: Any, signed_in: Any, new_address: Any, entra_control: Any, deliver: Any
) -> None:
    address = new_address()
    upn = f"{address.split('@')[0]}@contoso.onmicrosoft.com"
    entra_control("accounts", {"upn": upn, "mail": address, "aliases": []})
    result = services.consent.complete(signed_in(address, login=upn))
    assert (result.address, result.signed_in_as) == (address, upn)
    deliver(address, simple_message("collected after a consent by UPN"))
    outcome = collect(services, address)
    assert (outcome.outcome, outcome.messages) == ("ok", 1)


def test_an_alias_is_authorized_by_its_mailbox_account(
    stack: Stack, services: Any, signed_in: Any, new_address: Any, entra_control: Any, deliver: Any
) -> None:
    primary, alias = new_address(), new_address()
    upn = f"{primary.split('@')[0]}@contoso.onmicrosoft.com"
    entra_control("accounts", {"upn": upn, "mail": primary, "aliases": [alias]})
    dovecot.add_aliases(Path(stack.dovecot_config), primary, alias)
    result = services.consent.complete(signed_in(alias))  # login_hint and the sign-in name are the alias
    assert (result.address, result.signed_in_as) == (alias, upn)
    deliver(primary, simple_message("sent to the alias, delivered to the mailbox"))
    outcome = collect(services, alias)
    assert (outcome.outcome, outcome.messages) == ("ok", 1)


def test_an_account_with_a_differing_upn_and_no_access_is_refused(
    services: Any, signed_in: Any, new_address: Any, entra_control: Any
) -> None:
    address, own = new_address(), new_address()
    upn = f"{own.split('@')[0]}@contoso.onmicrosoft.com"
    entra_control("accounts", {"upn": upn, "mail": own, "aliases": []})
    with pytest.raises(ConsentProblem) as problem:
        services.consent.complete(signed_in(address, login=upn))
    assert problem.value.title == "Wrong account" and upn in problem.value.detail
    assert nothing_stored(services, address)


def test_declined_consent_is_explained(services: Any, signed_in: Any, new_address: Any) -> None:
    address = new_address()
    fields = signed_in(address, accept=False)
    assert fields.get("error") == "access_denied"
    with pytest.raises(ConsentProblem) as problem:
        services.consent.complete(fields)
    assert problem.value.title == "Consent declined" and "AADSTS65004" in problem.value.detail
    assert nothing_stored(services, address)


@pytest.mark.parametrize(
    ("error", "code", "explains"),
    [
        ("consent_required", 65001, "admin consent"),
        ("access_denied", 90094, "administrator must approve"),
        ("invalid_request", 50011, "redirect URI"),
    ],
)
def test_entra_errors_at_sign_in_are_explained(
    services: Any, signed_in: Any, new_address: Any, entra_control: Any, error: str, code: int, explains: str
) -> None:
    address = new_address()
    entra_control("faults", {"endpoint": "authorize", "error": error, "aadsts": code, "count": 1})
    fields = signed_in(address)
    with pytest.raises(ConsentProblem) as problem:
        services.consent.complete(fields)
    assert f"AADSTS{code}" in problem.value.detail and explains in problem.value.detail
    assert nothing_stored(services, address)


def test_a_code_that_fails_to_redeem_stores_nothing(services: Any, new_sign_in: Any, entra_control: Any) -> None:
    address, fields = new_sign_in()
    entra_control(
        "faults",
        {
            "endpoint": "token",
            "error": "invalid_grant",
            "aadsts": 70008,
            "count": 1,
            "grant_type": "authorization_code",
        },
    )
    with pytest.raises(ConsentProblem) as problem:
        services.consent.complete(fields)
    assert problem.value.kind is ConsentFailure.INVALID and "AADSTS70008" in problem.value.detail
    assert nothing_stored(services, address)


def test_key_vault_down_stores_nothing(services: Any, new_sign_in: Any, keyvault_control: Any) -> None:
    address, fields = new_sign_in()
    keyvault_control("faults", {"status": 503, "count": -1, "method": "PUT"})
    with pytest.raises(TransientError):
        services.consent.complete(fields)
    keyvault_control("faults", method="DELETE")
    assert nothing_stored(services, address)


def test_a_registry_write_failure_never_leaves_a_row_without_its_secret(
    settings: Any, services: Any, new_sign_in: Any
) -> None:
    address, fields = new_sign_in()
    unreachable = settings.storage.connection_string.replace(f":{stack_port(settings)}/", ":9/")
    dead = TableClient.from_connection_string(unreachable, "x", connection_timeout=1, retry_total=0)
    broken = ConsentService(
        settings,
        flows=azure_clients.table(settings, settings.consent_table),
        registry=MailboxRegistry(dead),
        store=services.tokens._store,
    )
    with pytest.raises(TransientError):
        broken.complete(fields)
    assert services.registry.find(address) is None


def test_reconsent_replaces_the_token_and_resets_the_failure_status(
    services: Any, consent: Any, signed_in: Any, new_address: Any
) -> None:
    address = new_address()
    consent(address)
    services.registry.record_checkpoint(address, {"uidvalidity": 9, "last_uid": 17})
    services.registry.record_failure(
        address, error_class="needs_reconsent", error="revoked", consecutive_failures=4, needs_reconsent=True
    )
    assert services.registry.get(address).status is MailboxStatus.NEEDS_RECONSENT
    first = services.tokens._store.load(address)
    result = services.consent.complete(signed_in(address))
    assert result.reconsent
    row = services.registry.get(address)
    assert (row.status, row.consecutive_failures, row.last_uid, row.uidvalidity) == ("active", 0, 17, 9)
    assert services.tokens._store.load(address).version != first.version


def refresh_tokens(serialized: str) -> set[str]:
    return {entry["secret"] for entry in json.loads(serialized).get("RefreshToken", {}).values()}


def test_revoke_deletes_every_version_and_purges_and_a_reconsent_brings_no_old_version_back(
    services: Any, consent: Any, signed_in: Any, new_address: Any
) -> None:
    address = new_address()
    consent(address)
    services.consent.complete(signed_in(address))  # a second version
    client = azure_clients.secret_client(services.settings)
    old = set()
    for v in client.list_properties_of_secret_versions(mailbox_key(address)):
        if not v.enabled:  # each consent disables the version before; read here all the same
            client.update_secret_properties(mailbox_key(address), v.version, enabled=True)
        old |= refresh_tokens(client.get_secret(mailbox_key(address), v.version).value or "")
    assert len(old) == 2

    revoked = services.consent.revoke(address)
    assert (revoked.existed, revoked.secret_purged) == (True, True)
    assert nothing_stored(services, address)
    with pytest.raises(ResourceNotFoundError):
        client.get_deleted_secret(mailbox_key(address))  # purged: nothing left to recover
    assert "stay valid at Entra ID" in revoked.at_entra and "Revoke-MgUserSignInSession" in revoked.at_entra
    assert services.consent.revoke(address).existed is False

    consent(address)
    assert services.registry.get(address).status == "active"
    versions = list(client.list_properties_of_secret_versions(mailbox_key(address)))
    assert len(versions) == 1
    assert not refresh_tokens(client.get_secret(mailbox_key(address)).value or "") & old


def test_a_renewal_after_a_revoke_does_not_write_the_token_back(services: Any, consent: Any, new_address: Any) -> None:
    # A worker that renews a token for a mailbox revoked meanwhile must not recover the deleted secret.
    address = new_address()
    consent(address)
    client = azure_clients.secret_client(services.settings)
    client.begin_delete_secret(mailbox_key(address)).wait()
    with pytest.raises(NeedsReconsentError):
        services.tokens._store.save(address, '{"RefreshToken": {}}')
    with pytest.raises(ResourceNotFoundError):
        client.get_secret(mailbox_key(address))


@pytest.mark.parametrize("address", ["not-an-address", "a@b", "x@contoso.com\r\nLocation: https://evil.example"])
def test_bad_addresses_are_refused_before_anything_starts(services: Any, redirect_uri: str, address: str) -> None:
    with pytest.raises(ConsentProblem) as problem:
        services.consent.start(address, redirect_uri=redirect_uri)
    assert problem.value.kind is ConsentFailure.INVALID


def test_domains_outside_the_allowed_list_are_refused(app_env: dict[str, str], redirect_uri: str) -> None:
    from collectors.services import build_services
    from shared.settings import load_settings

    limited = build_services(load_settings({**app_env, "ALLOWED_MAIL_DOMAINS": "contoso.com"}))
    with pytest.raises(ConsentProblem) as problem:
        limited.consent.start("someone@example.test", redirect_uri=redirect_uri)
    assert "ALLOWED_MAIL_DOMAINS" in problem.value.detail
    # A shared mailbox of the tenant, signed in as an account of another domain: refused before any flow exists.
    with pytest.raises(ConsentProblem) as problem:
        limited.consent.start("helpdesk@contoso.com", redirect_uri=redirect_uri, delegate="someone@example.test")
    assert problem.value.title == "Invalid delegate address" and "ALLOWED_MAIL_DOMAINS" in problem.value.detail


def test_fifty_concurrent_consents_all_land(stack: Stack, services: Any, redirect_uri: str, new_address: Any) -> None:
    addresses = [new_address() for _ in range(50)]

    def one(address: str) -> str:
        with tls_session(stack.ca_bundle) as session:
            auth_uri = services.consent.start(address, redirect_uri=redirect_uri)
            fields = sign_in(
                auth_uri, login=address, password=stack.user_password, redirect_uri=redirect_uri, session=session
            )
            return str(services.consent.complete(fields).address)

    with ThreadPoolExecutor(16) as pool:
        done = list(pool.map(one, addresses))
    assert done == addresses
    versions = {services.tokens._store.load(a).version for a in addresses}
    assert len(versions) == 50
    assert {m.address for m in services.registry.list()} >= set(addresses)


def test_no_token_code_or_secret_reaches_the_logs(
    stack: Stack, services: Any, new_sign_in: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # MSAL and azure-core log request details at DEBUG
    redaction.install()  # as function_app does at import: the filter sits in front of every handler
    address, fields = new_sign_in()
    services.consent.complete(fields)
    cache = services.tokens._store.load(address).serialized
    secrets = {fields["code"], stack.client_secret, *re.findall(r'"secret": "([^"]+)"', cache)}
    assert len(secrets) >= 4  # code, client secret, access token, refresh token, id token
    text = "\n".join(r.getMessage() for r in caplog.records)
    leaked = [s[:6] for s in secrets if s in text]
    assert leaked == []
