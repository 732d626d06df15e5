"""Clients for Storage (blob, queue, table) and Key Vault, built from the settings.

In Azure every client authenticates with the user-assigned managed identity; locally, storage uses Azurite's
connection string and Key Vault a credential from the environment (see README, "Local stack"). Clients are
created on first use and shared: the SDK clients are thread-safe.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import requests
from azure.core.credentials import TokenCredential
from azure.core.exceptions import ResourceExistsError
from azure.core.pipeline.transport import RequestsTransport
from azure.data.tables import TableClient, TableServiceClient
from azure.identity import ClientSecretCredential, DefaultAzureCredential, ManagedIdentityCredential
from azure.keyvault.secrets import SecretClient
from azure.storage.blob import BlobServiceClient, ContainerClient
from azure.storage.queue import QueueClient, TextBase64DecodePolicy, TextBase64EncodePolicy

from shared.settings import DEFAULT_AUTHORITY_HOST, Settings

# Storage calls should fail fast enough that one slow dependency cannot eat a run's time budget.
STORAGE_TIMEOUTS: dict[str, Any] = {"connection_timeout": 10, "read_timeout": 60}
# Blob and queue clients retry with the storage SDK's own policy, whose default waits 15, 18 and 24 s (plus
# jitter): against an unreachable account one call then takes well over a minute, and a run makes several.
# Two quick retries (after about 3 and 5 s: initial_backoff + increment_base ** n) ride out a blip; an outage is
# left to the next run.
STORAGE_RETRY: dict[str, Any] = {"retry_total": 2, "initial_backoff": 1, "increment_base": 2, "random_jitter_range": 1}
# Connections kept per host. The blob client is shared by the store threads, the mailbox threads and their lease
# renewals: with urllib3's default of 10, every connection beyond that was dropped after use (with a WARNING).
BLOB_POOL_CONNECTIONS = 32
_lock = threading.Lock()


def environment_ca_bundle() -> str | None:
    """The CA bundle requests takes from the environment for a call that verifies with its default (True), as it
    reads it: REQUESTS_CA_BUNDLE, else CURL_CA_BUNDLE, an empty value counting as unset."""
    return os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or None


def environment_unused() -> bool:
    """Whether requests would take nothing from the environment for a call but a CA bundle (which the transport is
    then given once, ``environment_ca_bundle``): no proxy variable, no .netrc. Then its per-call look-ups (every
    variable scanned twice for proxies, the .netrc file looked for) are CPU for nothing: at 2,000 mailboxes a run
    makes over 10,000 storage calls."""
    names = {name.lower() for name in os.environ}
    if any(name.endswith("_proxy") for name in names) or "netrc" in names:
        return False
    return not any(Path(os.path.expanduser(f"~/{name}")).exists() for name in (".netrc", "_netrc"))


class _PooledTransport(RequestsTransport):  # type: ignore[misc]  # the SDK exports it lazily: Any to mypy
    """The SDK's own requests transport, with a connection pool sized for the worker's threads, and the environment
    read once when it holds nothing for requests but a CA bundle (a proxy or CA bundle variable set later in the
    process's life is not seen; one set at start is honoured as before)."""

    def __init__(self, **kwargs: Any) -> None:
        bundle = environment_ca_bundle()
        if bundle:
            # What requests would have put in place of the default for every call, resolved once.
            kwargs.setdefault("connection_verify", bundle)
        super().__init__(**kwargs)

    def _init_session(self, session: requests.Session) -> None:
        super()._init_session(session)
        if environment_unused():
            session.trust_env = False
        for prefix in ("http://", "https://"):
            adapter = session.get_adapter(prefix)
            if isinstance(adapter, requests.adapters.HTTPAdapter):
                adapter.init_poolmanager(BLOB_POOL_CONNECTIONS, BLOB_POOL_CONNECTIONS)


def _transport_options(settings: Settings) -> dict[str, Any]:
    return {"connection_verify": settings.ca_bundle} if settings.ca_bundle else {}


@functools.cache
def azure_credential(settings: Settings) -> TokenCredential:
    """The app's identity: the user-assigned managed identity in Azure; an app registration's secret locally."""
    local = settings.local_credential
    if local is not None:
        return ClientSecretCredential(
            local.tenant_id,
            local.client_id,
            local.client_secret,
            authority=local.authority_host,
            # A private authority host (the local stack) is not in MSAL's discovery list; trust the configured one.
            disable_instance_discovery=local.authority_host != DEFAULT_AUTHORITY_HOST,
            **_transport_options(settings),
        )
    if settings.managed_identity_client_id:
        return ManagedIdentityCredential(client_id=settings.managed_identity_client_id, **_transport_options(settings))
    return DefaultAzureCredential(exclude_interactive_browser_credential=True)


@functools.cache
def blob_service(settings: Settings) -> BlobServiceClient:
    storage = settings.storage
    options: dict[str, Any] = {**STORAGE_TIMEOUTS, **STORAGE_RETRY, "transport": _PooledTransport()}
    if storage.connection_string:
        return BlobServiceClient.from_connection_string(storage.connection_string, **options)
    assert storage.blob_uri is not None
    return BlobServiceClient(storage.blob_uri, credential=azure_credential(settings), **options)


# The Functions queue trigger expects base64 (host.json messageEncoding), and so do consumers. The service client
# does not hand these policies on to its queue clients, so every QueueClient is built here with them.
_QUEUE_POLICIES: dict[str, Any] = {
    "message_encode_policy": TextBase64EncodePolicy(),
    "message_decode_policy": TextBase64DecodePolicy(),
}


def _pooled() -> dict[str, Any]:
    # Each queue client its own transport: the fan-out's sends and the hosts' queue calls share none.
    return {"transport": _PooledTransport()}


def _queue_client(settings: Settings, name: str) -> QueueClient:
    storage = settings.storage
    if storage.connection_string:
        return QueueClient.from_connection_string(
            storage.connection_string, name, **_QUEUE_POLICIES, **STORAGE_TIMEOUTS, **STORAGE_RETRY, **_pooled()
        )
    assert storage.queue_uri is not None
    return QueueClient(
        storage.queue_uri,
        name,
        credential=azure_credential(settings),
        **_QUEUE_POLICIES,
        **STORAGE_TIMEOUTS,
        **STORAGE_RETRY,
        **_pooled(),
    )


@functools.cache
def table_service(settings: Settings) -> TableServiceClient:
    storage = settings.storage
    # Pooled as the blob client: the GLPI consumer's invocations and their helper threads write rows side by side,
    # and with urllib3's default of 10 a connection beyond that was dropped after use (with a WARNING).
    options: dict[str, Any] = {**STORAGE_TIMEOUTS, "transport": _PooledTransport()}
    if storage.connection_string:
        return TableServiceClient.from_connection_string(storage.connection_string, **options)
    assert storage.table_uri is not None
    return TableServiceClient(storage.table_uri, credential=azure_credential(settings), **options)


@functools.cache
def secret_client(settings: Settings) -> SecretClient:
    return SecretClient(
        settings.key_vault_uri,
        azure_credential(settings),
        # Only a real vault's challenge names a resource under its own domain; the local endpoint's does not.
        verify_challenge_resource=".vault." in (urlparse(settings.key_vault_uri).hostname or ""),
        # A handful of quick retries: throttling is retried by the next run, not by stalling this one.
        retry_total=3,
        retry_backoff_max=8,
        **_transport_options(settings),
    )


_created: set[tuple[str, str]] = set()


def _once(kind: str, name: str, create: Any) -> None:
    """Create a queue, container or table the first time this process uses it (idempotent, cheap after)."""
    with _lock:
        if (kind, name) in _created:
            return
    create()
    with _lock:
        _created.add((kind, name))


def container(settings: Settings, name: str) -> ContainerClient:
    client = blob_service(settings).get_container_client(name)
    _once("container", name, lambda: _ignore_exists(client.create_container))
    return client


def queue(settings: Settings, name: str) -> QueueClient:
    client = _queue_client(settings, name)
    _once("queue", name, lambda: _ignore_exists(client.create_queue))
    return client


def table(settings: Settings, name: str) -> TableClient:
    _once("table", name, lambda: table_service(settings).create_table_if_not_exists(name))
    return table_service(settings).get_table_client(name)


def _ignore_exists(create: Any) -> None:
    with contextlib.suppress(ResourceExistsError):
        create()
