"""Typed, frozen application settings, read lazily from the environment.

In Azure the values are app settings; locally they come from ``local.settings.json`` (the local host and
Core Tools export them as environment variables). Nothing here touches the network.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from shared.errors import ConfigurationError

DEFAULT_AUTHORITY_HOST = "https://login.microsoftonline.com"
DEFAULT_IMAP_SCOPE = "https://outlook.office.com/IMAP.AccessAsUser.All"
PUBLIC_TOKEN_EXCHANGE_AUDIENCE = "api://AzureADTokenExchange"  # noqa: S105 - an audience, not a secret
# Microsoft's national clouds have their own authority hosts and token exchange audiences.
TOKEN_EXCHANGE_AUDIENCES = {
    "login.microsoftonline.com": PUBLIC_TOKEN_EXCHANGE_AUDIENCE,
    "login.microsoftonline.us": "api://AzureADTokenExchangeUSGov",
    "login.chinacloudapi.cn": "api://AzureADTokenExchangeChina",
    "login.partner.microsoftonline.cn": "api://AzureADTokenExchangeChina",
}
# The Functions host's own switch for one function (AzureWebJobs.<function name>.Disabled): the GLPI consumer stays
# off, and leaves the mail queue to other consumers, until a GLPI URL is configured.
GLPI_FUNCTION_NAME = "glpi_tickets"
GLPI_DISABLED_SETTING = f"AzureWebJobs.{GLPI_FUNCTION_NAME}.Disabled"

# Every setting the app reads; infra and the local sample must provide the same names (a test checks).
SETTING_NAMES: tuple[str, ...] = (
    "AzureWebJobsStorage",
    "AzureWebJobsStorage__blobServiceUri",
    "AzureWebJobsStorage__queueServiceUri",
    "AzureWebJobsStorage__tableServiceUri",
    "AzureWebJobsStorage__credential",
    "AzureWebJobsStorage__clientId",
    "KEY_VAULT_URI",
    "AZURE_CLIENT_ID",
    "ENTRA_TENANT_ID",
    "ENTRA_CLIENT_ID",
    "ENTRA_AUTHORITY_HOST",
    "ENTRA_CLIENT_SECRET",
    "ENTRA_CLIENT_SECRET_NAME",
    "ENTRA_REDIRECT_URI",
    "ALLOWED_MAIL_DOMAINS",
    "IMAP_HOST",
    "IMAP_PORT",
    "IMAP_SCOPE",
    "COLLECT_SCHEDULE",
    "COLLECT_MAX_CONCURRENCY",
    "COLLECT_TIME_BUDGET_SECONDS",
    "COLLECT_MEMORY_BUDGET_MB",
    "MAIL_QUEUE_NAME",
    "MAIL_CONTAINER_NAME",
    "WORK_QUEUE_NAME",
    "MAILBOX_TABLE_NAME",
    "CONSENT_TABLE_NAME",
    "LEASE_CONTAINER_NAME",
    "TLS_CA_BUNDLE",
    "AZURE_TENANT_ID",
    "AZURE_CLIENT_SECRET",
    "AZURE_AUTHORITY_HOST",
    "GLPI_URL",
    "GLPI_APP_TOKEN",
    "GLPI_USER_TOKEN",
    "GLPI_STATE_TABLE_NAME",
    "GLPI_MAILBOX_OPTIONS",
    GLPI_DISABLED_SETTING,
)
# Read only when running outside Azure (the local stack, or a developer against cloud resources): the app then
# authenticates to Key Vault as an app registration instead of the managed identity.
LOCAL_ONLY_SETTINGS: tuple[str, ...] = (
    "TLS_CA_BUNDLE",
    "AZURE_TENANT_ID",
    "AZURE_CLIENT_SECRET",
    "AZURE_AUTHORITY_HOST",
)


@dataclass(frozen=True)
class StorageSettings:
    """Either a connection string (Azurite, local) or identity-based service URIs (Azure)."""

    connection_string: str | None = None
    blob_uri: str | None = None
    queue_uri: str | None = None
    table_uri: str | None = None
    client_id: str | None = None


@dataclass(frozen=True)
class LocalCredential:
    """An app registration's secret for reaching Key Vault outside Azure (never set in Azure)."""

    tenant_id: str
    client_id: str
    client_secret: str = field(repr=False)
    authority_host: str


