"""The status page and the owner's re-consent link through the local Functions host: in headless Chromium as an
admin and a mailbox owner use them, and over plain HTTP with hostile requests."""

from __future__ import annotations

import dataclasses
import os
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import requests
from playwright.sync_api import Page, sync_playwright

from api.operations import SESSION_COOKIE, reconsent_url
from collectors.operations import RECONSENT_PURPOSE
from devstack.browser import CHROMIUM_ARGS, chromium_path, spki_hash
from shared.registry import MailboxStatus
from tests.conftest import simple_message
from tests.support.app_host import LocalApp
from tests.support.secret_scan import record_page
from tests.support.stack import Stack

pytestmark = [pytest.mark.integration, pytest.mark.browser]


@pytest.fixture
def app_env(app_env: dict[str, str]) -> dict[str, str]:
    """The host's timer stays quiet during these tests (once a year): the page's own actions are what is tested."""
    return {**app_env, "COLLECT_SCHEDULE": "0 0 0 1 1 *"}


def _row(page: Page, address: str) -> Any:
    return page.locator("tr", has_text=address)


def _click(page: Page, address: str, label: str) -> None:
    _row(page, address).get_by_role("button", name=label).click()
    page.wait_for_load_state()


def _no_secret_in(page: Page, secrets: list[str]) -> None:
    html = page.content()
    targets = page.eval_on_selector_all(
        "a[href], form[action]", "els => els.map(e => e.getAttribute('href') || e.getAttribute('action'))"
    )
    assert targets, "the page has links or forms to check"
    for secret in secrets:
        assert secret not in html
        assert not [t for t in targets if secret in t]


def _sign_in_at_entra(page: Page, login: str, password: str) -> None:
    page.fill("input[name=login]", login)
    page.fill("input[name=password]", password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_load_state()
    consent = page.get_by_role("button", name="Accept")
    if consent.count():
        consent.click()
    page.wait_for_url("**/api/auth/callback*")
    page.wait_for_load_state()


def test_an_admin_uses_the_status_page_in_chromium_and_an_owner_re_consents_with_the_link_once(
    stack: Stack,
    local_host: LocalApp,
    services: Any,
    consented_with_mail: Any,
    queue_messages: Any,
    tmp_path: Path,
) -> None:
    [busy] = consented_with_mail(1, per_mailbox=3)
    broken, quiet = consented_with_mail(2)
    row = services.registry.get(broken)
    services.registry.put(
        dataclasses.replace(
            row,
            status=MailboxStatus.NEEDS_RECONSENT,
            consecutive_failures=3,
            last_error_class="needs_reconsent",
            last_error="the grant was revoked (AADSTS50173) -- open the mailbox's re-consent link and sign in again",
        )
    )
    secrets = [local_host.key, local_host.master_key, stack.client_secret]
    secrets += [services.tokens.access_token(a, signed_in_as=a).token for a in (busy, quiet)]

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium_path(),
            headless=True,
            args=[*CHROMIUM_ARGS, f"--ignore-certificate-errors-spki-list={spki_hash(Path(stack.tls_cert))}"],
        )
        try:
            admin = browser.new_context(viewport={"width": 1500, "height": 900}).new_page()
            admin.set_default_timeout(30_000)
            admin.goto(f"{local_host.origin}/api/status?code={local_host.key}")
            assert admin.url == f"{local_host.origin}/api/ops"  # the key left the address bar
            assert admin.title() == "Mail collector status"
            for address in (busy, broken, quiet):
                assert _row(admin, address).count() == 1
            _no_secret_in(admin, secrets)

            # Filter (a GET form, no script).
            admin.select_option("select[name=status]", "needs_reconsent")
            admin.get_by_role("button", name="Filter").click()
            admin.wait_for_load_state()
            assert _row(admin, broken).count() == 1 and _row(admin, busy).count() == 0
            assert "AADSTS50173" in _row(admin, broken).inner_text()
            assert "Remedy:" in _row(admin, broken).inner_text()
            admin.goto(f"{local_host.origin}/api/ops?q={quote(busy.split('@')[0])}")
            assert _row(admin, busy).count() == 1 and _row(admin, quiet).count() == 0

            _click(admin, busy, "Collect now")
            assert f"{busy}: ok, 3 messages collected" in admin.inner_text("#notice")
            assert len(queue_messages()) == 3
            assert re.search(r"\b3\b", _row(admin, busy).locator("td").nth(8).inner_text())

            _click(admin, quiet, "Pause")
            assert services.registry.get(quiet).status == "paused"
            assert _row(admin, quiet).locator("td").nth(2).inner_text() == "paused"
            _click(admin, quiet, "Resume")
            assert services.registry.get(quiet).status == "active"

            _click(admin, quiet, "Test connection")
            assert f"The connection to {quiet} works" in admin.inner_text("#notice")
            _click(admin, quiet, "Diagnose")
            diagnosis = admin.inner_text("#notice")
            assert f"Token for {quiet}" in diagnosis and "Folder INBOX <- collected" in diagnosis
            _no_secret_in(admin, secrets)
            admin.goto(f"{local_host.origin}/api/ops")
            _click(admin, busy, "Diagnose")
            admin.screenshot(path=str(tmp_path / "status.png"), full_page=True)
            if os.environ.get("STATUS_PAGE_SCREENSHOT"):
                admin.screenshot(path=os.environ["STATUS_PAGE_SCREENSHOT"], full_page=True)

            _click(admin, broken, "Re-consent link")
            link = admin.inner_text("#reconsent-link")
            assert link.startswith(f"{local_host.origin}/api/reconsent?link=")
            record_page("status page", admin.content())

            # The owner: another browser, no session, no key.
            owner = browser.new_context().new_page()
            owner.set_default_timeout(30_000)
            owner.goto(link)
            assert owner.title() == "Authorize the mailbox again" and broken in owner.inner_text("body")
            owner.get_by_role("button", name="Continue to sign in").click()
            owner.wait_for_load_state()
            _sign_in_at_entra(owner, broken, stack.user_password)
            assert owner.title() == "Mailbox authorized" and "re-authorized" in owner.inner_text("body")
            assert services.registry.get(broken).status == "active"
            owner.goto(link)  # a second time: used up
            assert owner.title() == "This link cannot be used" and "already used" in owner.inner_text("body")

            _click(admin, quiet, "Revoke...")
            assert admin.title() == "Revoke a mailbox" and f"Revoke {quiet}?" in admin.inner_text("h1")
            assert services.registry.find(quiet) is not None
            admin.get_by_role("button", name="Yes, revoke it").click()
            admin.wait_for_load_state()
            assert f"{quiet} is revoked." in admin.inner_text("#notice")
            assert services.registry.find(quiet) is None
        finally:
            browser.close()


