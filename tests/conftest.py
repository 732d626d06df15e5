"""Fixtures shared by the integration tests: the local stack (started once, reused when already running), and
per-test isolation (own queue, containers, tables and mailbox addresses, so tests never see each other's data).
"""

from __future__ import annotations

import base64
import json
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.support import secret_scan
from tests.support.app_host import HostStartError, LocalApp, serve_app
from tests.support.net import https_ok, port_open
from tests.support.stack import Stack
from tests.support.standins import ControlClient, tls_session

ROOT = Path(__file__).resolve().parent.parent

PARTS: dict[str, Callable[[Stack], bool]] = {  # what each part answers on; a test that needs a dead part fails
    "azurite": lambda stack: port_open(stack.ports.queue) and port_open(stack.ports.blob),
    "keyvault": lambda stack: https_ok(f"{stack.key_vault_uri}/_control/health", stack.ca),
    "entra": lambda stack: https_ok(f"{stack.entra_origin}/_control/health", stack.ca),
    "dovecot": lambda stack: port_open(stack.ports.imaps),
}


def pytest_configure(config: pytest.Config) -> None:
    secret_scan.configure(config)


@pytest.fixture(scope="session")
def stack_info() -> Stack:
    """Start the local stack once (a running one is reused). Fails, naming the part, if one cannot start."""
    from devstack import stack

    try:
        return Stack.from_info(stack.start())
    except stack.StackError as e:
        pytest.fail(f"local stack: {e}", pytrace=False)


def dead_parts(stack: Stack) -> list[str]:
    """The parts that do not answer now (each check gives up within a few seconds)."""
    return [name for name, alive in PARTS.items() if not alive(stack)]


@pytest.fixture
def stack(stack_info: Stack) -> Stack:
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
def app_env(stack: Stack) -> dict[str, str]:
    """App settings for this test: the stack's, with this test's own queue, containers and tables."""
    from devstack.stack import isolated_settings

    env = isolated_settings(stack.info, _unique("t"), COLLECT_TIME_BUDGET_SECONDS="120")
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
def entra_session(stack: Stack) -> Iterator[requests.Session]:
    session = tls_session(stack.ca_bundle)
    yield session
    session.close()


@pytest.fixture
def entra_control(stack: Stack, entra_session: requests.Session) -> Iterator[ControlClient]:
    """The Entra stand-in's control API; the faults the test injected are cleared after it."""
    control = ControlClient(stack.entra_origin, stack.ca_bundle, session=entra_session)
    yield control
    control.clear_faults()


@pytest.fixture
def keyvault_control(stack: Stack, entra_session: requests.Session) -> Iterator[ControlClient]:
    """The Key Vault stand-in's control API; the faults the test injected are cleared after it."""
    control = ControlClient(stack.key_vault_uri, stack.ca_bundle, session=entra_session)
    yield control
    control.clear_faults()


@dataclass
class Consented:
    address: str
    signed_in_as: str


@pytest.fixture
def consent(stack: Stack, services: Any, entra_session: requests.Session) -> Callable[..., Consented]:
    """Authorize a mailbox through the real consent flow (start, sign-in pages, callback), without a browser."""
    from tests.support.signin import sign_in

    redirect_uri = f"{stack.host_origin}/api/auth/callback"

    def run(address: str, *, sign_in_as: str | None = None, delegate: str = "", **options: str) -> Consented:
        auth_uri = services.consent.start(address, redirect_uri=redirect_uri, delegate=delegate, options=options)
        fields = sign_in(
            auth_uri,
            login=sign_in_as or delegate or address,
            password=stack.user_password,
            redirect_uri=redirect_uri,
            session=entra_session,
        )
        result = services.consent.complete(fields)
        return Consented(result.address, result.signed_in_as)

    return run


@pytest.fixture
def deliver(stack: Stack) -> Callable[..., None]:
    """Put raw bytes into a user's folder in Dovecot, as the server's own delivery would."""
    from devstack import dovecot

    def run(user: str, raw: bytes, folder: str = "INBOX") -> None:
        dovecot.deliver(Path(stack.dovecot_config), user, raw, folder)

    return run


@pytest.fixture
def consented_with_mail(
    consent: Callable[..., Consented], new_address: Callable[[], str], deliver: Callable[..., None]
) -> Callable[..., list[str]]:
    """Fresh mailboxes, each authorized through the real consent flow, with ``per_mailbox`` messages each."""

    def run(mailboxes: int, *, per_mailbox: int = 0) -> list[str]:
        addresses = [new_address() for _ in range(mailboxes)]
        for address in addresses:
            consent(address)
            for n in range(per_mailbox):
                deliver(address, simple_message(f"{n} for {address}"))
        return addresses

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


def large_message(subject: str, size: int) -> bytes:
    """A mail of about ``size`` bytes: a short text and a base64 attachment of random bytes (a screenshot, a log)."""
    boundary = uuid.uuid4().hex
    encoded = base64.encodebytes(os.urandom(size * 3 // 4)).replace(b"\n", b"\r\n")
    return (
        (
            f"From: Customer <customer@example.org>\r\nTo: support@example.test\r\nSubject: {subject}\r\n"
            f"Message-ID: <{uuid.uuid4().hex}@example.org>\r\nDate: Sun, 29 Nov 2026 10:00:00 +0000\r\n"
            f'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="{boundary}"\r\n\r\n'
            f"--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nThe capture is attached.\r\n"
            f'--{boundary}\r\nContent-Type: image/png; name="capture.png"\r\nContent-Transfer-Encoding: base64\r\n'
            f'Content-Disposition: attachment; filename="capture.png"\r\n\r\n'
        ).encode()
        + encoded
        + f"--{boundary}--\r\n".encode()
    )