@dataclass(frozen=True)
class GlpiSettings:
    """Where the GLPI consumer sends tickets. In Azure both tokens are Key Vault references the platform resolves."""

    url: str
    app_token: str | None = field(repr=False)
    user_token: str = field(repr=False)
    state_table: str
    mailbox_options: str  # JSON text; consumers/glpi/options.py reads and checks it


@dataclass(frozen=True)
class Settings:
    storage: StorageSettings
    key_vault_uri: str
    managed_identity_client_id: str | None
    tenant_id: str
    client_id: str
    authority_host: str
    client_secret: str | None = field(repr=False)
    client_secret_name: str | None
    redirect_uri: str | None
    allowed_domains: tuple[str, ...]
    imap_host: str
    imap_port: int
    imap_scope: str
    collect_schedule: str
    max_concurrency: int
    time_budget_seconds: int
    memory_budget_mb: int
    mail_queue: str
    mail_container: str
    work_queue: str
    mailbox_table: str
    consent_table: str
    lease_container: str
    ca_bundle: str | None
    local_credential: LocalCredential | None = None
    glpi: GlpiSettings | None = None

    @property
    def authority(self) -> str:
        return f"{self.authority_host.rstrip('/')}/{self.tenant_id}"

    @property
    def is_public_cloud_authority(self) -> bool:
        return self.authority_host.rstrip("/") == DEFAULT_AUTHORITY_HOST

    @property
    def token_exchange_audience(self) -> str:
        """The audience of the managed identity's token that a federated credential accepts: it follows the cloud."""
        host = self.authority_host.rstrip("/").removeprefix("https://").lower()
        return TOKEN_EXCHANGE_AUDIENCES.get(host, PUBLIC_TOKEN_EXCHANGE_AUDIENCE)


def _text(env: Mapping[str, str], name: str, default: str | None = None) -> str | None:
    value = env.get(name, "").strip()
    return value or default


def _required(env: Mapping[str, str], name: str, why: str) -> str:
    value = _text(env, name)
    if value is None:
        raise ConfigurationError(f"setting {name} is missing: {why}")
    return value


