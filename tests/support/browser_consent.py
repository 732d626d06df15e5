"""The admin's consent in headless Chromium through the local Functions host: the authorize link with the function
key, the Entra stand-in's sign-in with the stack's password, and the page the app shows at the end, recorded for
the secret scan."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

from devstack.browser import BrowserResult, consent_in_browser
from tests.support.app_host import LocalApp
from tests.support.secret_scan import record_page
from tests.support.stack import Stack


def authorize_link(host: LocalApp, address: str) -> str:
    return f"{host.origin}/api/mailboxes/{quote(address)}/authorize?code={host.key}"


def consent_in_chromium(
    stack: Stack, host: LocalApp, address: str, *, login: str = "", **options: Any
) -> BrowserResult:
    """Authorize ``address``, signing in as ``login`` (default: the address itself); ``options`` go to
    ``devstack.browser.consent_in_browser`` (``accept``, ``screenshot``)."""
    page = consent_in_browser(
        authorize_link(host, address),
        login=login or address,
        password=stack.user_password,
        trust_cert=Path(stack.tls_cert),
        **options,
    )
    record_page("browser consent page", page.text)
    return page
