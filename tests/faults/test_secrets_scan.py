"""No secret in logs or pages (DESIGN.md, guarantee 6), checked two ways.

The session-wide scan (tests/support/secret_scan.py) runs in this marker's runs and in scripts/test.sh: the first
test here proves it is wired up as production is. The second drives one mailbox through everything that handles
a secret at DEBUG level (consent over HTTP, a refresh-token renewal and rotation in the host, SASL logins in the
host and in this process) and scans what came out right away, so that a leak fails a test with a name.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import requests

from shared import azure_clients
from shared.mailboxes import mailbox_key
from shared.redaction import RedactingFilter
from tests.conftest import simple_message
from tests.support import secret_scan
from tests.support.app_host import serve_app
from tests.support.secret_scan import find_leaks, secrets_in_token_cache
from tests.support.signin import sign_in
from tests.support.stack import Stack

pytestmark = [pytest.mark.integration, pytest.mark.faults]

RENEW_SOON = 60  # seconds left on the stored access token: inside the renewal margin, so the next run renews


def test_the_session_scan_is_on_with_the_apps_redaction_filter(request: pytest.FixtureRequest) -> None:
    scan = secret_scan.active()
    if not secret_scan.enabled(request.config):
        pytest.skip("the session scan runs with -m faults or SECRET_SCAN=1")
    assert scan is not None
    root = logging.getLogger()
    assert root.level <= logging.DEBUG
    handlers = [h for h in root.handlers if getattr(h, "baseFilename", None) == str(scan.log_path)]
    assert len(handlers) == 1 and handlers[0].level == logging.DEBUG
    assert any(isinstance(f, RedactingFilter) for f in handlers[0].filters)
    assert os.environ["TEST_HOST_LOG_LEVEL"] == "DEBUG"


def _expire_soon(services: Any, address: str) -> None:
    """Move the stored access token close to its expiry, so that the next collection renews it."""
    store = services.tokens._store
    cache = json.loads(store.load(address).serialized)
    for entry in cache["AccessToken"].values():
        entry["expires_on"] = str(int(time.time()) + RENEW_SOON)
    store.save(address, json.dumps(cache))
    # Two days old as far as the app can tell: the renewal's rotated refresh token is due to be written.
    vault = f"{services.settings.key_vault_uri}/_control/age"
    requests.post(vault, json={"name": mailbox_key(address), "seconds": 2 * 86400}, verify=services.settings.ca_bundle,
                  timeout=10).raise_for_status()  # fmt: skip


def _every_token_ever_stored(services: Any, address: str) -> dict[str, str]:
    client = azure_clients.secret_client(services.settings)
    found: dict[str, str] = {}
    for version in client.list_properties_of_secret_versions(mailbox_key(address)):
        if not version.enabled:  # the app disables each replaced version; the scan reads them all the same
            client.update_secret_properties(mailbox_key(address), version.version, enabled=True)
        value = client.get_secret(mailbox_key(address), version.version).value or ""
        found.update(secrets_in_token_cache(value, [address]))
    return found


def test_consent_renewal_rotation_and_logins_at_debug_leave_no_secret_anywhere(
    stack: Stack,
    app_env: dict[str, str],
    services: Any,
    new_address: Any,
    deliver: Any,
    queue_messages: Any,
    entra_session: requests.Session,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    from shared import redaction

    caplog.set_level(logging.DEBUG)
    redaction.install()  # as function_app.py does at import: the filter sits in front of every handler
    monkeypatch.setenv("TEST_HOST_LOG_LEVEL", "DEBUG")
    address = new_address()
    pages: list[tuple[str, str]] = []
    http = requests.Session()
    http.trust_env = False
    with serve_app(app_env, tmp_path / "host") as app:
        start = http.get(
            f"{app.origin}/api/mailboxes/{quote(address)}/authorize", params={"code": app.key}, allow_redirects=False
        )
        assert start.status_code == 302
        fields = sign_in(
            start.headers["Location"],
            login=address,
            password=stack.user_password,
            redirect_uri=app.callback,
            session=entra_session,
        )
        done = http.post(app.callback, data=fields)
        pages.append(("consent page", done.text))
        assert done.status_code == 200, done.text
        pages.append(("replayed consent page", http.post(app.callback, data=fields).text))

        _expire_soon(services, address)
        deliver(address, simple_message("collected by the host"))
        fired = http.post(
            f"{app.origin}/admin/functions/collect_mail",
            json={"input": ""},
            headers={"x-functions-key": app.master_key},
        )
        assert fired.status_code == 202
        envelopes: list[dict[str, Any]] = []
        deadline = time.monotonic() + 90
        while not envelopes and time.monotonic() < deadline:
            time.sleep(0.5)
            envelopes = queue_messages()
        assert [e["subject"] for e in envelopes] == ["collected by the host"]
        pages.append(("mailbox status", http.get(f"{app.origin}/api/mailboxes", params={"code": app.key}).text))
    host_log = app.log.read_text(encoding="utf-8", errors="replace")

    deliver(address, simple_message("collected here"))
    caplog.set_level(logging.DEBUG, logger="imapclient")  # here the wire trace is on: the SASL login is in it
    result = services.collector.collect_mailbox(services.registry.get(address), deadline=time.monotonic() + 60)
    assert (result.outcome, result.messages) == ("ok", 1)

    tokens = _every_token_ever_stored(services, address)
    refresh_tokens = [t for t, kind in tokens.items() if kind == "refresh token"]
    assert len(refresh_tokens) >= 2, "the host did not renew (and rotate) the refresh token"
    secrets = {
        **tokens,
        fields["code"]: "authorization code",
        stack.client_secret: "client secret",
        stack.user_password: "user password",
        app.key: "function key",
        app.master_key: "master key",
    }
    # function_app keeps imapclient above DEBUG, so mail content (and the IMAP wire trace) stays out of its logs.
    assert "collected by the host" not in host_log
    assert "token cache saved" in host_log and "msal" in host_log
    process_log = "\n".join(caplog.text.splitlines())
    # The wire trace was on for the login: its answer is in the log. The SASL initial response itself goes out in
    # one write of its own (SASL-IR) that the trace never sees; the scan below covers every line that was traced.
    assert "Connected to host" in process_log and "OK [CAPABILITY" in process_log
    leaks = find_leaks([("host log", host_log), ("pytest process log", process_log), *pages], secrets)
    assert leaks == [], "\n".join(map(str, leaks))
