"""The whole consent in headless Chromium through the local Functions host, as an admin does it."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from collectors.imap_session import ImapSession
from devstack.browser import consent_in_browser
from tests.conftest import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.browser]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def host(app_env: dict[str, str], tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The real function_app.py served by the local host, with this test's settings, on a free port."""
    port = _free_port()
    settings = tmp_path / "local.settings.json"
    settings.write_text(json.dumps({"IsEncrypted": False, "Values": app_env}))
    log = (tmp_path / "host.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "devstack.host", "--settings", str(settings), "--port", str(port)],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    origin = f"http://localhost:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{origin}/admin/host/ping", timeout=1).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"local host did not start: {(tmp_path / 'host.log').read_text()[-2000:]}")
            time.sleep(0.2)
    yield {"origin": origin, "key": app_env["LOCAL_FUNCTION_KEY"], "log": tmp_path / "host.log"}
    process.terminate()
    process.wait(timeout=15)


def authorize_link(host: dict[str, Any], address: str) -> str:
    return f"{host['origin']}/api/mailboxes/{quote(address)}/authorize?code={host['key']}"


def test_an_admin_authorizes_a_mailbox_in_chromium_and_its_token_logs_in_to_imap(
    stack: dict[str, Any], host: dict[str, Any], services: Any, new_address: Any, tmp_path: Path
) -> None:
    address = new_address()
    page = consent_in_browser(
        authorize_link(host, address),
        login=address,
        password=stack["user_password"],
        trust_cert=Path(stack["tls_cert"]),
        screenshot=tmp_path / "done.png",
    )
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
    for secret in (token.token, stack["client_secret"]):
        assert secret not in page.text
        assert secret not in host["log"].read_text()


def test_declining_in_chromium_shows_why_and_stores_nothing(
    stack: dict[str, Any], host: dict[str, Any], services: Any, new_address: Any
) -> None:
    address = new_address()
    page = consent_in_browser(
        authorize_link(host, address),
        login=address,
        password=stack["user_password"],
        accept=False,
        trust_cert=Path(stack["tls_cert"]),
    )
    assert (page.status, page.title) == (403, "Consent declined")
    assert "AADSTS65004" in page.text and "authorize link again" in page.text
    assert services.registry.find(address) is None
