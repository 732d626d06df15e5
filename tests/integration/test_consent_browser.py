"""The whole consent in headless Chromium through the local Functions host, as an admin does it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from collectors.imap_session import ImapSession
from tests.conftest import simple_message
from tests.support.app_host import LocalApp
from tests.support.browser_consent import consent_in_chromium
from tests.support.faults import collect
from tests.support.stack import Stack

pytestmark = [pytest.mark.integration, pytest.mark.browser]


def test_an_admin_authorizes_a_mailbox_in_chromium_and_its_token_logs_in_to_imap(
    stack: Stack, local_host: LocalApp, services: Any, new_address: Any, tmp_path: Path
) -> None:
    address = new_address()
    page = consent_in_chromium(stack, local_host, address, screenshot=tmp_path / "done.png")
    assert (page.status, page.title) == (200, "Mailbox authorized")
    assert address in page.text and "Key Vault" in page.text
    row = services.registry.get(address)
    assert row.status == "active" and row.signed_in_as == address

    token = services.tokens.access_token(address, signed_in_as=address)
    with ImapSession(
        services.settings.imap_host,
        services.settings.imap_port,
        address=address,
        access_token=token.token,
        ca_bundle=services.settings.ca_bundle,
    ) as imap:
        assert imap.select("INBOX") > 0
    for secret in (token.token, stack.client_secret):
        assert secret not in page.text
        assert secret not in local_host.log.read_text()


def sign_in_by_upn(stack: Stack, host: LocalApp, entra_control: Any, address: str, own: str) -> Any:
    """Make an account whose UPN is not its mailbox address ``own``, and authorize ``address`` as it in Chromium."""
    upn = f"{own.split('@', maxsplit=1)[0]}@contoso.onmicrosoft.com"
    entra_control("accounts", {"upn": upn, "mail": own, "aliases": []})
    return upn, consent_in_chromium(stack, host, address, login=upn)


def test_an_account_whose_upn_differs_from_the_mailbox_authorizes_it_in_chromium_and_collection_works(
    stack: Stack, local_host: LocalApp, services: Any, new_address: Any, entra_control: Any, deliver: Any
) -> None:
    address = new_address()
    upn, page = sign_in_by_upn(stack, local_host, entra_control, address, own=address)
    assert (page.status, page.title) == (200, "Mailbox authorized")
    assert services.registry.get(address).signed_in_as == upn
    deliver(address, simple_message("collected after a consent by UPN in Chromium"))
    result = collect(services, address)
    assert (result.outcome, result.messages) == ("ok", 1)


def test_an_account_without_access_is_refused_in_chromium_and_nothing_is_stored(
    stack: Stack, local_host: LocalApp, services: Any, new_address: Any, entra_control: Any
) -> None:
    address = new_address()
    upn, page = sign_in_by_upn(stack, local_host, entra_control, address, own=new_address())
    assert (page.status, page.title) == (403, "Wrong account")
    assert upn in page.text and "Full Access" in page.text and "Nothing was stored" in page.text
    assert services.registry.find(address) is None and services.tokens._store.load(address) is None


def test_declining_in_chromium_shows_why_and_stores_nothing(
    stack: Stack, local_host: LocalApp, services: Any, new_address: Any
) -> None:
    address = new_address()
    page = consent_in_chromium(stack, local_host, address, accept=False)
    assert (page.status, page.title) == (403, "Consent declined")
    assert "AADSTS65004" in page.text and "authorize link again" in page.text
    assert services.registry.find(address) is None
