"""Faults in app mode: the identity provider refusing or failing the client-credentials grant, Exchange throttling,
and a connection cut in the middle of a FETCH. An app-mode mailbox is never marked "needs re-consent" (no one signs
in for it): its failures are configuration, mailbox_access or transient, and nothing is lost.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import collectors.entra
from devstack import dovecot
from devstack.stack import app_object_id
from shared.registry import MailboxStatus, utcnow
from tests.conftest import simple_message
from tests.support.faults import check_delivery, collect
from tests.support.imap_proxy import ImapProxy, app_env_through_proxy, proxy_fixture  # noqa: F401 - the collector reaches Dovecot through the proxy
from tests.support.stack import Stack

pytestmark = [pytest.mark.integration, pytest.mark.faults]

MSAL_5XX_THROTTLE = 5  # seconds: MSAL answers a request that got a 5xx without Retry-After from its cache meanwhile


@pytest.fixture(autouse=True)
def fresh_msal_http_cache() -> Iterator[None]:
    """MSAL keeps a refused request's answer for a minute in the worker's shared HTTP cache: each case starts and
    ends without the previous one's."""
    collectors.entra._http_cache.clear()
    yield
    collectors.entra._http_cache.clear()


@pytest.fixture
def app_mailbox(stack: Stack, services: Any, deliver: Any) -> Callable[..., list[bytes]]:
    """A granted app-mode mailbox with ``count`` messages; the provider's cached token is dropped afterwards, so
    that the next collection asks Entra ID again."""

    def run(address: str, count: int) -> list[bytes]:
        dovecot.grant_app(Path(stack.dovecot_config), app_object_id(stack.info), address)
        services.app_mailboxes.add(address, {}, admin="test")
        sent = [simple_message(f"{address} #{i}", "x" * (200 + i)) for i in range(count)]
        for raw in sent:
            deliver(address, raw)
        services.app_tokens.forget()
        return sent

    return run


@pytest.mark.parametrize(
    ("fault", "error_class", "words"),
    [
        ({"error": "temporarily_unavailable", "status": 503}, "transient", "next run"),
        ({"error": "invalid_client", "aadsts": 7000222}, "configuration", "client secret has expired"),
        ({"error": "unauthorized_client", "aadsts": 700016}, "configuration", "/adminconsent?client_id="),
        ({"error": "unauthorized_client", "aadsts": 7000112}, "configuration", "disabled"),
        ({"error": "invalid_request", "aadsts": 700213}, "configuration", "federated credential"),
        ({"error": "invalid_grant", "aadsts": 50173}, "configuration", "admin consent"),
        ({"error": "invalid_scope", "aadsts": 1002012}, "configuration", "/.default"),
    ],
    ids=["unavailable", "secret-expired", "unknown-app", "app-disabled", "federated-subject", "revoked", "scope"],
)
def test_an_app_token_failure_is_classified_with_its_remedy_and_never_needs_reconsent(
    services: Any, app_mailbox: Any, new_address: Any, entra_control: Any, queue_messages: Any,
    fault: dict[str, Any], error_class: str, words: str,
) -> None:  # fmt: skip
    address = new_address()
    sent = app_mailbox(address, 2)
    entra_control("faults", {**fault, "grant_type": "client_credentials", "count": 3})

    failed = collect(services, address)

    assert failed.outcome == error_class, failed.error
    assert words in failed.error
    row = services.registry.get(address)
    assert (row.status, row.last_error_class, row.last_uid) == (MailboxStatus.ACTIVE, error_class, 0)

    if error_class != "transient":
        return  # MSAL answers the same refused request from its cache for a minute; the next run is later
    entra_control.clear_faults()
    time.sleep(MSAL_5XX_THROTTLE + 0.5)
    recovered = collect(services, address)
    assert (recovered.outcome, recovered.messages) == ("ok", 2)
    check_delivery(services, sent, queue_messages(), case="app mode: identity provider unavailable")


@pytest.mark.parametrize("command", [r"^AUTHENTICATE ", r"^SELECT "], ids=["at-login", "at-select"])
def test_throttling_defers_an_app_mode_mailbox_for_the_suggested_backoff(
    services: Any, proxy: ImapProxy, app_mailbox: Any, new_address: Any, queue_messages: Any,
    command: str,
) -> None:  # fmt: skip
    address = new_address()
    sent = app_mailbox(address, 2)
    proxy.add("throttle", command, backoff_ms=2470)

    before = utcnow()
    failed = collect(services, address)

    assert failed.outcome == "transient" and "throttling" in failed.error
    row = services.registry.get(address)
    assert row.status == MailboxStatus.ACTIVE and row.retry_after is not None
    assert before + timedelta(seconds=2) <= row.retry_after <= utcnow() + timedelta(seconds=3)
    assert services.collector.run() == [], "the throttled mailbox is skipped until its backoff has passed"

    time.sleep(max(0.0, (row.retry_after - utcnow()).total_seconds()) + 0.2)
    [later] = services.collector.run()
    assert (later.outcome, later.messages) == ("ok", 2)
    check_delivery(services, sent, queue_messages(), case=f"app mode: throttled ({command.strip('^ ')})")


def test_a_connection_cut_in_the_middle_of_a_fetch_loses_nothing_in_app_mode(
    services: Any, proxy: ImapProxy, app_mailbox: Any, new_address: Any, queue_messages: Any,
) -> None:  # fmt: skip
    address = new_address()
    sent = app_mailbox(address, 60)
    cut = proxy.add("drop", r"^UID FETCH .*BODY\.PEEK\[\]", after_bytes=20_000)

    failed = collect(services, address)
    assert cut.fired == 1 and failed.outcome == "transient"
    assert services.registry.get(address).status == MailboxStatus.ACTIVE

    again = collect(services, address)
    assert again.outcome == "ok"
    check_delivery(services, sent, queue_messages(), case="app mode: connection cut mid-FETCH")