@pytest.fixture
def page_session(local_host: LocalApp) -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    answer = session.get(f"{local_host.origin}/api/status", params={"code": local_host.key}, timeout=30)
    assert answer.url == f"{local_host.origin}/api/ops" and answer.status_code == 200
    assert SESSION_COOKIE in session.cookies
    return session


def _csrf(html: str) -> str:
    found = re.search(r"name=csrf value='([^']+)'", html)
    assert found
    return found.group(1)


def test_the_page_refuses_requests_without_session_csrf_or_from_elsewhere(
    local_host: LocalApp, services: Any, consent: Any, new_address: Any, page_session: requests.Session
) -> None:
    address = new_address()
    consent(address)
    ops = f"{local_host.origin}/api/ops"
    page = page_session.get(ops, timeout=30)
    for name, value in {**{k.lower(): v for k, v in page.headers.items()}}.items():
        if name == "content-security-policy":
            assert "default-src 'none'" in value and "form-action 'self'" in value
    assert page.headers["X-Frame-Options"] == "DENY" and page.headers["Cache-Control"] == "no-store"
    csrf = _csrf(page.text)
    pause = {"csrf": csrf, "mailbox": address, "action": "pause"}

    anonymous = requests.Session()
    anonymous.trust_env = False
    assert anonymous.get(ops, timeout=30).status_code == 401
    assert anonymous.post(ops, data=pause, timeout=30).status_code == 401
    assert requests.get(f"{local_host.origin}/api/status", timeout=30, allow_redirects=False).status_code == 401
    forged = anonymous.get(ops, cookies={SESSION_COOKIE: page_session.cookies[SESSION_COOKIE][:-3] + "AAA"}, timeout=30)
    assert forged.status_code == 401

    for hostile in (
        {**pause, "csrf": ""},
        {**pause, "csrf": csrf[:-2] + "xx"},
        {"mailbox": address, "action": "pause"},
    ):
        assert page_session.post(ops, data=hostile, timeout=30).status_code == 403
    assert page_session.post(ops, data=pause, headers={"Origin": "https://evil.example"}, timeout=30).status_code == 403
    assert page_session.post(ops, data={**pause, "action": "drop-table"}, timeout=30).status_code == 400
    assert page_session.post(ops, data={**pause, "mailbox": "x\r\ny"}, timeout=30).status_code == 400
    assert page_session.post(ops, data=b"csrf=" + b"a" * 10_000, timeout=30).status_code == 400
    assert services.registry.get(address).status == "active"  # none of them did anything

    assert page_session.post(ops, data=pause, timeout=30).status_code == 200
    assert services.registry.get(address).status == "paused"
    # A revoke needs its confirmation: the first post only asks.
    revoke = {**pause, "action": "revoke"}
    assert "Yes, revoke it" in page_session.post(ops, data=revoke, timeout=30).text
    assert services.registry.find(address) is not None
    assert page_session.post(ops, data={**revoke, "confirm": "someone@else.test"}, timeout=30).status_code == 200
    assert services.registry.find(address) is not None
    page_session.post(ops, data={**revoke, "confirm": address}, timeout=30)
    assert services.registry.find(address) is None


