"""Fixtures shared by the integration tests: the local stack (started once, reused when already running), and
per-test isolation (own queue, containers, tables and mailbox addresses, so tests never see each other's data).
"""

from __future__ import annotations

import json
import socket
import ssl
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.support import secret_scan
from tests.support.app_host import HostStartError, LocalApp, serve_app

ROOT = Path(__file__).resolve().parent.parent

PARTS = {  # what each stack part answers on; a test that needs a dead part fails naming it
    "azurite": lambda info: _tcp(info["ports"]["queue"]) and _tcp(info["ports"]["blob"]),
    "keyvault": lambda info: _https(f"{info['key_vault_uri']}/_control/health", info["ca"]),
    "entra": lambda info: _https(f"{info['entra_origin']}/_control/health", info["ca"]),
    "dovecot": lambda info: _tcp(info["ports"]["imaps"]),
}


def pytest_configure(config: pytest.Config) -> None:
    secret_scan.configure(config)


def _tcp(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


def _https(url: str, ca: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3, context=ssl.create_default_context(cafile=ca)) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture(scope="session")
def stack_info() -> dict[str, Any]:
    """Start the local stack once (a running one is reused). Fails, naming the part, if one cannot start."""
    from devstack import stack

    try:
        return stack.start()
    except stack.StackError as e:
        pytest.fail(f"local stack: {e}", pytrace=False)


def dead_parts(info: dict[str, Any]) -> list[str]:
    """The parts that do not answer now (each check gives up within a few seconds)."""
    return [name for name, alive in PARTS.items() if not alive(info)]


@pytest.fixture
def stack(stack_info: dict[str, Any]) -> dict[str, Any]:
    """The stack, checked alive before each test so that a killed part fails fast with its name."""
    dead = dead_parts(stack_info)
    if dead:
        pytest.fail(
            f"local stack part(s) not answering: {', '.join(dead)} -- restart with `python -m devstack start`",
            pytrace=False,
        )
    return stack_info


def _unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


@pytest.fixture
def app_env(stack: dict[str, Any]) -> dict[str, str]:
    """App settings for this test: the stack's, with this test's own queue, containers and tables."""
    from devstack.stack import isolated_settings

    env = isolated_settings(stack, _unique("t"), COLLECT_TIME_BUDGET_SECONDS="120")
    return env


@pytest.fixture
def settings(app_env: dict[str, str]) -> Any:
    from shared.settings import load_settings

    return load_settings(app_env)


@pytest.fixture
def services(settings: Any) -> Any:
    from collectors.services import build_services

    return build_services(settings)


@pytest.fixture
def local_host(app_env: dict[str, str], tmp_path: Path) -> Iterator[LocalApp]:
    """The real function_app.py served by the local Functions host, with this test's settings, on a free port."""
    try:
        with serve_app(app_env, tmp_path / "host") as app:
            yield app
    except HostStartError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture
def new_address() -> Callable[[], str]:
    """Fresh mailbox addresses: each one is a new Dovecot user and a new Entra stand-in account."""
    return lambda: f"{_unique('user-')}@example.test"


@pytest.fixture
def entra_session(stack: dict[str, Any]) -> Iterator[requests.Session]:
    session = requests.Session()
    session.trust_env = False
    session.verify = stack["ca_bundle"]
    yield session
    session.close()


def _control_api(session: requests.Session, origin: str) -> Iterator[Callable[..., Any]]:
    """Call a stand-in's control API (``/_control/...``); injected faults are cleared after the test."""

    def call(path: str, body: dict[str, Any] | None = None, method: str = "POST") -> Any:
        r = session.request(method, f"{origin}/_control/{path}", json=body, timeout=10)
        r.raise_for_status()
        return r.json() if r.content else None

    yield call
    call("faults", method="DELETE")


@pytest.fixture
def entra_control(stack: dict[str, Any], entra_session: requests.Session) -> Iterator[Callable[..., Any]]:
    yield from _control_api(entra_session, stack["entra_origin"])


@pytest.fixture
def keyvault_control(stack: dict[str, Any], entra_session: requests.Session) -> Iterator[Callable[..., Any]]:
    yield from _control_api(entra_session, stack["key_vault_uri"])


@dataclass
class Consented:
    address: str
    signed_in_as: str


@pytest.fixture
def consent(stack: dict[str, Any], services: Any, entra_session: requests.Session) -> Callable[..., Consented]:
    """Authorize a mailbox through the real consent flow (start, sign-in pages, callback), without a browser."""
    from tests.support.signin import sign_in

    redirect_uri = f"{stack['host_origin']}/api/auth/callback"

    def run(address: str, *, sign_in_as: str | None = None, delegate: str = "", **options: str) -> Consented:
        auth_uri = services.consent.start(address, redirect_uri=redirect_uri, delegate=delegate, options=options)
        fields = sign_in(
            auth_uri,
            login=sign_in_as or delegate or address,
            password=stack["user_password"],
            redirect_uri=redirect_uri,
            session=entra_session,
        )
        result = services.consent.complete(fields)
        return Consented(result.address, result.signed_in_as)

    return run


@pytest.fixture
def deliver(stack: dict[str, Any]) -> Callable[..., None]:
    """Put raw bytes into a user's folder in Dovecot, as the server's own delivery would."""
    from devstack import dovecot

    def run(user: str, raw: bytes, folder: str = "INBOX") -> None:
        dovecot.deliver(Path(stack["dovecot_config"]), user, raw, folder)

    return run


@pytest.fixture
def queue_messages(services: Any) -> Callable[[], list[dict[str, Any]]]:
    """Every envelope on this test's mail queue (peeked through a base64-decoding client, then drained)."""

    def read() -> list[dict[str, Any]]:
        from shared import azure_clients

        q = azure_clients.queue(services.settings, services.settings.mail_queue)
        found = []
        while True:
            batch = list(q.receive_messages(messages_per_page=32, visibility_timeout=300, max_messages=32))
            if not batch:
                return found
            for m in batch:
                found.append(json.loads(m.content))

    return read


def simple_message(subject: str, body: str = "hello", *, sender: str = "customer@example.org") -> bytes:
    return (
        f"From: Customer <{sender}>\r\nTo: support@example.test\r\nSubject: {subject}\r\n"
        f"Message-ID: <{uuid.uuid4().hex}@example.org>\r\nDate: Sun, 29 Nov 2026 10:00:00 +0000\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        f"{body}\r\n"
    ).encode()
