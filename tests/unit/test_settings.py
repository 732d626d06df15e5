from __future__ import annotations

import pytest

from shared.errors import ConfigurationError
from shared.settings import SETTING_NAMES, load_settings

BASE = {
    "AzureWebJobsStorage": "UseDevelopmentStorage=true",
    "KEY_VAULT_URI": "https://kv-example.vault.azure.net/",
    "ENTRA_TENANT_ID": "tenant",
    "ENTRA_CLIENT_ID": "client",
}


def test_defaults_are_the_documented_ones() -> None:
    s = load_settings(BASE)
    assert s.key_vault_uri == "https://kv-example.vault.azure.net"
    assert s.authority == "https://login.microsoftonline.com/tenant"
    assert s.is_public_cloud_authority
    assert (s.imap_host, s.imap_port) == ("outlook.office365.com", 993)
    assert s.imap_scope == "https://outlook.office.com/IMAP.AccessAsUser.All"
    assert s.collect_schedule == "0 */5 * * * *"
    assert (s.mail_queue, s.mail_container, s.mailbox_table) == ("incoming-mail", "raw-mail", "mailboxes")
    assert s.client_secret is None and s.allowed_domains == ()


@pytest.mark.parametrize("missing", ["KEY_VAULT_URI", "ENTRA_TENANT_ID", "ENTRA_CLIENT_ID"])
def test_a_missing_setting_is_named(missing: str) -> None:
    env = {k: v for k, v in BASE.items() if k != missing}
    with pytest.raises(ConfigurationError, match=missing):
        load_settings(env)


def test_storage_needs_a_connection_string_or_every_service_uri() -> None:
    env = {k: v for k, v in BASE.items() if k != "AzureWebJobsStorage"}
    env["AzureWebJobsStorage__blobServiceUri"] = "https://acct.blob.core.windows.net"
    with pytest.raises(ConfigurationError, match="queueServiceUri"):
        load_settings(env)
    env["AzureWebJobsStorage__queueServiceUri"] = "https://acct.queue.core.windows.net"
    env["AzureWebJobsStorage__tableServiceUri"] = "https://acct.table.core.windows.net"
    env["AzureWebJobsStorage__clientId"] = "mi-client"
    storage = load_settings(env).storage
    assert storage.connection_string is None and storage.client_id == "mi-client"


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("IMAP_PORT", "imap", "not a whole number"),
        ("IMAP_PORT", "70000", "outside"),
        ("COLLECT_MAX_CONCURRENCY", "0", "outside"),
        ("COLLECT_MEMORY_BUDGET_MB", "63", "outside"),
        ("COLLECT_MEMORY_BUDGET_MB", "-512", "outside"),
        ("COLLECT_MEMORY_BUDGET_MB", "2 GB", "not a whole number"),
        ("COLLECT_MEMORY_BUDGET_MB", "99999999999999999999", "outside"),
        ("KEY_VAULT_URI", "http://kv.example", "https://"),
        ("ENTRA_AUTHORITY_HOST", "login.example", "https://"),
    ],
)
def test_invalid_values_are_refused_with_their_name(name: str, value: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=f"{name}.*{message}"):
        load_settings({**BASE, name: value})


def test_allowed_domains_are_normalized() -> None:
    s = load_settings({**BASE, "ALLOWED_MAIL_DOMAINS": " Contoso.com, @fabrikam.com ,"})
    assert s.allowed_domains == ("contoso.com", "fabrikam.com")


def test_the_client_secret_is_not_in_the_repr() -> None:
    s = load_settings({**BASE, "ENTRA_CLIENT_SECRET": "s3cr3t-value"})
    assert s.client_secret == "s3cr3t-value"
    assert "s3cr3t-value" not in repr(s)


def test_setting_names_are_unique() -> None:
    assert len(SETTING_NAMES) == len(set(SETTING_NAMES))


def test_token_caches_never_show_in_a_repr() -> None:
    from collectors.tokens import _Warm
    from shared.token_store import StoredCache

    cache = '{"RefreshToken": {"x": {"secret": "1.AbCdEf-refresh"}}}'
    assert "1.AbCdEf" not in repr(StoredCache(cache, "v1"))
    assert "1.AbCdEf" not in repr(_Warm(cache, "v1", "a@contoso.com"))


def test_glpi_is_off_without_a_url_and_checked_with_one() -> None:
    assert load_settings(BASE).glpi is None
    with pytest.raises(ConfigurationError, match=r"GLPI_URL.*https://"):
        load_settings({**BASE, "GLPI_URL": "http://glpi.example/apirest.php", "GLPI_USER_TOKEN": "u"})
    with pytest.raises(ConfigurationError, match="GLPI_USER_TOKEN"):
        load_settings({**BASE, "GLPI_URL": "https://glpi.example/apirest.php"})
    env = {"GLPI_URL": "https://glpi.example/apirest.php/", "GLPI_USER_TOKEN": "user-tok", "GLPI_APP_TOKEN": "app"}
    glpi = load_settings({**BASE, **env}).glpi
    assert glpi is not None and glpi.url == "https://glpi.example/apirest.php"
    assert (glpi.state_table, glpi.mailbox_options) == ("glpitickets", "{}")
    assert "user-tok" not in repr(glpi) and "'app'" not in repr(glpi)