def test_a_re_consent_link_is_refused_when_changed_expired_used_or_for_another_mode(
    local_host: LocalApp, services: Any, consent: Any, new_address: Any, stack: Stack
) -> None:
    address = new_address()
    consent(address)
    session = requests.Session()
    session.trust_env = False
    admin_answer = session.get(
        f"{local_host.origin}/api/mailboxes/{quote(address)}", params={"code": local_host.key}, timeout=30
    ).json()
    link = admin_answer["reconsent_link"]
    assert link.startswith(f"{local_host.origin}/api/reconsent?link=") and admin_answer["reconsent_link_expires_at"]
    assert local_host.key not in link
    value = link.split("link=", 1)[1]

    def opened(text: str) -> requests.Response:
        return session.get(f"{local_host.origin}/api/reconsent", params={"link": text}, timeout=30)

    def used(text: str) -> requests.Response:
        return session.post(
            f"{local_host.origin}/api/reconsent", data={"link": text}, timeout=30, allow_redirects=False
        )

    assert opened(requests.utils.unquote(value)).status_code == 200
    assert opened(requests.utils.unquote(value)).status_code == 200  # looking at it does not use it
    first = used(requests.utils.unquote(value))
    assert first.status_code == 303 and first.headers["Location"].startswith(stack.entra_origin)
    second = used(requests.utils.unquote(value))
    assert second.status_code == 410 and "already used" in second.text

    fresh, _ = services.signer.sign(RECONSENT_PURPOSE, address, ttl=timedelta(days=1), mode="delegated")
    body, mac = fresh.split(".")
    other, _ = services.signer.sign(RECONSENT_PURPOSE, "someone@example.test", ttl=timedelta(days=1), mode="delegated")
    expired, _ = services.signer.sign(RECONSENT_PURPOSE, address, ttl=timedelta(seconds=-1), mode="delegated")
    app_mode, _ = services.signer.sign(RECONSENT_PURPOSE, address, ttl=timedelta(days=1), mode="app")
    session_value, _ = services.signer.sign("ops-session", address, ttl=timedelta(days=1))
    for hostile, reason in (
        (f"{other.split('.')[0]}.{mac}", "signature"),
        (f"{body}.{mac[:-2]}AA", "signature"),
        (expired, "expired"),
        (app_mode, "mode"),
        (session_value, "something else"),
        (other, "no longer registered"),
        ("", "incomplete"),
        ("a" * 3000, "incomplete"),
        ("..", "incomplete"),
    ):
        for answer in (opened(hostile), used(hostile)):
            assert answer.status_code == 410, hostile[:40]
            assert reason in answer.text
    assert used(fresh).status_code == 303  # the good one still works


