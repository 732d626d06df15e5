"""The keep-alive records a token's save only when the renewed token reached Key Vault."""

from __future__ import annotations

import logging
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import pytest

from collectors.operations import Operations
from collectors.scheduled import upkeep
from collectors.tokens import AccessToken
from shared.errors import TransientError
from shared.registry import Mailbox, MailboxRegistry, MailboxStatus, utcnow
from tests.support.fakes import FakeTable

PAUSED = "paused@contoso.example"


class _Renewing:
    """TokenService.renew as the keep-alive sees it: a renewed token that was written (``saved_at``) or not."""

    def __init__(self, *, written: bool) -> None:
        self.written = written
        self.renewed: list[str] = []

    def renew(self, address: str, *, signed_in_as: str, secret_name: str = "") -> AccessToken:
        self.renewed.append(address)
        saved_at = utcnow() if self.written else None
        return AccessToken("access", 0.0, renewed=True, saved_at=saved_at, secret_name="mbx-new" * self.written)


def _operations(tokens: Any) -> tuple[Operations, MailboxRegistry]:
    registry = MailboxRegistry(FakeTable())  # type: ignore[arg-type]
    registry.put(Mailbox(PAUSED, status=MailboxStatus.PAUSED, token_saved_at=utcnow() - timedelta(days=8)))
    return Operations(registry=registry, tokens=tokens, consent=None, signer=None), registry  # type: ignore[arg-type]


def test_a_renewal_that_reached_key_vault_is_recorded() -> None:
    tokens = _Renewing(written=True)
    operations, registry = _operations(tokens)
    before = utcnow()

    assert operations.keep_alive(registry.list()) == [PAUSED]

    row = registry.get(PAUSED)
    assert tokens.renewed == [PAUSED]
    assert row.token_saved_at is not None and row.token_saved_at >= before - timedelta(seconds=1)
    assert row.token_secret == "mbx-new"


def test_a_renewal_that_wrote_nothing_leaves_the_token_s_age(caplog: pytest.LogCaptureFixture) -> None:
    tokens = _Renewing(written=False)
    operations, registry = _operations(tokens)
    saved_before = registry.get(PAUSED).token_saved_at

    assert operations.keep_alive(registry.list()) == []

    assert tokens.renewed == [PAUSED]  # it did renew at Entra
    assert registry.get(PAUSED).token_saved_at == saved_before
    assert f"token keep-alive not saved mailbox={PAUSED} outcome=token_save_pending" in caplog.text
    # and the next keep-alive tries again, since the row still says the token is old
    tokens.written = True
    assert operations.keep_alive(registry.list()) == [PAUSED]
    assert registry.get(PAUSED).token_saved_at != saved_before


def test_a_failed_renewal_leaves_the_token_s_age() -> None:
    class _Failing:
        def renew(self, address: str, **kwargs: Any) -> AccessToken:
            raise TransientError("Entra ID unreachable")

    operations, registry = _operations(_Failing())
    saved_before = registry.get(PAUSED).token_saved_at
    assert operations.keep_alive(registry.list()) == []
    assert registry.get(PAUSED).token_saved_at == saved_before


class _CountingRegistry(MailboxRegistry):
    def __init__(self) -> None:
        super().__init__(FakeTable())  # type: ignore[arg-type]
        self.listings = 0

    def list(self) -> list[Mailbox]:
        self.listings += 1
        return super().list()


def _upkeep_services(tokens: Any) -> Any:
    registry = _CountingRegistry()
    old = utcnow() - timedelta(days=80)  # a token 10 days from expiring unused: the daily line warns of it
    registry.put(Mailbox(PAUSED, status=MailboxStatus.PAUSED, token_saved_at=old))
    registry.put(Mailbox("fresh@contoso.example", status=MailboxStatus.PAUSED, token_saved_at=utcnow()))
    operations = Operations(registry=registry, tokens=tokens, consent=None, signer=None)  # type: ignore[arg-type]
    consent = SimpleNamespace(purge_expired_flows=lambda: 0)
    return SimpleNamespace(registry=registry, operations=operations, consent=consent)


def test_after_a_fan_out_the_reports_read_the_listing_and_only_the_kept_alive_rows_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    services = _upkeep_services(_Renewing(written=True))
    listed = services.registry.list()

    with caplog.at_level(logging.WARNING):
        upkeep(services, listed, run_wrote=False)

    assert services.registry.listings == 1  # the run's listing only
    # The renewed token is read again: no "expires unused soon" line from the listing's old save time.
    assert "token expires unused soon" not in caplog.text
    assert services.registry.get(PAUSED).reconsent_reported_at is None


def test_after_a_run_in_this_process_the_reports_read_every_row_again() -> None:
    services = _upkeep_services(_Renewing(written=False))
    listed = services.registry.list()

    upkeep(services, listed)

    assert services.registry.listings == 2
