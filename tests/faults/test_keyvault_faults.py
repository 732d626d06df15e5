"""Key Vault faults on the token store: throttling with Retry-After, server errors, an unreachable vault, a secret
deleted behind the app's back, and a write that fails right after the identity provider rotated the refresh token.

Faults are injected in the stack's Key Vault stand-in for one secret name only, with a count that the SDK's own
retries use up exactly, so that no other test's secrets are touched and nothing is left behind.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import msal
import pytest

import collectors.tokens as tokens_module
from collectors.entra import confidential_app
from collectors.services import build_services
from shared import azure_clients
from shared.errors import TransientError
from shared.registry import MailboxStatus
from shared.settings import load_settings
from tests.conftest import simple_message
from tests.support.faults import (
    LEDGER,
    check_delivery,
    collect,
    expire_access_tokens,
    secret_name,
    stored_version,
)
from tests.support.net import free_port
from tests.support.standins import ControlClient

pytestmark = [pytest.mark.integration, pytest.mark.faults]

SDK_ATTEMPTS = 4  # SecretClient(retry_total=3): the first try and three retries


class Vault:
    """The Key Vault stand-in's control API, for faults on one secret."""

    def __init__(self, control: ControlClient) -> None:
        self._control = control

    def fault(self, address: str, *, method: str, status: int, count: int = SDK_ATTEMPTS, **extra: Any) -> str:
        added = self._control.add_fault(name=secret_name(address), method=method, status=status, count=count, **extra)
        return str(added["id"])

    def served(self, fault_id: str) -> tuple[int, int]:
        """(requests answered with the fault, uses left)."""
        [fault] = [f for f in self._control.faults() if f["id"] == fault_id]
        return int(fault["served"]), int(fault["count"])


@pytest.fixture
def vault(keyvault_control: ControlClient) -> Iterator[Vault]:
    yield Vault(keyvault_control)


def cold(services: Any, address: str) -> None:
    """As a new worker: the token cache must be read from Key Vault."""
    services.tokens.forget(address)


@pytest.mark.parametrize(
    ("status", "retry_after"), [(429, 1), (503, None), (500, None)], ids=["throttled", "unavailable", "error"]
)
def test_key_vault_throttling_and_server_errors_are_transient_and_keep_the_token(
    services: Any, consent: Any, new_address: Any, deliver: Any, queue_messages: Any, vault: Vault,
    status: int, retry_after: int | None,
) -> None:  # fmt: skip
    address, other = new_address(), new_address()
    for box in (address, other):
        consent(box)
        cold(services, box)
    sent = [simple_message(f"for {box}") for box in (address, other)]
    for box, raw in zip((address, other), sent, strict=True):
        deliver(box, raw)
    version = stored_version(services, address)
    extra = {"retry_after": retry_after} if retry_after is not None else {}
    fault = vault.fault(address, method="GET", status=status, **extra)

    results = {r.address: r for r in services.collector.run()}

    assert vault.served(fault) == (SDK_ATTEMPTS, 0)
    failed = results[address]
    assert failed.outcome == "transient" and f"Key Vault read failed for {address} (HTTP {status})" in failed.error
    assert results[other].messages == 1
    row = services.registry.get(address)
    assert (row.status, row.last_error_class) == (MailboxStatus.ACTIVE, "transient")
    if retry_after:
        assert row.retry_after is not None, "Key Vault's Retry-After defers the mailbox"
    assert stored_version(services, address) == version

    time.sleep(retry_after or 0)
    assert collect(services, address).messages == 1
    check_delivery(services, sent, queue_messages(), case=f"Key Vault: HTTP {status} on read")


def test_an_unreachable_key_vault_is_transient_and_gives_up_quickly(
    app_env: dict[str, str], services: Any, consent: Any, new_address: Any, deliver: Any, queue_messages: Any
) -> None:
    address = new_address()
    consent(address)
    raw = simple_message("vault down")
    deliver(address, raw)
    version = stored_version(services, address)
    unreachable = build_services(load_settings({**app_env, "KEY_VAULT_URI": f"https://localhost:{free_port()}"}))

    started = time.monotonic()
    failed = collect(unreachable, address)

    assert failed.outcome == "transient" and "Key Vault unreachable during read" in failed.error
    assert time.monotonic() - started < 20
    assert services.registry.get(address).last_error_class == "transient"
    assert stored_version(services, address) == version
    assert collect(services, address).messages == 1
    check_delivery(services, [raw], queue_messages(), case="Key Vault: unreachable")


