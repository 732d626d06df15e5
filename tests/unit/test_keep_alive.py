"""The keep-alive records a token's save only when the renewed token reached Key Vault."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from collectors.operations import Operations
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
