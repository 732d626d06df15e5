"""Token persistence against the stricter stand-ins: Entra's non-revoking rotation, Key Vault's versions, deletes
that take time, RBAC, and several workers that share no memory.

- renewals write to Key Vault only when the stored refresh token has aged past TOKEN_REWRITE_AFTER, and each write
  disables the version before it; before ROLLOVER_VERSIONS the token moves to a new secret name;
- a renewal never recovers a deleted (revoked) secret; a busy secret (409 being deleted or recovered) is retried
  with backoff until the deadline, then reported as transient; a 403 says the role may still be propagating;
- a worker's unsaved token is written only if Key Vault still holds the version it was renewed from;
- names are a full digest of the address, the registry checks the stored address, and rows and secrets under the
  keys of older releases are read and moved.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msal
import pytest

import collectors.tokens as tokens_module
import shared.token_store as store_module
from collectors.services import build_services
from devstack import dovecot
from devstack.stack import app_object_id
from shared import azure_clients
from shared.errors import ConfigurationError, TransientError
from shared.mailboxes import legacy_mailbox_key, mailbox_key
from shared.registry import PARTITION, _to_entity
from tests.conftest import simple_message
from tests.support.faults import collect, expire_access_tokens
from tests.support.signin import sign_in
from tests.support.stack import Stack

pytestmark = pytest.mark.integration

SDK_ATTEMPTS = 4  # SecretClient(retry_total=3)


def secrets(keyvault_control: Callable[..., Any]) -> dict[str, Any]:
    summary: dict[str, Any] = keyvault_control("secrets", method="GET")["secrets"]
    return summary


def short_tokens(entra_control: Callable[..., Any], address: str, seconds: int = 120) -> None:
    """This account's access tokens live below the renewal margin: every run renews."""
    entra_control("settings", {"access_token_ttl_by_account": {address: seconds}})


def cached_account(serialized: str) -> str:
    cache = msal.SerializableTokenCache()
    cache.deserialize(serialized)
    [account] = cache.find(msal.TokenCache.CredentialType.ACCOUNT)
    return str(account["username"])