def test_a_secret_deleted_behind_the_apps_back_asks_for_re_consent_and_the_others_go_on(
    services: Any, consent: Any, new_address: Any, deliver: Any, queue_messages: Any
) -> None:
    address, other = new_address(), new_address()
    for box in (address, other):
        consent(box)
        cold(services, box)
    mine, theirs = simple_message("waits for re-consent"), simple_message("collected")
    deliver(address, mine)
    deliver(other, theirs)
    secrets = azure_clients.secret_client(services.settings)
    secrets.begin_delete_secret(secret_name(address)).wait()

    results = {r.address: r for r in services.collector.run()}

    assert results[other].messages == 1
    assert results[address].outcome == "needs_reconsent"
    row = services.registry.get(address)
    assert row.status == MailboxStatus.NEEDS_RECONSENT and row.last_error_class == "needs_reconsent"
    assert "Key Vault secret is missing" in row.last_error and "authorize link" in row.last_error
    assert [r.address for r in services.collector.run()] == [other], "a mailbox that needs re-consent is skipped"

    consent(address)  # recovers the soft-deleted secret and stores the new sign-in as its next version
    assert services.registry.get(address).status == MailboxStatus.ACTIVE
    assert collect(services, address).messages == 1
    check_delivery(services, [mine, theirs], queue_messages(), case="Key Vault: secret deleted, then re-consent")


def test_a_rotated_refresh_token_survives_a_failed_key_vault_write(
    services: Any, settings: Any, consent: Any, new_address: Any, deliver: Any, queue_messages: Any, vault: Vault,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, entra_control: Any,
) -> None:  # fmt: skip
    address = new_address()
    consent(address)
    entra_control("settings", {"strict_accounts": [address]})
    monkeypatch.setattr(tokens_module, "TOKEN_REWRITE_AFTER", 0)  # with strict rotation, every rotation is written
    before = expire_access_tokens(services, address)  # the next run must renew, and the stand-in rotates
    old_cache = services.tokens._store.load(address).serialized
    saved_at = services.registry.get(address).token_saved_at
    first = simple_message("while the vault refuses writes")
    deliver(address, first)
    fault = vault.fault(address, method="PUT", status=503, retry_after=0)

    during = collect(services, address)

    assert vault.served(fault) == (SDK_ATTEMPTS, 0)
    assert (during.outcome, during.messages) == ("ok", 1), "the renewed access token is used at once"
    assert "outcome=token_save_pending" in caplog.text
    assert stored_version(services, address) == before, "the vault refused the write"
    # The stand-in rotates strictly: the refresh token still in the vault is dead, so the only live one is the
    # rotated token the worker holds in memory.
    old = msal.SerializableTokenCache()
    old.deserialize(old_cache)
    app = confidential_app(settings, old)
    refused = app.acquire_token_silent_with_error([settings.imap_scope], app.get_accounts()[0], force_refresh=True)
    assert refused and refused.get("error") == "invalid_grant"

    second = simple_message("after the vault is back")
    deliver(address, second)
    after = collect(services, address)

    assert (after.outcome, after.messages) == ("ok", 1)
    assert stored_version(services, address) != before, "the pending token cache is written first thing"
    row = services.registry.get(address)
    assert row.token_saved_at is not None and (saved_at is None or row.token_saved_at > saved_at)

    # A new worker, starting from the vault alone, renews with the stored (rotated) refresh token.
    fresh = build_services(settings)
    expire_access_tokens(fresh, address)
    third = simple_message("from a new worker")
    deliver(address, third)
    assert collect(fresh, address).messages == 1
    check_delivery(services, [first, second, third], queue_messages(), case="Key Vault: write fails after rotation")
    LEDGER.note("Key Vault: rotated token kept in memory, written on the next run, old one refused")


def test_key_vault_retries_end_by_the_run_deadline(services: Any, consent: Any, new_address: Any, vault: Vault) -> None:
    """One retry policy (shared.retry): the Key Vault client's own retries, never a loop around them, and none once
    the run's deadline is too close for one. Counted in requests the stand-in answered, not in seconds."""
    address = new_address()
    consent(address)
    store = services.tokens._store
    serialized = store.load(address).serialized
    version = stored_version(services, address)

    plenty = vault.fault(address, method="PUT", status=503, retry_after=0)
    with pytest.raises(TransientError):
        store.save(address, serialized, deadline=time.monotonic() + 120)
    assert vault.served(plenty) == (SDK_ATTEMPTS, 0), "the client's own retries, and no loop around them"

    # One failure only: a retry would succeed, so the error proves there was none.
    close = vault.fault(address, method="PUT", status=503, count=1, retry_after=0)
    with pytest.raises(TransientError):
        store.save(address, serialized, deadline=time.monotonic() + 5)
    assert vault.served(close) == (1, 0), "a retry would not fit before the deadline"

    with pytest.raises(TransientError, match="time budget"):
        store.save(address, serialized, deadline=time.monotonic())
    assert stored_version(services, address) == version, "nothing was written"
