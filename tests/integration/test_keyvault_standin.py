"""The Key Vault stand-in, driven by the unmodified SecretClient over TLS with a CA made for the test."""

from __future__ import annotations

import base64
import datetime
import json
import logging
import os
import ssl
import stat
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from azure.core.credentials import AccessToken
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
)
from azure.keyvault.secrets import SecretClient
from azure.keyvault.secrets._shared import http_challenge_cache

from devstack.certs import ensure_certificates
from devstack.keyvault import KeyVaultServer, control, serve

pytestmark = pytest.mark.integration

TENANT = "5f1c8a3e-0b7d-4c52-9a61-2d8e4f7b9c10"
VALUE = "cache-value-that-must-never-reach-a-log"
OFFICER = "0f7c2d7e-0000-4000-8000-00000000a11c"


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A CA and a server certificate for 127.0.0.1 and localhost, as PEM files (made as the local stack makes them)."""
    paths = ensure_certificates(tmp_path_factory.mktemp("kv-tls"))
    return {"ca": str(paths["ca"]), "cert": str(paths["cert"]), "key": str(paths["key"])}


@pytest.fixture
def server(tls: dict[str, str]) -> Iterator[KeyVaultServer]:
    kv, thread = serve("127.0.0.1", 0, tls["cert"], tls["key"], tenant=TENANT)
    yield kv
    kv.stop()
    thread.join(timeout=5)


def _jwt(claims: dict[str, Any]) -> str:
    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256', 'typ': 'JWT'})}.{part(claims)}.c2lnbmF0dXJl"


class FakeCredential:
    """Hands out an unsigned JWT for Key Vault and records what the challenge policy asked for."""

    def __init__(self, audience: str = "https://vault.azure.net", oid: str = OFFICER) -> None:
        self.audience = audience
        self.oid = oid
        self.requests: list[tuple[tuple[str, ...], str | None]] = []

    def get_token(self, *scopes: str, tenant_id: str | None = None, **_: Any) -> AccessToken:
        self.requests.append((scopes, tenant_id))
        expires = int(time.time()) + 3600
        token = _jwt({"aud": self.audience, "tid": tenant_id or TENANT, "exp": expires, "oid": self.oid})
        return AccessToken(token, expires)


def _client(
    server: KeyVaultServer, tls: dict[str, str], credential: FakeCredential | None = None, **options: Any
) -> SecretClient:
    return SecretClient(
        server.url,
        credential or FakeCredential(),  # type: ignore[arg-type]
        verify_challenge_resource=False,
        connection_verify=tls["ca"],
        **options,
    )


@pytest.fixture
def client(server: KeyVaultServer, tls: dict[str, str]) -> SecretClient:
    return _client(server, tls)


def _stats(server: KeyVaultServer, tls: dict[str, str]) -> dict[str, Any]:
    return control(server.url, "GET", "stats", cafile=tls["ca"])


def _raw(server: KeyVaultServer, tls: dict[str, str], method: str, path: str, token: str | None = None) -> Any:
    """One request with the standard library, so that no SDK policy stands between the test and the server."""
    request = urllib.request.Request(f"{server.url}{path}", method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, context=ssl.create_default_context(cafile=tls["ca"])) as response:
            return response.status, dict(response.headers), json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read() or b"null")


# ------------------------------------------------------------------------------------------------- tests


def test_unauthenticated_request_gets_the_bearer_challenge(server: KeyVaultServer, tls: dict[str, str]) -> None:
    status, headers, body = _raw(server, tls, "GET", "/secrets/anything/?api-version=7.6")

    assert status == 401
    assert headers["WWW-Authenticate"] == (
        f'Bearer authorization="https://login.microsoftonline.com/{TENANT}", resource="https://vault.azure.net"'
    )
    assert body["error"]["code"] == "Unauthorized"
    assert _stats(server, tls)["challenges"] == 1
    assert _stats(server, tls)["reads"] == 0


def test_client_answers_the_challenge_with_a_token_for_the_vault_tenant(
    server: KeyVaultServer, tls: dict[str, str]
) -> None:
    # The SDK caches challenges per vault origin, process-wide; a port reused from an earlier test would skip it.
    http_challenge_cache.clear()
    credential = FakeCredential()
    client = _client(server, tls, credential)

    client.set_secret("first", VALUE)

    assert credential.requests == [(("https://vault.azure.net/.default",), TENANT)]
    stats = _stats(server, tls)
    assert stats["challenges"] == 1
    assert (stats["reads"], stats["writes"]) == (0, 1)


def test_without_a_tenant_the_challenge_names_none(tls: dict[str, str]) -> None:
    kv, thread = serve("127.0.0.1", 0, tls["cert"], tls["key"])
    try:
        http_challenge_cache.clear()
        credential = FakeCredential()
        _client(kv, tls, credential).set_secret("first", VALUE)
        assert credential.requests == [(("https://vault.azure.net/.default",), None)]
    finally:
        kv.stop()
        thread.join(timeout=5)


def test_token_for_another_audience_is_refused(server: KeyVaultServer, tls: dict[str, str]) -> None:
    client = _client(server, tls, FakeCredential(audience="https://storage.azure.com"))

    with pytest.raises(ClientAuthenticationError):
        client.get_secret("first")

    status, _, body = _raw(server, tls, "GET", "/secrets?api-version=7.6", token="opaque-token")
    assert status == 200 and body == {"value": [], "nextLink": None}


def test_set_get_versions_tags_and_content_type(client: SecretClient) -> None:
    first = client.set_secret("mailbox-a", "v1", content_type="application/json", tags={"mailbox": "a@x.test"})
    second = client.set_secret("mailbox-a", "v2", tags={"mailbox": "a@x.test", "round": "2"})

    assert first.properties.version != second.properties.version
    assert len(second.properties.version or "") == 32
    assert second.id == f"{client.vault_url}/secrets/mailbox-a/{second.properties.version}"
    latest = client.get_secret("mailbox-a")
    assert (latest.value, latest.properties.version) == ("v2", second.properties.version)
    assert latest.properties.tags == {"mailbox": "a@x.test", "round": "2"}
    assert latest.properties.content_type is None
    assert latest.properties.enabled is True
    assert latest.properties.recovery_level == "Recoverable+Purgeable"
    assert isinstance(latest.properties.created_on, datetime.datetime)

    old = client.get_secret("mailbox-a", first.properties.version)
    assert (old.value, old.properties.content_type) == ("v1", "application/json")
    versions = {p.version for p in client.list_properties_of_secret_versions("mailbox-a")}
    assert versions == {first.properties.version, second.properties.version}

    expires = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
    updated = client.update_secret_properties("mailbox-a", content_type="text/plain", expires_on=expires)
    assert (updated.version, updated.content_type, updated.expires_on) == (
        second.properties.version,
        "text/plain",
        expires,
    )
    client.update_secret_properties("mailbox-a", first.properties.version, enabled=False)
    with pytest.raises(HttpResponseError) as disabled:
        client.get_secret("mailbox-a", first.properties.version)
    assert disabled.value.status_code == 403
    assert client.get_secret("mailbox-a").value == "v2"


def test_list_follows_next_links(client: SecretClient, server: KeyVaultServer, tls: dict[str, str]) -> None:
    names = [f"secret-{i}" for i in range(7)]
    for name in names:
        client.set_secret(name, "x")

    pages = [[p.name for p in page] for page in client.list_properties_of_secrets(max_page_size=3).by_page()]

    assert [len(p) for p in pages] == [3, 3, 1]
    assert sorted(n for page in pages for n in page) == names
    assert _raw(server, tls, "GET", "/secrets?api-version=7.6&maxresults=26", token="t")[0] == 400


def test_delete_then_recover_then_purge(client: SecretClient) -> None:
    client.set_secret("gone", "v1")

    deleted = client.begin_delete_secret("gone", _polling_interval=0)
    result = deleted.result()
    deleted.wait()

    assert result.recovery_id == f"{client.vault_url}/deletedsecrets/gone"
    assert result.deleted_date is not None and result.scheduled_purge_date is not None
    with pytest.raises(ResourceNotFoundError):
        client.get_secret("gone")
    with pytest.raises(ResourceExistsError):
        client.set_secret("gone", "v2")
    assert [d.name for d in client.list_deleted_secrets()] == ["gone"]

    client.begin_recover_deleted_secret("gone", _polling_interval=0).wait()
    assert client.get_secret("gone").value == "v1"

    client.begin_delete_secret("gone", _polling_interval=0).wait()
    client.purge_deleted_secret("gone")
    with pytest.raises(ResourceNotFoundError):
        client.get_deleted_secret("gone")
    assert client.set_secret("gone", "v3").value == "v3"
    assert len(list(client.list_properties_of_secret_versions("gone"))) == 1


def test_names_are_case_insensitive(client: SecretClient) -> None:
    client.set_secret("Mailbox-B", "v1")
    client.set_secret("MAILBOX-b", "v2")

    secret = client.get_secret("mailbox-b")

    assert secret.value == "v2"
    assert secret.name == "Mailbox-B"  # the name keeps the spelling it was created with
    assert [p.name for p in client.list_properties_of_secrets()] == ["Mailbox-B"]
    assert len(list(client.list_properties_of_secret_versions("MAILBOX-B"))) == 2


def test_missing_secret_is_resource_not_found(client: SecretClient) -> None:
    client.set_secret("present", "v1")

    with pytest.raises(ResourceNotFoundError) as missing:
        client.get_secret("absent")
    with pytest.raises(ResourceNotFoundError) as missing_version:
        client.get_secret("present", "0" * 32)

    assert missing.value.error is not None and missing.value.error.code == "SecretNotFound"
    assert missing_version.value.error is not None and missing_version.value.error.code == "SecretNotFound"
    with pytest.raises(ResourceNotFoundError):
        client.begin_delete_secret("absent")


@pytest.mark.parametrize(
    ("name", "value"),
    [("bad_name", "x"), ("a" * 128, "x"), ("big", "x" * (25 * 1024 + 1))],
    ids=["underscore", "128-chars", "value-over-25KB"],
)
def test_invalid_names_and_values_are_bad_parameters(client: SecretClient, name: str, value: str) -> None:
    with pytest.raises(HttpResponseError) as refused:
        client.set_secret(name, value)

    assert refused.value.status_code == 400
    assert refused.value.error is not None and refused.value.error.code == "BadParameter"


def test_largest_value_and_longest_name_are_accepted(client: SecretClient) -> None:
    name = "a" * 127
    client.set_secret(name, "x" * (25 * 1024))

    assert len(client.get_secret(name).value or "") == 25 * 1024


def test_throttling_with_retry_after_is_retried_by_the_sdk(
    client: SecretClient, server: KeyVaultServer, tls: dict[str, str]
) -> None:
    client.set_secret("warm", "v1")  # the challenge round trip, before the fault is armed
    fault = control(server.url, "POST", "faults", {"status": 429, "retry_after": 1, "count": 1}, cafile=tls["ca"])
    assert fault["count"] == 1

    started = time.monotonic()
    client.set_secret("throttled", "v1")
    elapsed = time.monotonic() - started

    assert elapsed >= 0.9  # the SDK waited as Retry-After asked
    stats = _stats(server, tls)
    assert stats["faults"] == 1
    assert stats["by_secret"]["throttled"] == {"reads": 0, "writes": 1}
    assert client.get_secret("throttled").value == "v1"


def test_throttling_answer_is_key_vaults(server: KeyVaultServer, tls: dict[str, str]) -> None:
    control(server.url, "POST", "faults", {"status": 429, "retry_after": 7, "method": "GET"}, cafile=tls["ca"])

    status, headers, body = _raw(server, tls, "GET", "/secrets/x/?api-version=7.6", token="t")

    assert (status, headers["Retry-After"], body["error"]["code"]) == (429, "7", "Throttled")


def test_persistent_unavailability_surfaces_after_retries(server: KeyVaultServer, tls: dict[str, str]) -> None:
    client = _client(server, tls, retry_total=2, retry_backoff_factor=0.01, retry_backoff_max=0.05)
    client.set_secret("steady", "v1")
    control(server.url, "POST", "faults", {"status": 503, "count": -1}, cafile=tls["ca"])

    with pytest.raises(HttpResponseError) as failed:
        client.get_secret("steady")

    assert failed.value.status_code == 503
    assert _stats(server, tls)["faults"] == 3  # the first try and two retries
    assert control(server.url, "DELETE", "faults", cafile=tls["ca"]) == {"cleared": 1}
    assert client.get_secret("steady").value == "v1"


def test_fault_applies_only_to_the_named_secret_and_method(server: KeyVaultServer, tls: dict[str, str]) -> None:
    client = _client(server, tls, retry_total=0)
    client.set_secret("one", "v1")
    client.set_secret("two", "v1")
    control(server.url, "POST", "faults", {"status": 500, "name": "ONE", "method": "get"}, cafile=tls["ca"])

    client.set_secret("one", "v2")
    assert client.get_secret("two").value == "v1"
    with pytest.raises(HttpResponseError) as failed:
        client.get_secret("one")
    assert failed.value.status_code == 500
    assert client.get_secret("one").value == "v2"


def test_delay_without_status_slows_then_serves(
    client: SecretClient, server: KeyVaultServer, tls: dict[str, str]
) -> None:
    client.set_secret("slow", "v1")
    control(server.url, "POST", "faults", {"delay_ms": 300}, cafile=tls["ca"])

    started = time.monotonic()
    assert client.get_secret("slow").value == "v1"

    assert time.monotonic() - started >= 0.3
    assert _stats(server, tls)["faults"] == 0


def test_bad_fault_is_refused(server: KeyVaultServer, tls: dict[str, str]) -> None:
    with pytest.raises(urllib.error.HTTPError) as refused:
        control(server.url, "POST", "faults", {"status": 200}, cafile=tls["ca"])

    assert refused.value.code == 400


def test_stats_count_served_reads_and_writes_per_secret(
    client: SecretClient, server: KeyVaultServer, tls: dict[str, str]
) -> None:
    client.set_secret("counted", "v1")
    control(server.url, "POST", "reset", {}, cafile=tls["ca"])

    client.get_secret("counted")
    client.get_secret("COUNTED")
    client.set_secret("counted", "v2")
    client.update_secret_properties("counted", tags={"k": "v"})
    list(client.list_properties_of_secrets())

    stats = _stats(server, tls)
    assert (stats["reads"], stats["writes"], stats["challenges"]) == (3, 2, 0)
    assert stats["by_secret"] == {"counted": {"reads": 2, "writes": 2}}

    control(server.url, "POST", "reset", {"secrets": True}, cafile=tls["ca"])
    assert _stats(server, tls)["reads"] == 0
    with pytest.raises(ResourceNotFoundError):
        client.get_secret("counted")


def test_state_file_keeps_secrets_across_restarts(tls: dict[str, str], tmp_path: Path) -> None:
    state = tmp_path / "state" / "kv.json"
    first, thread = serve("127.0.0.1", 0, tls["cert"], tls["key"], state=state)
    client = _client(first, tls)
    version = client.set_secret("kept", "v1", tags={"t": "1"}).properties.version
    client.set_secret("dropped", "v1")
    client.begin_delete_secret("dropped", _polling_interval=0).wait()
    first.stop()
    thread.join(timeout=5)

    assert stat.S_IMODE(os.stat(state).st_mode) == 0o600
    second, thread = serve("127.0.0.1", 0, tls["cert"], tls["key"], state=state)
    try:
        client = _client(second, tls)
        kept = client.get_secret("kept")
        assert (kept.value, kept.properties.version, kept.properties.tags) == ("v1", version, {"t": "1"})
        assert client.get_deleted_secret("dropped").name == "dropped"
    finally:
        second.stop()
        thread.join(timeout=5)


def test_one_log_line_per_request_and_no_value(
    client: SecretClient, server: KeyVaultServer, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="devstack.keyvault"):
        client.set_secret("logged", VALUE)
        client.get_secret("logged")

    lines = [r.getMessage() for r in caplog.records if r.name == "devstack.keyvault"]
    assert "kv method=PUT path=/secrets/logged status=200" in " | ".join(lines)
    assert any(line.startswith("kv method=GET path=/secrets/logged/ status=200") for line in lines)
    assert not any("api-version" in line for line in lines)
    assert VALUE not in caplog.text


def test_health_and_loopback_only(server: KeyVaultServer, tls: dict[str, str]) -> None:
    assert control(server.url, "GET", "health", cafile=tls["ca"]) == {"status": "ok"}
    with pytest.raises(ValueError):
        serve("0.0.0.0", 0, tls["cert"], tls["key"])


# ------------------------------------------------------------------------ Key Vault's awkward parts


@pytest.fixture
def strict_server(tls: dict[str, str]) -> Iterator[KeyVaultServer]:
    """As deployed: 7-day retention, RBAC with one Secrets Officer, deletes and recoveries that take a second."""
    kv, thread = serve("127.0.0.1", 0, tls["cert"], tls["key"], tenant=TENANT, retention_days=7,
                       transition_seconds=1.0, secrets_officers=(OFFICER,))  # fmt: skip
    yield kv
    kv.stop()
    thread.join(timeout=5)


def test_more_than_500_versions_cannot_be_backed_up_and_counts_are_shown(
    strict_server: KeyVaultServer, tls: dict[str, str]
) -> None:
    control(strict_server.url, "POST", "settings", {"throttle": {"writes": 10_000, "all": 10_000}}, cafile=tls["ca"])
    client = _client(strict_server, tls)
    for i in range(500):
        client.set_secret("many", f"v{i}")
    assert client.backup_secret("many")
    client.set_secret("many", "one too many")

    with pytest.raises(HttpResponseError) as refused:
        client.backup_secret("many")
    assert refused.value.status_code == 400 and "500 versions" in str(refused.value)
    summary = control(strict_server.url, "GET", "secrets", cafile=tls["ca"])["secrets"]["many"]
    assert summary == {"name": "many", "versions": 501, "enabled": 501, "state": "active"}


def test_delete_and_recover_take_time_and_answer_409_meanwhile(
    strict_server: KeyVaultServer, tls: dict[str, str]
) -> None:
    client = _client(strict_server, tls)
    client.set_secret("slow", "v1")

    deleting = client.begin_delete_secret("slow", _polling_interval=0.2)
    with pytest.raises(ResourceExistsError) as busy:
        client.set_secret("slow", "v2")
    assert busy.value.error is not None and busy.value.error.code == "ObjectIsBeingDeleted"
    with pytest.raises(ResourceNotFoundError):
        client.get_deleted_secret("slow")
    deleting.wait()
    deleted = client.get_deleted_secret("slow")
    assert deleted.properties.recoverable_days == 7
    assert deleted.scheduled_purge_date - deleted.deleted_date == datetime.timedelta(days=7)

    recovering = client.begin_recover_deleted_secret("slow", _polling_interval=0.2)
    with pytest.raises(ResourceExistsError) as busy:
        client.set_secret("slow", "v2")
    assert busy.value.error is not None and busy.value.error.code == "ObjectIsBeingRecovered"
    with pytest.raises(ResourceNotFoundError):
        client.get_secret("slow")
    recovering.wait()
    assert client.get_secret("slow").value == "v1"


def test_a_caller_without_the_secrets_officer_role_gets_403_until_its_assignment_propagates(
    strict_server: KeyVaultServer, tls: dict[str, str]
) -> None:
    _client(strict_server, tls).set_secret("guarded", "v1")
    stranger, reader = "0f7c2d7e-0000-4000-8000-0000000005a1", "0f7c2d7e-0000-4000-8000-00000000ead0"
    with pytest.raises(HttpResponseError) as denied:
        _client(strict_server, tls, FakeCredential(oid=stranger)).get_secret("guarded")
    assert denied.value.status_code == 403
    assert "propagation" in str(denied.value) and "ForbiddenByRbac" in str(denied.value.response.text())

    control(strict_server.url, "POST", "roles", {"principal": reader, "role": "Key Vault Secrets User"},
            cafile=tls["ca"])  # fmt: skip
    as_reader = _client(strict_server, tls, FakeCredential(oid=reader))
    assert as_reader.get_secret("guarded").value == "v1"
    with pytest.raises(HttpResponseError) as read_only:
        as_reader.set_secret("guarded", "v2")
    assert read_only.value.status_code == 403

    later = {"principal": stranger, "role": "Key Vault Secrets Officer", "delay_seconds": 1}
    control(strict_server.url, "POST", "roles", later, cafile=tls["ca"])
    as_new_officer = _client(strict_server, tls, FakeCredential(oid=stranger))
    with pytest.raises(HttpResponseError):
        as_new_officer.set_secret("guarded", "v2")
    time.sleep(1.2)
    assert as_new_officer.set_secret("guarded", "v2").value == "v2"


def test_requests_past_the_vault_limit_get_429_with_retry_after(
    strict_server: KeyVaultServer, tls: dict[str, str]
) -> None:
    control(strict_server.url, "POST", "settings", {"throttle": {"writes": 2}}, cafile=tls["ca"])
    client = _client(strict_server, tls, retry_total=0)
    client.set_secret("busy", "v1")
    client.set_secret("busy", "v2")
    with pytest.raises(HttpResponseError) as throttled:
        client.set_secret("busy", "v3")
    assert throttled.value.status_code == 429
    assert 1 <= int(throttled.value.response.headers["Retry-After"]) <= 10
    assert client.get_secret("busy").value == "v2", "reads have their own, larger limit"