def _integer(env: Mapping[str, str], name: str, default: int, *, minimum: int, maximum: int) -> int:
    raw = _text(env, name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigurationError(f"setting {name}={raw!r} is not a whole number") from None
    if not minimum <= value <= maximum:
        raise ConfigurationError(f"setting {name}={value} is outside {minimum}..{maximum}")
    return value


def _https_url(env: Mapping[str, str], name: str, value: str) -> str:
    if not value.startswith("https://"):
        raise ConfigurationError(f"setting {name}={value!r} must be an https:// URL")
    return value.rstrip("/")


def _storage(env: Mapping[str, str]) -> StorageSettings:
    connection_string = _text(env, "AzureWebJobsStorage")
    if connection_string:
        return StorageSettings(connection_string=connection_string)
    prefix = "AzureWebJobsStorage__"
    uris = {kind: _text(env, f"{prefix}{kind}ServiceUri") for kind in ("blob", "queue", "table")}
    missing = [f"{prefix}{kind}ServiceUri" for kind, uri in uris.items() if uri is None]
    if missing:
        raise ConfigurationError(
            "storage is not configured: set AzureWebJobsStorage (a connection string, locally) or "
            + ", ".join(missing)
            + " (identity-based, in Azure)"
        )
    return StorageSettings(
        blob_uri=uris["blob"],
        queue_uri=uris["queue"],
        table_uri=uris["table"],
        client_id=_text(env, f"{prefix}clientId") or _text(env, "AZURE_CLIENT_ID"),
    )


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Build the settings from ``env`` (default: the process environment).

    Raises ConfigurationError naming the first missing or invalid setting.
    """
    env = os.environ if env is None else env
    domains = tuple(d.strip().lower().lstrip("@") for d in (_text(env, "ALLOWED_MAIL_DOMAINS") or "").split(","))
    return Settings(
        storage=_storage(env),
        key_vault_uri=_https_url(
            env, "KEY_VAULT_URI", _required(env, "KEY_VAULT_URI", "the Key Vault that holds the token caches")
        ),
        managed_identity_client_id=_text(env, "AZURE_CLIENT_ID"),
        tenant_id=_required(env, "ENTRA_TENANT_ID", "the Entra tenant (directory) id of the mailboxes"),
        client_id=_required(env, "ENTRA_CLIENT_ID", "the application (client) id of the Entra app registration"),
        authority_host=_https_url(
            env, "ENTRA_AUTHORITY_HOST", _text(env, "ENTRA_AUTHORITY_HOST", DEFAULT_AUTHORITY_HOST) or ""
        ),
        client_secret=_text(env, "ENTRA_CLIENT_SECRET"),
        client_secret_name=_text(env, "ENTRA_CLIENT_SECRET_NAME"),
        redirect_uri=_text(env, "ENTRA_REDIRECT_URI"),
        allowed_domains=tuple(d for d in domains if d),
        imap_host=_text(env, "IMAP_HOST", "outlook.office365.com") or "",
        imap_port=_integer(env, "IMAP_PORT", 993, minimum=1, maximum=65535),
        imap_scope=_text(env, "IMAP_SCOPE", DEFAULT_IMAP_SCOPE) or "",
        collect_schedule=_text(env, "COLLECT_SCHEDULE", "0 */5 * * * *") or "",
        max_concurrency=_integer(env, "COLLECT_MAX_CONCURRENCY", 8, minimum=1, maximum=64),
        time_budget_seconds=_integer(env, "COLLECT_TIME_BUDGET_SECONDS", 240, minimum=10, maximum=3600),
        memory_budget_mb=_integer(env, "COLLECT_MEMORY_BUDGET_MB", 512, minimum=64, maximum=65536),
        mail_queue=_text(env, "MAIL_QUEUE_NAME", "incoming-mail") or "",
        mail_container=_text(env, "MAIL_CONTAINER_NAME", "raw-mail") or "",
        work_queue=_text(env, "WORK_QUEUE_NAME", "collect-work") or "",
        mailbox_table=_text(env, "MAILBOX_TABLE_NAME", "mailboxes") or "",
        consent_table=_text(env, "CONSENT_TABLE_NAME", "consentflows") or "",
        lease_container=_text(env, "LEASE_CONTAINER_NAME", "mailbox-leases") or "",
        ca_bundle=_text(env, "TLS_CA_BUNDLE"),
        local_credential=_local_credential(env),
        glpi=_glpi(env),
    )


def _glpi(env: Mapping[str, str]) -> GlpiSettings | None:
    url = _text(env, "GLPI_URL")
    if url is None:
        return None
    return GlpiSettings(
        url=_https_url(env, "GLPI_URL", url),
        app_token=_text(env, "GLPI_APP_TOKEN"),
        user_token=_required(env, "GLPI_USER_TOKEN", "the API token of the GLPI user the tickets are created as"),
        state_table=_text(env, "GLPI_STATE_TABLE_NAME", "glpitickets") or "",
        mailbox_options=_text(env, "GLPI_MAILBOX_OPTIONS", "{}") or "",
    )


def _local_credential(env: Mapping[str, str]) -> LocalCredential | None:
    secret = _text(env, "AZURE_CLIENT_SECRET")
    if secret is None:
        return None
    return LocalCredential(
        tenant_id=_required(env, "AZURE_TENANT_ID", "the tenant of the app registration in AZURE_CLIENT_ID"),
        client_id=_required(env, "AZURE_CLIENT_ID", "the app registration whose secret is AZURE_CLIENT_SECRET"),
        client_secret=secret,
        authority_host=_https_url(
            env, "AZURE_AUTHORITY_HOST", _text(env, "AZURE_AUTHORITY_HOST", DEFAULT_AUTHORITY_HOST) or ""
        ),
    )


@functools.cache
def get_settings() -> Settings:
    """The process-wide settings, built on first use (not at import)."""
    return load_settings()
