"""Drive the consent flow in headless Chromium (Debian's package) with Playwright, as an admin would click it."""

from __future__ import annotations

import base64
import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from playwright.sync_api import sync_playwright

# Chromium as root on a machine with no outside network: no sandbox, and none of its background connections.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        raise RuntimeError("Chromium is not installed: run scripts/setup.sh (Debian package 'chromium')")
    return found


def spki_hash(cert_path: Path) -> str:
    """Base64 SHA-256 of a certificate's public key, the form Chromium's SPKI allow-list takes."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    der = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


@dataclass(frozen=True)
class BrowserResult:
    status: int
    title: str
    text: str
    url: str


def consent_in_browser(
    start_url: str,
    *,
    login: str,
    password: str,
    accept: bool = True,
    trust_cert: Path | None = None,
    screenshot: Path | None = None,
    timeout_ms: int = 30_000,
) -> BrowserResult:
    """Open the admin's authorize link, sign in at the identity provider, answer its consent page, and return the
    page the app shows after the form post. ``trust_cert`` is the local stack's server certificate: Chromium
    trusts that one key (by its SPKI hash) and verifies everything else as usual.
    """
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium_path(),
            headless=True,
            args=CHROMIUM_ARGS
            + ([f"--ignore-certificate-errors-spki-list={spki_hash(trust_cert)}"] if trust_cert else []),
        )
        try:
            page = browser.new_context().new_page()
            page.set_default_timeout(timeout_ms)
            last_status = {"value": 0}
            page.on(
                "response",
                lambda r: last_status.__setitem__("value", r.status) if r.request.is_navigation_request() else None,
            )
            page.goto(start_url)
            page.fill("input[name=login]", login)
            page.fill("input[name=password]", password)
            page.get_by_role("button", name="Sign in").click()
            page.wait_for_load_state()
            consent = page.get_by_role("button", name="Accept" if accept else "Cancel")
            if consent.count():
                consent.click()
            page.wait_for_url("**/api/auth/callback*")
            page.wait_for_load_state()
            if screenshot is not None:
                page.screenshot(path=str(screenshot), full_page=True)
            return BrowserResult(last_status["value"], page.title(), page.inner_text("body"), page.url)
        finally:
            browser.close()