def test_admin_routes_pause_resume_diagnose_and_replay_over_http(
    local_host: LocalApp, services: Any, consent: Any, new_address: Any, deliver: Any, queue_messages: Any
) -> None:
    address = new_address()
    consent(address)
    deliver(address, simple_message("replayed over http"))
    services.collector.run()
    envelope = queue_messages()[0]
    base = f"{local_host.origin}/api/mailboxes/{quote(address)}"
    key = {"code": local_host.key}

    assert requests.post(f"{base}/pause", params=key, timeout=30).json()["status"] == "paused"
    assert requests.post(f"{base}/resume", params=key, timeout=30).json()["status"] == "active"
    assert requests.post(f"{base}/resume", timeout=30).status_code == 401
    report = requests.get(f"{base}/diagnose", params=key, timeout=60).json()
    assert report["ok"] and report["token"]["who"] == address and report["pending"] == 0
    since = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    replayed = requests.post(f"{base}/replay", params=key, json={"since": since}, timeout=60).json()
    assert replayed["ids"] == [envelope["id"]]
    assert [e["id"] for e in queue_messages()] == [envelope["id"]]
    for hostile in ({}, {"since": "yesterday"}, {"ids": "x"}, {"ids": ["../x"]}, {"since": since, "queue": "A;B"},
                    {"since": since, "extra": 1}, [1], {"since": "2026-01-01T00:00:00"}):  # fmt: skip
        answer = requests.post(f"{base}/replay", params=key, json=hostile, timeout=30)
        assert answer.status_code == 400, hostile
    assert requests.post(f"{base}/replay", params=key, data=b"{" * 100_000, timeout=30).status_code in (400, 413)
    unknown = f"{local_host.origin}/api/mailboxes/nobody%40example.test"
    assert requests.get(f"{unknown}/diagnose", params=key, timeout=30).status_code == 404
    assert requests.post(f"{base}/reconsent-link", params={**key, "days": "99"}, timeout=30).status_code == 400
    assert reconsent_url("https://x", "a.b") == "https://x/api/reconsent?link=a.b"


def test_the_filter_escapes_what_it_is_sent_and_ignores_unknown_statuses(
    local_host: LocalApp, consent: Any, new_address: Any, page_session: requests.Session
) -> None:
    address = new_address()
    consent(address)
    ops = f"{local_host.origin}/api/ops"
    for q in ("<script>alert(1)</script>", "'><img src=x onerror=alert(1)>", "\u202e" + "x" * 500, "%00"):
        answer = page_session.get(ops, params={"q": q, "status": "active"}, timeout=30)
        assert answer.status_code == 200
        assert "<script>" not in answer.text and "<img" not in answer.text
        assert "No mailbox matches." in answer.text
    shown = page_session.get(ops, params={"status": "'); drop", "q": address}, timeout=30)
    assert shown.status_code == 200 and address in shown.text  # an unknown status filters nothing
    assert "selected>any status" in shown.text


def test_app_service_authentication_opens_the_page_only_where_the_platform_vouches(
    app_env: dict[str, str], tmp_path: Path, consent: Any, new_address: Any
) -> None:
    from tests.support.app_host import serve_app

    address = new_address()
    consent(address)
    principal = {"X-MS-CLIENT-PRINCIPAL-NAME": "admin@contoso.example"}
    with serve_app({**app_env, "WEBSITE_AUTH_ENABLED": "true"}, tmp_path / "easyauth") as app:
        session = requests.Session()
        session.trust_env = False
        page = session.get(f"{app.origin}/api/ops", headers=principal, timeout=30)
        assert page.status_code == 200 and "Signed in: admin@contoso.example" in page.text
        assert SESSION_COOKIE in session.cookies and address in page.text
    with serve_app(app_env, tmp_path / "plain") as app:  # without the platform, the header proves nothing
        assert requests.get(f"{app.origin}/api/ops", headers=principal, timeout=30).status_code == 401


def test_records_of_used_links_are_purged_once_the_links_have_expired(
    services: Any, consent: Any, new_address: Any
) -> None:
    from shared import azure_clients
    from shared.signed_links import USED_PARTITION

    address = new_address()
    consent(address)
    table = azure_clients.table(services.settings, services.settings.consent_table)
    table.create_entity(
        {"PartitionKey": USED_PARTITION, "RowKey": "old", "expires_at": datetime.now(UTC) - timedelta(days=1)}
    )
    value, signed = services.signer.sign(RECONSENT_PURPOSE, address, ttl=timedelta(days=1), mode="delegated")
    services.signer.redeem(value, RECONSENT_PURPOSE)
    left = {e["RowKey"] for e in table.query_entities(f"PartitionKey eq '{USED_PARTITION}'")}
    assert left == {signed.nonce}  # the fresh record stays: it still refuses a second use
