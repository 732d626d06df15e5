"""A warm worker reads Key Vault once per token lifetime and writes once a day, against the real Entra stand-in
(which, as Entra, does not revoke a redeemed refresh token) and Key Vault endpoint. Time is simulated for the token
service and MSAL only (five-minute runs)."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import msal.application
import msal.token_cache
import pytest

import collectors.tokens
from tests.support.clock import ShiftedClock

pytestmark = pytest.mark.integration

RUN_EVERY = 300  # seconds: the default schedule
TOKEN_LIFETIME = 3600  # seconds


def test_key_vault_is_read_once_per_renewal_and_written_once_a_day(
    services: Any, consent: Any, new_address: Any, entra_control: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    address = new_address()
    # Entra's lifetimes are random (60 to 90 minutes): this account's tokens live exactly 60, so the count is known.
    entra_control("settings", {"access_token_ttl_by_account": {address: TOKEN_LIFETIME}})
    consent(address)
    store = services.tokens._store
    calls: Counter[str] = Counter()
    for name in ("load", "save"):
        original = getattr(store, name)

        def counted(*args: Any, _original: Any = original, _name: str = name, **kwargs: Any) -> Any:
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(store, name, counted)
    clock = ShiftedClock()
    for module in (collectors.tokens, msal.application, msal.token_cache):
        monkeypatch.setattr(module, "time", clock)

    first = services.tokens.access_token(address, signed_in_as=address)
    assert first.expires_on - time.time() > TOKEN_LIFETIME - 60
    tokens = {first.token}
    for _ in range(2 * 3600 // RUN_EVERY):
        clock.offset += RUN_EVERY
        token = services.tokens.access_token(address, signed_in_as=address)
        assert token.expires_on - clock.time() > collectors.tokens.ACCESS_TOKEN_MARGIN
        tokens.add(token.token)

    # Two hours of 60-minute tokens: renewed twice (each ten minutes before expiry), one read before each
    # renewal plus the cold worker's first read; nothing in between, and no write: the stored token is young.
    assert len(tokens) == 3
    assert calls == {"load": 3}

    # A day later the stored refresh token is due to be replaced: the next renewal writes once.
    clock.offset += collectors.tokens.TOKEN_REWRITE_AFTER
    services.tokens.access_token(address, signed_in_as=address)
    # One write, after checking that Key Vault still holds the version the cache was renewed from.
    assert calls["save"] == 1 and calls["load"] <= 5
