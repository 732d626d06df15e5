"""The storage clients' transport reads the environment once when it holds nothing for requests but a CA bundle, and
honours it as before when it does (a proxy, a .netrc; a CA bundle is given to the transport once)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from shared import azure_clients
from tests.support.fakes import settings

AZURITE = (
    "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=a2V5;"
    "QueueEndpoint=http://127.0.0.1:1/devstoreaccount1;BlobEndpoint=http://127.0.0.1:1/devstoreaccount1"
)


@pytest.fixture
def bare(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An environment with nothing for requests, and a home of this test's own."""
    import os

    for name in list(os.environ):
        if name.lower().endswith("_proxy") or name.lower() in ("requests_ca_bundle", "curl_ca_bundle", "netrc"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def _trusts_environment() -> bool:
    transport: Any = azure_clients._PooledTransport()
    transport.open()
    try:
        return bool(transport.session.trust_env)
    finally:
        transport.close()


def _verifies_with(trust_env: bool) -> object:
    """What requests verifies a call of the pooled transport with: the transport's own setting merged with the
    environment as requests does when ``trust_env``."""
    transport: Any = azure_clients._PooledTransport()
    transport.open()
    try:
        transport.session.trust_env = trust_env
        url = "https://account.queue.core.windows.net/work"
        merged = transport.session.merge_environment_settings(url, {}, None, transport.connection_config.verify, None)
        return merged["verify"]
    finally:
        transport.close()


def test_with_nothing_in_the_environment_requests_does_not_look_for_it_at_each_call(bare: Path) -> None:
    assert azure_clients.environment_unused()
    assert not _trusts_environment()
    assert _verifies_with(trust_env=False) is True  # the default bundle


@pytest.mark.parametrize(
    "name, value",
    [
        ("HTTPS_PROXY", "http://proxy.contoso.example:3128"),
        ("https_proxy", "http://proxy.contoso.example:3128"),
        ("NO_PROXY", "localhost"),
        ("NETRC", "/nonexistent/.netrc"),
    ],
)
def test_a_proxy_or_netrc_variable_is_honoured(
    bare: Path, monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    assert _trusts_environment()


@pytest.mark.parametrize(
    "variables, expected",
    [
        ({"REQUESTS_CA_BUNDLE": "/etc/ssl/a.pem"}, "/etc/ssl/a.pem"),
        ({"CURL_CA_BUNDLE": "/etc/ssl/c.pem"}, "/etc/ssl/c.pem"),
        ({"REQUESTS_CA_BUNDLE": "/etc/ssl/a.pem", "CURL_CA_BUNDLE": "/etc/ssl/c.pem"}, "/etc/ssl/a.pem"),
        ({"REQUESTS_CA_BUNDLE": "", "CURL_CA_BUNDLE": "/etc/ssl/c.pem"}, "/etc/ssl/c.pem"),
        ({"REQUESTS_CA_BUNDLE": ""}, True),
    ],
)
def test_a_ca_bundle_variable_is_honoured_without_reading_the_environment_at_each_call(
    bare: Path, monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], expected: object
) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert not _trusts_environment()
    # The bundle each call verifies with is the one requests reading the environment at each call would have used.
    assert _verifies_with(trust_env=False) == expected
    assert _verifies_with(trust_env=True) == expected


def test_a_ca_bundle_variable_and_a_proxy_keep_the_environment_on(bare: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/a.pem")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.contoso.example:3128")
    assert _trusts_environment()
    assert _verifies_with(trust_env=True) == "/etc/ssl/a.pem"


def test_a_netrc_file_is_honoured(bare: Path) -> None:
    (bare / ".netrc").write_text("machine proxy.contoso.example login x password y\n")
    assert _trusts_environment()


def test_the_queue_clients_use_the_pooled_transport(bare: Path) -> None:
    client: Any = azure_clients._queue_client(settings(AzureWebJobsStorage=AZURITE), "work")
    assert isinstance(client._client._client._pipeline._transport, azure_clients._PooledTransport)
