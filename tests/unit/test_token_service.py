"""TokenService against an in-memory token store and identity provider: rotation saved before reuse, pending
writes, version races between workers, definitive and transient failures, one save per call within the deadline.

The identity provider here is strict like the local stand-in: a refresh token is spent once it is rotated. The
Key Vault and Entra fault suites check the same against the real parts."""

from __future__ import annotations

import time
from typing import Any

import pytest

from collectors.tokens import ACCESS_TOKEN_MARGIN, TokenService
from shared.errors import NeedsReconsentError, TransientError
from shared.retry import MIN_RETRY_SECONDS, call_options
from shared.token_store import TokenCacheStore
from tests.support.fakes import FakeIdentityProvider, FakeStore, settings

ADDRESS = "support@contoso.example"


def service(store: FakeStore, idp: FakeIdentityProvider) -> TokenService:
    return TokenService(settings(), store, app_factory=idp.app)  # type: ignore[arg-type]


@pytest.fixture
def idp() -> FakeIdentityProvider:
    return FakeIdentityProvider()


@pytest.fixture
def store(idp: FakeIdentityProvider) -> FakeStore:
    store = FakeStore()
    store.versions.append(idp.consent(expires_in=ACCESS_TOKEN_MARGIN // 2))  # already too short to hand out
    return store


def test_a_renewal_is_saved_before_the_token_is_used(store: FakeStore, idp: FakeIdentityProvider) -> None:
    token = service(store, idp).access_token(ADDRESS, signed_in_as=ADDRESS)
    assert (token.token, token.renewed) == ("at-1", True) and token.saved_at is not None
    assert store.refresh_token() == "rt-1" and len(store.versions) == 2


def test_a_stored_token_still_good_is_used_without_renewing(idp: FakeIdentityProvider) -> None:
    store = FakeStore()
    store.versions.append(idp.consent(expires_in=3600))
    token = service(store, idp).access_token(ADDRESS, signed_in_as=ADDRESS)
    assert (token.token, token.renewed, idp.renewals, store.saves) == ("at-0", False, 0, [])


def test_a_failed_save_keeps_the_rotated_token_and_the_next_call_writes_it_first(
    store: FakeStore, idp: FakeIdentityProvider
) -> None:
    tokens = service(store, idp)
    store.failing_saves = 1
    during = tokens.access_token(ADDRESS, signed_in_as=ADDRESS)
    assert (during.token, during.saved_at) == ("at-1", None), "the renewed access token is used at once"
    assert len(store.saves) == 1, "one write per call: the Key Vault client retries on its own"
    assert store.refresh_token() == "rt-0" and "rt-0" not in idp.valid, "only memory holds the live token now"

    after = tokens.access_token(ADDRESS, signed_in_as=ADDRESS)
    assert after.saved_at is not None and after.token == "at-1" and idp.renewals == 1
    assert store.refresh_token() == "rt-1", "the pending write went first"


def test_a_pending_write_that_fails_again_is_still_kept(store: FakeStore, idp: FakeIdentityProvider) -> None:
    tokens = service(store, idp)
    store.failing_saves = 2
    tokens.access_token(ADDRESS, signed_in_as=ADDRESS)
    assert tokens.access_token(ADDRESS, signed_in_as=ADDRESS).token == "at-1"
    store.failing_saves = 0
    tokens.access_token(ADDRESS, signed_in_as=ADDRESS)
    assert store.refresh_token() == "rt-1" and len(store.saves) == 3


def test_another_worker_renewed_meanwhile_its_stored_token_is_used(store: FakeStore, idp: FakeIdentityProvider) -> None:
    first, second = service(store, idp), service(store, idp)
    second_cold = second.access_token(ADDRESS, signed_in_as=ADDRESS)  # renews: rt-0 -> rt-1, saved
    assert second_cold.token == "at-1"
    token = first.access_token(ADDRESS, signed_in_as=ADDRESS)
    assert (token.token, idp.renewals) == ("at-1", 1), "the newer stored version was read, not renewed again"


def test_a_renewal_racing_another_worker_retries_with_the_latest_stored_token(
    store: FakeStore, idp: FakeIdentityProvider
) -> None:
    late, early = service(store, idp), service(store, idp)
    # ``late`` reads version 1; before it renews, ``early`` renews (spending rt-0) and stores version 2.
    store.after_load = lambda: early.access_token(ADDRESS, signed_in_as=ADDRESS)
    token = late.access_token(ADDRESS, signed_in_as=ADDRESS)
    assert token.token == "at-2" and idp.renewals == 2
    assert store.refresh_token() == "rt-2" and len(store.versions) == 3


def test_a_revoked_grant_needs_reconsent_and_the_stored_token_is_kept(
    store: FakeStore, idp: FakeIdentityProvider
) -> None:
    idp.valid.clear()
    with pytest.raises(NeedsReconsentError, match="AADSTS50173"):
        service(store, idp).access_token(ADDRESS, signed_in_as=ADDRESS)
    assert store.refresh_token() == "rt-0" and store.saves == []


def test_an_unreachable_identity_provider_is_transient_and_keeps_the_token(
    store: FakeStore, idp: FakeIdentityProvider
) -> None:
    idp.unreachable = True
    with pytest.raises(TransientError, match="unreachable"):
        service(store, idp).access_token(ADDRESS, signed_in_as=ADDRESS)
    assert store.refresh_token() == "rt-0" and "rt-0" in idp.valid


def test_a_missing_secret_needs_reconsent(idp: FakeIdentityProvider) -> None:
    with pytest.raises(NeedsReconsentError, match="secret is missing"):
        service(FakeStore(), idp).access_token(ADDRESS, signed_in_as=ADDRESS)


def test_the_run_deadline_reaches_every_key_vault_call(store: FakeStore, idp: FakeIdentityProvider) -> None:
    deadline = time.monotonic() + 30
    service(store, idp).access_token(ADDRESS, signed_in_as=ADDRESS, deadline=deadline)
    assert store.saves == [deadline]


# -- the retry policy ---------------------------------------------------------------------------------------


def test_call_options_bound_the_sdk_call_and_its_retries_by_the_deadline() -> None:
    assert call_options(None) == {}
    assert call_options(100.0, clock=lambda: 40.0) == {"timeout": 60}
    near = call_options(100.0, clock=lambda: 100.0 - MIN_RETRY_SECONDS / 2)
    assert near == {"timeout": int(MIN_RETRY_SECONDS / 2), "retry_total": 0}, "too close for a retry"
    with pytest.raises(TransientError, match="time budget"):
        call_options(100.0, clock=lambda: 99.9)


class _Secret:
    def __init__(self) -> None:
        self.value = "{}"
        self.properties = type("Properties", (), {"version": "v2"})()


class _RecordingSecretClient:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def set_secret(self, name: str, value: str, **kwargs: Any) -> _Secret:
        self.calls.append({"call": "set", **kwargs})
        return _Secret()

    def get_secret(self, name: str, **kwargs: Any) -> _Secret:
        self.calls.append({"call": "get", **kwargs})
        return _Secret()

    def update_secret_properties(self, name: str, version: str, **kwargs: Any) -> None:
        self.calls.append({"call": "disable"})


def test_the_token_store_hands_the_deadline_to_the_key_vault_client() -> None:
    client = _RecordingSecretClient()
    store = TokenCacheStore(client)  # type: ignore[arg-type]
    store.save(ADDRESS, "{}", deadline=time.monotonic() + 5)
    store.load(ADDRESS, deadline=time.monotonic() + 60)
    store.load(ADDRESS)
    (read_current, save, disable_before, late_load, free_load) = client.calls
    assert [c["call"] for c in (read_current, save, disable_before)] == ["get", "set", "disable"]
    assert read_current["retry_total"] == 0 and 1 <= read_current["timeout"] <= 5
    assert save["retry_total"] == 0 and 1 <= save["timeout"] <= 5
    assert "retry_total" not in late_load and 50 <= late_load["timeout"] <= 60
    assert "timeout" not in free_load
    with pytest.raises(TransientError):
        store.save(ADDRESS, "{}", deadline=time.monotonic())
    assert len(client.calls) == 5, "no call is started once the deadline has passed"