def test_renewals_write_only_when_the_stored_token_ages_and_disable_the_version_before(
    services: Any, consent: Any, new_address: Any, deliver: Any, entra_control: Any, keyvault_control: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    address = new_address()
    short_tokens(entra_control, address)
    consent(address)
    name = mailbox_key(address)
    for i in range(3):
        deliver(address, simple_message(f"young {i}"))
        services.tokens.forget(address)  # a cold worker each time: it renews from the stored token
        assert collect(services, address).messages == 1

    assert secrets(keyvault_control)[name]["versions"] == 1, "a young stored token is not replaced"

    monkeypatch.setattr(tokens_module, "TOKEN_REWRITE_AFTER", 0)  # as if a day had passed
    deliver(address, simple_message("aged"))
    services.tokens.forget(address)
    assert collect(services, address).messages == 1
    summary = secrets(keyvault_control)[name]
    assert (summary["versions"], summary["enabled"]) == (2, 1), "the replaced version is disabled"
    assert services.registry.get(address).token_secret == name


def test_the_token_moves_to_a_new_secret_before_the_version_cap(
    services: Any, settings: Any, consent: Any, new_address: Any, deliver: Any, entra_control: Any,
    keyvault_control: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setattr(tokens_module, "TOKEN_REWRITE_AFTER", 0)
    monkeypatch.setattr(store_module, "ROLLOVER_VERSIONS", 3)
    address = new_address()
    short_tokens(entra_control, address)
    consent(address)
    for i in range(3):
        deliver(address, simple_message(f"run {i}"))
        assert collect(services, address).messages == 1

    row = services.registry.get(address)
    assert row.token_secret == f"{mailbox_key(address)}-g2"
    summary = secrets(keyvault_control)
    assert summary[mailbox_key(address)]["state"] in ("deleting", "deleted"), "the old secret is retired"
    assert summary[row.token_secret.lower()]["versions"] < 3
    fresh = build_services(settings)  # a cold worker finds the token through the registry
    deliver(address, simple_message("from the new secret"))
    assert collect(fresh, address).messages == 1


def test_a_renewal_never_recovers_a_deleted_secret(
    services: Any, consent: Any, new_address: Any, entra_control: Any, keyvault_control: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setattr(tokens_module, "TOKEN_REWRITE_AFTER", 0)
    address = new_address()
    consent(address)
    expire_access_tokens(services, address)
    name = mailbox_key(address)
    keyvault_control("faults", {"name": name, "method": "PUT", "status": 503, "count": SDK_ATTEMPTS})
    assert collect(services, address).outcome == "ok"  # renewed; the write failed and is pending in memory

    # The mailbox is revoked meanwhile (its secret deleted); the worker still holds the renewed token.
    azure_clients.secret_client(services.settings).begin_delete_secret(name).wait()
    assert services.tokens._warm[address].unsaved

    result = collect(services, address)

    assert result.outcome == "needs_reconsent"
    assert secrets(keyvault_control)[name]["state"] in ("deleting", "deleted"), "the revoked token stays deleted"


def test_a_busy_secret_is_retried_until_the_deadline_then_transient(
    services: Any, consent: Any, new_address: Any, keyvault_control: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    address = new_address()
    consent(address)
    name = mailbox_key(address)
    client = azure_clients.secret_client(services.settings)
    client.begin_delete_secret(name).wait()
    store = services.tokens._store

    client.begin_recover_deleted_secret(name)  # the recovery takes a few seconds; a write meanwhile gets 409
    saved = store.save(address, json.dumps({"cache": 1}), new_consent=True)
    assert saved.name == name and client.get_secret(name).value == json.dumps({"cache": 1})

    keyvault_control("settings", {"transition_seconds": 30})
    try:
        client.begin_delete_secret(name)
        monkeypatch.setattr(store_module, "DEFAULT_BUSY_WAIT", 1.5)
        with pytest.raises(TransientError, match="ObjectIsBeingDeleted"):
            store.save(address, json.dumps({"cache": 2}), new_consent=True)
    finally:
        keyvault_control("settings", {"transition_seconds": 2})


def test_a_403_right_after_provisioning_says_the_role_may_still_be_propagating(
    stack: Stack, services: Any, consent: Any, new_address: Any, keyvault_control: Any
) -> None:
    address = new_address()
    consent(address)
    services.tokens.forget(address)
    app = app_object_id(stack.info)
    keyvault_control("roles", {"principal": app, "role": "Key Vault Secrets Officer", "delay_seconds": 3})
    try:
        with pytest.raises(ConfigurationError) as denied:
            services.tokens._store.load(address)
        assert "propagating" in denied.value.remedy and "Key Vault Secrets Officer" in denied.value.remedy
    finally:
        time.sleep(3.2)
    assert services.tokens._store.load(address) is not None


def test_a_stale_unsaved_token_never_replaces_a_newer_consent(
    stack: Stack, settings: Any, services: Any, consent: Any, new_address: Any, entra_session: Any,
    keyvault_control: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setattr(tokens_module, "TOKEN_REWRITE_AFTER", 0)
    shared_box, first, second = new_address(), new_address(), new_address()
    for delegate in (first, second):
        dovecot.grant_full_access(Path(stack.dovecot_config), delegate, shared_box)
    consent(shared_box, delegate=first)
    expire_access_tokens(services, shared_box)
    name = mailbox_key(shared_box)
    keyvault_control("faults", {"name": name, "method": "PUT", "status": 503, "count": SDK_ATTEMPTS})
    collect(services, shared_box)  # this worker renews; Key Vault refuses the write: it holds the token unsaved
    assert services.tokens._warm[shared_box].unsaved

    # Another instance (no shared memory) handles a re-consent as another delegate.
    other = build_services(settings)
    redirect_uri = f"{stack.host_origin}/api/auth/callback"
    auth_uri = other.consent.start(shared_box, redirect_uri=redirect_uri, delegate=second)
    fields = sign_in(auth_uri, login=second, password=stack.user_password, redirect_uri=redirect_uri,
                     session=entra_session)  # fmt: skip
    other.consent.complete(fields)

    collect(services, shared_box)  # the first worker's next run

    stored = services.tokens._store.load(shared_box)
    assert cached_account(stored.serialized) == second, "Key Vault keeps the new consent"


def test_the_registry_checks_the_stored_address(services: Any, consent: Any, new_address: Any) -> None:
    owner, other = new_address(), new_address()
    consent(owner)
    # A row under another address's key (a key collision, or a row written by hand) is not that mailbox's.
    entity = _to_entity(services.registry.get(owner))
    entity["RowKey"] = mailbox_key(other)
    table = azure_clients.table(services.settings, services.settings.mailbox_table)
    table.upsert_entity(entity)

    assert services.registry.find(other) is None
    assert [m.address for m in services.registry.list()].count(owner) == 1


def test_rows_and_secrets_under_the_old_keys_are_read_and_moved(
    services: Any, consent: Any, new_address: Any, deliver: Any, keyvault_control: Any, entra_control: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setattr(tokens_module, "TOKEN_REWRITE_AFTER", 0)
    address = new_address()
    short_tokens(entra_control, address)
    consent(address)
    # As a deployed older release left them: the row and the secret under the old key, tags with the address.
    client = azure_clients.secret_client(services.settings)
    table = azure_clients.table(services.settings, services.settings.mailbox_table)
    old, new = legacy_mailbox_key(address), mailbox_key(address)
    value = client.get_secret(new).value
    client.set_secret(old, value, tags={"mailbox": address})
    client.begin_delete_secret(new).wait()
    client.purge_deleted_secret(new)
    entity = _to_entity(services.registry.get(address))
    del entity["token_secret"]
    table.delete_entity(PARTITION, new)
    table.upsert_entity({**entity, "RowKey": old})
    services.tokens.forget(address)

    deliver(address, simple_message("after the upgrade"))
    assert [m.address for m in services.registry.list()] == [address]
    assert collect(services, address).messages == 1

    keys = [e["RowKey"] for e in table.query_entities(f"PartitionKey eq '{PARTITION}'")]
    assert keys == [new]
    assert services.registry.get(address).token_secret == new
    summary = secrets(keyvault_control)
    assert summary[new]["state"] == "active"
    assert summary[old.lower()]["state"] in ("deleting", "deleted"), "the name holding the address is retired"
