"""Identity provider faults during token renewal: server errors and answers slower than the timeout (transient, the
stored token kept), every definitive ``invalid_grant`` Entra gives for a dead grant (re-consent, with the reason),
and an expired client secret (configuration). The other mailboxes are collected in the same run.

Faults are injected in the Entra stand-in for one account and the refresh grant only.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

import collectors.entra as entra
from shared.registry import MailboxStatus
from tests.conftest import simple_message
from tests.support.faults import LEDGER, check_delivery, collect, expire_access_tokens, stored_version
from tests.support.standins import ControlClient

pytestmark = [pytest.mark.integration, pytest.mark.faults]

# Each invalid_grant code that ends a mailbox's grant, with the reason the registry must give for it.
DEAD_GRANTS = {
    700082: "90 days without use",
    50173: "password reset",
    70043: "Conditional Access",
    65001: "has not consented",
}


class Entra:
    """The Entra stand-in's control API, for faults on one account's refresh grant."""

    def __init__(self, control: ControlClient) -> None:
        self._control = control

    def fault(self, account: str, **fault: Any) -> None:
        self._control.add_fault(**{"endpoint": "token", "grant_type": "refresh_token", "account": account, **fault})

    def pending(self, account: str) -> int:
        return sum(f["count"] for f in self._control.faults() if f.get("account") == account)


@pytest.fixture
def idp(entra_control: ControlClient) -> Iterator[Entra]:
    yield Entra(entra_control)


def renewing(services: Any, consent: Any, deliver: Any, address: str) -> tuple[bytes, str]:
    """A consented mailbox with one message, whose next collection must renew its access token."""
    consent(address)
    raw = simple_message(f"for {address}")
    deliver(address, raw)
    return raw, expire_access_tokens(services, address)


@pytest.mark.parametrize(
    ("error", "status"), [("temporarily_unavailable", 503), ("server_error", 500)], ids=["503", "500"]
)
def test_token_endpoint_server_errors_are_transient_and_keep_the_token(
    services: Any, consent: Any, new_address: Any, deliver: Any, queue_messages: Any, idp: Entra,
    error: str, status: int,
) -> None:  # fmt: skip
    address = new_address()
    raw, version = renewing(services, consent, deliver, address)
    # MSAL keeps a 5xx answer for Retry-After seconds and answers repeats from it: one second here.
    idp.fault(address, error=error, status=status, retry_after=1, count=1)

    failed = collect(services, address)

    assert idp.pending(address) == 0
    assert failed.outcome == "transient" and "Entra ID" in failed.error
    row = services.registry.get(address)
    assert (row.status, row.last_error_class) == (MailboxStatus.ACTIVE, "transient")
    assert stored_version(services, address) == version, "a transient failure must not touch the stored token"

    time.sleep(1.2)
    assert collect(services, address).messages == 1
    check_delivery(services, [raw], queue_messages(), case=f"Identity provider: HTTP {status} on renewal")


def test_a_token_endpoint_slower_than_the_timeout_is_transient_and_keeps_the_token(
    services: Any, consent: Any, new_address: Any, deliver: Any, queue_messages: Any, idp: Entra,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setattr(entra, "HTTP_TIMEOUT", (5, 1.0))  # seconds: connect, read (30 s read in production)
    address = new_address()
    raw, version = renewing(services, consent, deliver, address)
    # The answer comes after the client gave up; it is an error, so the stand-in does not rotate the refresh token
    # behind the client's back (Entra would keep the old one valid anyway).
    idp.fault(address, delay_ms=3000, error="temporarily_unavailable", status=503, count=1)

    started = time.monotonic()
    failed = collect(services, address)

    assert time.monotonic() - started < 3, "the renewal waited for the slow answer"
    assert failed.outcome == "transient" and "Entra ID unreachable" in failed.error
    assert stored_version(services, address) == version
    time.sleep(2.5)  # the slow answer is served (and used up) before the next try

    assert collect(services, address).messages == 1
    check_delivery(services, [raw], queue_messages(), case="Identity provider: answer slower than the timeout")


def test_each_dead_grant_asks_for_re_consent_with_its_reason_and_the_others_go_on(
    services: Any, consent: Any, new_address: Any, deliver: Any, queue_messages: Any, idp: Entra
) -> None:
    dead = {code: new_address() for code in DEAD_GRANTS}
    good = new_address()
    sent: dict[str, tuple[bytes, str]] = {}
    for address in [*dead.values(), good]:
        sent[address] = renewing(services, consent, deliver, address)
    for code, address in dead.items():
        idp.fault(address, error="invalid_grant", aadsts=code, status=400, count=1)

    results = {r.address: r for r in services.collector.run()}

    assert results[good].outcome == "ok" and results[good].messages == 1
    for code, address in dead.items():
        assert results[address].outcome == "needs_reconsent", (code, results[address])
        row = services.registry.get(address)
        assert row.status == MailboxStatus.NEEDS_RECONSENT and row.last_error_class == "needs_reconsent"
        assert f"AADSTS{code}" in row.last_error and DEAD_GRANTS[code] in row.last_error, row.last_error
        assert "authorize link" in row.last_error
        assert stored_version(services, address) == sent[address][1], "the stored token is kept for the record"
        LEDGER.note(f"Identity provider: invalid_grant AADSTS{code} -> needs_reconsent")
    assert [r.address for r in services.collector.run()] == [good], "mailboxes that need re-consent are skipped"
    check_delivery(services, [sent[good][0]], queue_messages(), case="Identity provider: dead grants (other mailbox)")


def test_an_expired_client_secret_is_a_configuration_error_that_says_to_renew_it(
    services: Any, consent: Any, new_address: Any, deliver: Any, queue_messages: Any, idp: Entra
) -> None:
    address, other = new_address(), new_address()
    raw, version = renewing(services, consent, deliver, address)
    other_raw, _ = renewing(services, consent, deliver, other)
    idp.fault(address, error="invalid_client", aadsts=7000222, status=401, count=1)

    results = {r.address: r for r in services.collector.run()}

    assert results[other].messages == 1
    assert results[address].outcome == "configuration"
    row = services.registry.get(address)
    assert row.status == MailboxStatus.ACTIVE, "a configuration problem is not the mailbox's: no re-consent"
    assert row.last_error_class == "configuration" and "AADSTS7000222" in row.last_error
    assert "client secret has expired" in row.last_error and "create a new one" in row.last_error
    assert "ENTRA_CLIENT_SECRET" in row.last_error
    assert stored_version(services, address) == version

    assert collect(services, address).messages == 1  # the secret is renewed (the fault is used up)
    check_delivery(services, [raw, other_raw], queue_messages(), case="Identity provider: expired client secret")
