"""Offline checks of the azd infrastructure: every Bicep file parses (pycep-parser, as no Bicep compiler installs
here), and the parse trees hold what the app depends on: the settings shared/settings.py reads, identity-only
storage, least-privilege role assignments at the right scopes, the outputs azd and the hooks use, the azd tags.

Each check is a function over the parse trees, so that ``test_check_fails_without_its_property`` can remove the
property from the Bicep text, parse again and see the check fail: no check here can pass vacuously.
"""

from __future__ import annotations

import ast
import functools
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pycep import BicepParser
from pycep.models import BicepElement

from api.consent import CALLBACK_ROUTE
from shared.settings import LOCAL_ONLY_SETTINGS, SETTING_NAMES
from tests.support import kql

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
MAIN = "main.bicep"
API = "app/api.bicep"
RBAC = "app/rbac.bicep"
KEYVAULT = "app/keyvault.bicep"
MONITORING = "app/monitoring.bicep"
ALERTS = "app/alerts.bicep"
ENTRA = "app/entra.bicep"

Tree = dict[str, Any]
Trees = dict[str, Tree]

# Never in Azure: the local connection string, and what the code itself declares local-only (a test CA, the
# app-registration secret the local run reaches Key Vault with).
NOT_IN_AZURE = {"AzureWebJobsStorage", *LOCAL_ONLY_SETTINGS}
PLATFORM_SETTINGS = {"APPLICATIONINSIGHTS_CONNECTION_STRING", "APPLICATIONINSIGHTS_AUTHENTICATION_STRING"}
# Names of Key Vault secrets, not secrets: plain values.
SECRET_NAME_SETTINGS = {"ENTRA_CLIENT_SECRET_NAME"}
# Flex Consumption rejects the first four (runtime and package live in functionAppConfig); the rest are key-based
# or local-only.
FORBIDDEN_SETTINGS = {
    "FUNCTIONS_WORKER_RUNTIME",
    "FUNCTIONS_EXTENSION_VERSION",
    "WEBSITE_RUN_FROM_PACKAGE",
    "WEBSITE_CONTENTAZUREFILECONNECTIONSTRING",
    *NOT_IN_AZURE,
}

ROLE_NAMES = {
    "b7e6dc6d-f1e8-4753-8033-0f276bb0955b": "Storage Blob Data Owner",
    "ba92f5b4-2d11-453d-a403-e96b0029c9fe": "Storage Blob Data Contributor",
    "974c5e8b-45b9-4653-ba55-5f855dd0fb88": "Storage Queue Data Contributor",
    "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3": "Storage Table Data Contributor",
    "b86a8fe4-44ce-4948-aee5-eccb2c155cd7": "Key Vault Secrets Officer",
    "3913510d-42f4-4e42-8a64-420c390055eb": "Monitoring Metrics Publisher",
}
STORAGE = "Microsoft.Storage/storageAccounts"
VAULT = "Microsoft.KeyVault/vaults"
INSIGHTS = "Microsoft.Insights/components"
# (role, scope type) pairs, exactly; a broader role or scope for the app identity is a failure too.
APP_ROLES = {
    ("Storage Blob Data Owner", STORAGE),
    ("Storage Queue Data Contributor", STORAGE),
    ("Storage Table Data Contributor", STORAGE),
    ("Key Vault Secrets Officer", VAULT),
    ("Monitoring Metrics Publisher", INSIGHTS),
}
USER_ROLES = {
    ("Storage Blob Data Contributor", STORAGE),
    ("Storage Queue Data Contributor", STORAGE),
    ("Storage Table Data Contributor", STORAGE),
    ("Key Vault Secrets Officer", VAULT),
}

AZD_OUTPUTS = {
    "AZURE_LOCATION",
    "AZURE_TENANT_ID",
    "RESOURCE_GROUP",
    "AZURE_FUNCTION_APP_NAME",
    "SERVICE_API_NAME",
    "SERVICE_API_URI",
    "KEY_VAULT_URI",
    "AZURE_CLIENT_ID",
    "AZURE_STORAGE_BLOB_ENDPOINT",
    "AZURE_STORAGE_QUEUE_ENDPOINT",
    "AZURE_STORAGE_TABLE_ENDPOINT",
    "APPLICATIONINSIGHTS_CONNECTION_STRING",
}
# Microsoft's published ids (docs/deploy.md and infra/app/entra.bicep cite where each is listed). A typo here or in the
# Bicep would register a permission the app never asks for, and consent would not cover the real one.
GRAPH_APP_ID = "00000003-0000-0000-c000-000000000000"  # Microsoft Graph
EXCHANGE_ONLINE_APP_ID = "00000002-0000-0ff1-ce00-000000000000"  # Office 365 Exchange Online
GRAPH_DELEGATED = {
    "652390e4-393a-48de-9484-05f9b1212954": "IMAP.AccessAsUser.All",
    "7427e0e9-2fba-42fe-b0c0-848c9e6a8182": "offline_access",
    "37f7f235-527c-4136-accd-4a02d197296e": "openid",
    "64a6cdd6-aab1-4aaf-94b8-3cc8405e90d0": "email",
    "14dad69e-099b-42c9-810b-d002981feec1": "profile",
}
IMAP_ACCESS_AS_APP = "5e5addcd-3e8d-4e90-baf5-964efab2b20a"  # Office 365 Exchange Online application role
# The published Microsoft Graph extension, pinned to a released (not preview) version.
GRAPH_EXTENSION = re.compile(r"br:mcr\.microsoft\.com/bicep/extensions/microsoftgraph/v1\.0:\d+\.\d+\.\d+")

# Types that take no tags.
UNTAGGED_TYPES = {
    "Microsoft.Authorization/roleAssignments",
    "Microsoft.Web/sites/config",
    "Microsoft.Web/sites/basicPublishingCredentialsPolicies",
}


# ---------------------------------------------------------------------------------------------------------------
# Parsing and walking the trees


@functools.cache
def _parser() -> BicepParser:
    return BicepParser()


@functools.cache
def _parse_text(text: str) -> Tree:
    return _parser().parse(text=text)


def bicep_files() -> list[Path]:
    return sorted(INFRA.rglob("*.bicep"))


def read_texts() -> dict[str, str]:
    return {path.relative_to(INFRA).as_posix(): path.read_text(encoding="utf-8") for path in bicep_files()}


def parse_all(texts: dict[str, str]) -> Trees:
    return {name: _parse_text(text) for name, text in texts.items()}


@functools.cache
def _trees() -> Trees:
    return parse_all(read_texts())


def is_ref(value: Any) -> bool:
    """An unquoted identifier (a parameter, variable or resource), as opposed to a string literal."""
    return isinstance(value, BicepElement)


def unquote(key: str) -> str:
    return key[1:-1] if key.startswith("'") and key.endswith("'") else key


def resource(tree: Tree, symbol: str) -> Tree:
    """A resource's body, looking through an ``if (...)`` condition."""
    config = tree["resources"][symbol]["config"]
    return config["config"] if "condition" in config and "config" in config else config


def resources(tree: Tree) -> Iterator[tuple[str, str, bool, Tree]]:
    for symbol, declaration in tree.get("resources", {}).items():
        yield symbol, declaration["type"], declaration["existing"], resource(tree, symbol)


def module_params(tree: Tree, symbol: str) -> Tree:
    config = tree["modules"][symbol]["config"]
    body = config["config"] if "condition" in config and "config" in config else config
    return body["params"]


def param_default(tree: Tree, name: str) -> Any:
    return tree["parameters"][name].get("default")


def expand(tree: Tree, value: Any, depth: int = 0) -> Iterator[Any]:
    """The values an expression can take: variables resolved, both branches of a conditional, union arguments."""
    assert depth < 20, "variables refer to each other in a loop"
    if is_ref(value) and value in tree.get("variables", {}):
        yield from expand(tree, tree["variables"][value]["value"], depth + 1)
    elif isinstance(value, dict) and "operator" in value and value["operator"]["type"] == "conditional":
        operands = value["operator"]["operands"]
        yield from expand(tree, operands["true_value"], depth + 1)
        yield from expand(tree, operands["false_value"], depth + 1)
    elif isinstance(value, dict) and "function" in value and value["function"]["type"] == "union":
        for argument in value["function"]["parameters"].values():
            yield from expand(tree, argument, depth + 1)
    else:
        yield value


def object_entries(tree: Tree, value: Any) -> dict[str, list[Any]]:
    """Every key an object expression can hold, with every value it can take there."""
    entries: dict[str, list[Any]] = {}
    for candidate in expand(tree, value):
        if isinstance(candidate, dict) and "function" not in candidate and "operator" not in candidate:
            for key, item in candidate.items():
                entries.setdefault(unquote(key), []).append(item)
    return entries


def function_args(value: Any, name: str) -> list[Any]:
    assert isinstance(value, dict) and "function" in value, f"expected a call of {name}, found {value!r}"
    assert value["function"]["type"] == name, f"expected a call of {name}, found {value['function']['type']}"
    return list(value["function"]["parameters"].values())


def dotted(value: Any) -> str:
    """A property chain such as ``identity.outputs.principalId`` as that text; anything else as its JSON."""
    if isinstance(value, dict) and value.get("operator", {}).get("type") == "property_accessor":
        operands = value["operator"]["operands"]
        return f"{dotted(operands['operand_1'])}.{dotted(operands['operand_2'])}"
    return str(value) if is_ref(value) else json.dumps(value)


def app_settings_value(trees: Trees) -> Any:
    """The expression assigned to the app's settings (the ``properties`` of its sites/config 'appsettings')."""
    api = trees[API]
    configs = [body for _, kind, _, body in resources(api) if kind == "Microsoft.Web/sites/config"]
    settings = [body for body in configs if body.get("name") == "appsettings"]
    assert len(settings) == 1, "api.bicep must declare exactly one sites/config 'appsettings' resource"
    return settings[0]["properties"]


def app_settings(trees: Trees) -> dict[str, list[Any]]:
    return object_entries(trees[API], app_settings_value(trees))


def only_value(entries: dict[str, list[Any]], name: str) -> Any:
    values = entries.get(name, [])
    assert len(values) == 1, f"app setting {name}: expected one value, found {values!r}"
    return values[0]


def function_app(trees: Trees) -> Tree:
    sites = [
        body for _, kind, existing, body in resources(trees[API]) if kind == "Microsoft.Web/sites" and not existing
    ]
    assert len(sites) == 1, "api.bicep must declare exactly one function app"
    return sites[0]


# ---------------------------------------------------------------------------------------------------------------
# Checks (each takes the parse trees, so that it can also run on a mutated copy)


def check_settings_match_the_code(trees: Trees) -> None:
    names = set(app_settings(trees))
    expected = set(SETTING_NAMES) - NOT_IN_AZURE
    unread = sorted(names - expected - PLATFORM_SETTINGS)
    assert names - PLATFORM_SETTINGS == expected, f"missing in Bicep: {sorted(expected - names)}; unread: {unread}"
    assert names >= PLATFORM_SETTINGS, f"missing: {sorted(PLATFORM_SETTINGS - names)}"


def check_storage_settings_use_the_identity(trees: Trees) -> None:
    entries = app_settings(trees)
    assert only_value(entries, "AzureWebJobsStorage__credential") == "managedidentity"
    assert only_value(entries, "AzureWebJobsStorage__clientId") == "identityClientId"
    assert only_value(entries, "AZURE_CLIENT_ID") == "identityClientId"
    for kind in ("blob", "queue", "table"):
        uri = only_value(entries, f"AzureWebJobsStorage__{kind}ServiceUri")
        chain = json.dumps(uri)
        assert "primaryEndpoints" in chain and f'"{kind}"' in chain, f"{kind} URI must come from the account: {uri}"
    auth = only_value(entries, "APPLICATIONINSIGHTS_AUTHENTICATION_STRING")
    assert auth == "Authorization=AAD;ClientId=${identityClientId}", auth
    assert not FORBIDDEN_SETTINGS & set(entries), f"settings not allowed in Azure: {FORBIDDEN_SETTINGS & set(entries)}"


def check_secrets_only_as_key_vault_references(trees: Trees) -> None:
    entries = app_settings(trees)
    secret_like = [
        name
        for name in entries
        if re.search(r"SECRET|PASSWORD|ACCOUNT_?KEY|TOKEN", name, re.IGNORECASE) and name not in SECRET_NAME_SETTINGS
    ]
    assert "ENTRA_CLIENT_SECRET" in secret_like, "secret mode must still be possible"
    for name in secret_like:
        assert entries[name], f"{name} is listed without a value"
        for value in entries[name]:
            assert isinstance(value, str) and not is_ref(value), f"{name} must be a literal Key Vault reference"
            assert value.startswith("@Microsoft.KeyVault("), f"{name} is not a Key Vault reference: {value}"
    # The expiry check reads the very secret the reference resolves, and only where there is one.
    reference = only_value(entries, "ENTRA_CLIENT_SECRET")
    secret_name = only_value(entries, "ENTRA_CLIENT_SECRET_NAME")
    assert is_ref(secret_name), f"ENTRA_CLIENT_SECRET_NAME must be the secret-name parameter, found {secret_name!r}"
    assert f"SecretName=${{{secret_name}}})" in reference, f"{reference} does not resolve the secret {secret_name}"
    for candidate in expand(trees[API], app_settings_value(trees)):
        if isinstance(candidate, dict) and {"ENTRA_CLIENT_SECRET", "ENTRA_CLIENT_SECRET_NAME"} & set(candidate):
            assert {"ENTRA_CLIENT_SECRET", "ENTRA_CLIENT_SECRET_NAME"} <= set(candidate), "set both or neither"
    # Default mode: no secret at all, the federated credential of the managed identity.
    main = trees[MAIN]
    assert param_default(main, "entraCredentialMode") == "federated"
    passed = module_params(main, "api")["entraClientSecretName"]
    branches = list(expand(main, passed))
    assert "" in branches, "federated mode must pass an empty secret name (no ENTRA_CLIENT_SECRET setting)"
    reference_identity = function_app(trees)["properties"].get("keyVaultReferenceIdentity")
    assert reference_identity == "identityId", "Key Vault references must resolve with the user-assigned identity"


def check_storage_account(trees: Trees) -> None:
    main = trees[MAIN]
    declaration = main["modules"]["storage"]
    assert declaration["detail"]["path"] == "avm/res/storage/storage-account"
    assert re.fullmatch(r"\d+\.\d+\.\d+", declaration["detail"]["tag"]), "pin the module version"
    params = module_params(main, "storage")
    assert params.get("allowSharedKeyAccess") is False, "shared key access must be disabled"
    assert params.get("allowBlobPublicAccess") is False, "public blob access must be disabled"
    assert params.get("minimumTlsVersion") == "TLS1_2"
    assert params.get("supportsHttpsTrafficOnly") is True

    def names(items: list[Tree]) -> set[str]:
        found = set()
        for item in items:
            name = item["name"]
            if is_ref(name) and name in main["parameters"]:
                name = param_default(main, name)
            elif is_ref(name):
                name = main["variables"][name]["value"]
            found.add(name)
        return found

    containers = params["blobServices"]["containers"]
    assert {"raw-mail", "mailbox-leases"} <= names(containers), names(containers)
    # The deployment package container is the one the function app is told to read.
    assert "deploymentContainerName" in [item["name"] for item in containers]
    assert module_params(main, "api")["deploymentContainerName"] == "deploymentContainerName"
    assert names(params["queueServices"]["queues"]) == {"incoming-mail", "collect-work"}
    assert names(params["tableServices"]["tables"]) == {"mailboxes", "consentflows"}


def check_flex_function_app(trees: Trees) -> None:
    api = trees[API]
    plans = [body for _, kind, _, body in resources(api) if kind == "Microsoft.Web/serverfarms"]
    assert len(plans) == 1
    assert plans[0]["sku"] == {"tier": "FlexConsumption", "name": "FC1"}
    assert plans[0]["properties"]["reserved"] is True, "Linux plan"
    site = function_app(trees)
    assert site["kind"] == "functionapp,linux"
    assert site["identity"]["type"] == "UserAssigned"
    properties = site["properties"]
    assert properties["httpsOnly"] is True
    assert properties["siteConfig"]["minTlsVersion"] == "1.2"
    config = properties["functionAppConfig"]
    assert config["runtime"] == {"name": "python", "version": "3.11"}
    storage = config["deployment"]["storage"]
    assert storage["type"] == "blobContainer"
    assert storage["authentication"] == {"type": "UserAssignedIdentity", "userAssignedIdentityResourceId": "identityId"}
    tags = object_entries(api, site["tags"])
    assert tags.get("azd-service-name") == ["api"], "azd finds the service by this tag"


def check_no_keys_anywhere(texts: dict[str, str]) -> None:
    for name, text in texts.items():
        code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("//"))
        for pattern in (
            r"\.list\w*\(",
            r"\blist\w*\(",
            r"AccountKey\s*=",
            r"SharedAccessSignature",
            r"connectionString\s*:",
        ):
            assert not re.search(pattern, code, re.IGNORECASE), f"{name} uses {pattern}"


def check_key_vault(trees: Trees) -> None:
    vaults = [body for _, kind, existing, body in resources(trees[KEYVAULT]) if kind == VAULT and not existing]
    assert len(vaults) == 1
    properties = vaults[0]["properties"]
    assert properties["enableRbacAuthorization"] is True, "RBAC, no access policies"
    assert properties["enableSoftDelete"] is True
    assert "accessPolicies" not in properties
    purge = properties.get("enablePurgeProtection")
    assert isinstance(purge, dict) and purge.get("operator", {}).get("type") == "conditional", purge
    operands = purge["operator"]["operands"]
    assert operands["true_value"] is True and operands["false_value"] is None, "off must be absent, not false"
    assert module_params(trees[MAIN], "keyVault")["enablePurgeProtection"] == "keyVaultPurgeProtection"


def check_monitoring_without_local_auth(trees: Trees) -> None:
    monitoring = trees[MONITORING]
    components = [body for _, kind, _, body in resources(monitoring) if kind == INSIGHTS]
    workspaces = [body for _, kind, _, body in resources(monitoring) if kind.endswith("/workspaces")]
    assert len(components) == 1 and len(workspaces) == 1
    assert components[0]["properties"].get("DisableLocalAuth") is True
    assert workspaces[0]["properties"].get("features", {}).get("disableLocalAuth") is True


def role_assignments(trees: Trees) -> list[tuple[str, str, str, bool]]:
    """(principal parameter, role name, scope type, conditional) for every assignment in rbac.bicep."""
    rbac = trees[RBAC]
    roles = rbac["variables"]["roles"]["value"]
    scopes = {symbol: kind for symbol, kind, existing, _ in resources(rbac) if existing}
    found = []
    for symbol, declaration in rbac["resources"].items():
        if declaration["type"] != "Microsoft.Authorization/roleAssignments":
            continue
        body = resource(rbac, symbol)
        assert is_ref(body.get("scope")) and body["scope"] in scopes, f"{symbol}: scope must be a declared resource"
        properties = body["properties"]
        definition = function_args(properties["roleDefinitionId"], "subscription_resource_id")
        assert definition[0] == "Microsoft.Authorization/roleDefinitions", symbol
        role = dotted(definition[1])
        assert role.startswith("roles."), f"{symbol}: name the role through the commented roles variable"
        guid = roles[role.removeprefix("roles.")]
        assert guid in ROLE_NAMES, f"{symbol}: unexpected role {guid}"
        principal = properties["principalId"]
        name = [dotted(part) for part in function_args(body["name"], "guid")]
        assert name == [f"{body['scope']}.id", principal, role], (
            f"{symbol}: name must be guid(scope.id, principal, role)"
        )
        conditional = "condition" in rbac["resources"][symbol]["config"]
        found.append((str(principal), ROLE_NAMES[guid], scopes[body["scope"]], conditional))
    return found


def check_role_assignments(trees: Trees) -> None:
    assignments = role_assignments(trees)
    app = {(role, scope) for principal, role, scope, conditional in assignments if principal == "appPrincipalId"}
    assert app == APP_ROLES, f"app identity: missing {APP_ROLES - app}, extra {app - APP_ROLES}"
    user = [
        (role, scope, conditional)
        for principal, role, scope, conditional in assignments
        if principal != "appPrincipalId"
    ]
    assert {(role, scope) for role, scope, _ in user} == USER_ROLES
    assert all(conditional for _, _, conditional in user), "the deploying user's roles are optional"
    params = module_params(trees[MAIN], "rbac")
    assert dotted(params["appPrincipalId"]) == "identity.outputs.principalId"
    assert params["userPrincipalId"] == "principalId"
    for scope in ("storageAccountName", "keyVaultName", "appInsightsName"):
        assert dotted(params[scope]).endswith((".outputs.name", ".outputs.appInsightsName")), scope


def check_role_comments(texts: dict[str, str]) -> None:
    text = texts[RBAC]
    for guid, name in ROLE_NAMES.items():
        lines = [line for line in text.splitlines() if guid in line]
        assert lines, f"{name} ({guid}) is not in rbac.bicep"
        assert all(f"// {name}" in line for line in lines), f"{guid} must be named in a comment: // {name}"


def check_outputs(trees: Trees) -> None:
    outputs = trees[MAIN]["outputs"]
    assert set(outputs) >= AZD_OUTPUTS, f"missing outputs: {sorted(AZD_OUTPUTS - set(outputs))}"
    assert all(re.fullmatch(r"[A-Z][A-Z0-9_]*", name) for name in outputs), "azd outputs are UPPER_SNAKE"
    hook = "\n".join(
        (INFRA / "hooks" / name).read_text(encoding="utf-8") for name in ("postprovision.sh", "postdown.sh")
    )
    read = set(re.findall(r'env\["([A-Z_]+)"\]', hook)) | set(re.findall(r'value\("([A-Z_]+)"', hook))
    read |= set(re.findall(r'env\.get\("([A-Z_]+)"', hook))
    read |= set(re.findall(r"\$\{([A-Z_]+)[:}]", hook))
    # Set by azd itself, or by the admin with `azd env set` for the hooks alone.
    azd_inputs = {"AZURE_ENV_NAME", "FIRST_MAILBOX"}
    assert read - azd_inputs <= set(outputs), (
        f"the hook reads what main.bicep does not output: {read - azd_inputs - set(outputs)}"
    )


def check_tags(trees: Trees) -> None:
    main = trees[MAIN]
    assert main["variables"]["tags"]["value"] == {"'azd-env-name'": "environmentName"}
    assert resource(main, "rg")["tags"] == "tags"
    for symbol, declaration in main["modules"].items():
        if declaration["type"] == "local":
            takes_tags = "tags" in trees[declaration["detail"]["path"]].get("parameters", {})
        else:
            takes_tags = True  # every Azure Verified Module has a tags parameter
        if takes_tags:
            assert module_params(main, symbol).get("tags") == "tags", f"module {symbol} must get the azd tags"
    for name, tree in trees.items():
        for symbol, kind, existing, body in resources(tree):
            if existing or kind in UNTAGGED_TYPES or kind.startswith("Microsoft.Graph/"):
                continue
            tags = body.get("tags")
            assert tags is not None, f"{name}: {symbol} has no tags"
            assert tags == "tags" or "tags" in json.dumps(tags), f"{name}: {symbol} must carry the azd tags"


ALERT_FIELDS = ("outcome", "consecutive_failures", "credential_expires_in_days", "hours_since_success", "mode")


def check_alerts(trees: Trees) -> None:
    alerts = trees[ALERTS]
    rules = {
        symbol: body for symbol, kind, _, body in resources(alerts) if kind == "Microsoft.Insights/scheduledQueryRules"
    }
    queries = {}
    for symbol, body in rules.items():
        criterion = body["properties"]["criteria"]["allOf"][0]
        queries[symbol] = (alerts["variables"][criterion["query"]]["value"], criterion)
        assert body["properties"]["scopes"] == ["appInsightsId"], symbol
        assert body["properties"]["actions"]["actionGroups"], f"{symbol} notifies nobody"
    # Each query reads its field with extract (see tests/unit/test_alert_queries.py for what they find).
    fields = {
        symbol: [f for f in re.findall(r"\b([a-z_]+)=\(", query) if f in ALERT_FIELDS]
        for symbol, (query, _) in queries.items()
    }
    assert sorted(field for found in fields.values() for field in set(found)) == sorted(ALERT_FIELDS), fields
    by_field = {field: queries[symbol][1] for symbol, found in fields.items() for field in set(found)}
    assert by_field["consecutive_failures"]["threshold"] == "consecutiveFailureThreshold"
    assert by_field["consecutive_failures"]["operator"] == "GreaterThanOrEqual"
    assert by_field["credential_expires_in_days"]["threshold"] == "credentialExpiryWarningDays"
    assert by_field["credential_expires_in_days"]["operator"] == "LessThanOrEqual"
    assert by_field["hours_since_success"]["threshold"] == "notCollectedHours"
    assert by_field["hours_since_success"]["operator"] == "GreaterThanOrEqual"
    # The heartbeat fires on the absence of the run line: fewer than one in three schedule periods.
    assert (by_field["mode"]["operator"], by_field["mode"]["threshold"]) == ("LessThan", 1)
    assert "dimensions" not in by_field["mode"]  # an absent line names no mailbox to split by
    assert rules["heartbeat"]["properties"]["windowSize"] == "PT${heartbeatWindowMinutes}M"
    groups = [body for _, kind, _, body in resources(alerts) if kind == "Microsoft.Insights/actionGroups"]
    assert len(groups) == 1
    assert dotted(module_params(trees[MAIN], "alerts")["appInsightsId"]) == "monitoring.outputs.appInsightsId"


# ---------------------------------------------------------------------------------------------------------------
# The Entra app registration (ENTRA_APP_MODE=create), declared with the Microsoft Graph extension


def graph_resources(trees: Trees, kind: str) -> list[tuple[str, Tree, bool]]:
    """(symbol, body, conditional) of every non-existing resource of one Microsoft.Graph type in entra.bicep."""
    entra = trees[ENTRA]
    found = []
    for symbol, declaration in entra["resources"].items():
        # pycep keeps the API version in a nested child's type (".../federatedIdentityCredentials@v1.0").
        if declaration["type"].split("@")[0] == kind and not declaration["existing"]:
            found.append((symbol, resource(entra, symbol), "condition" in declaration["config"]))
    return found


def only_graph_resource(trees: Trees, kind: str) -> tuple[str, Tree, bool]:
    found = graph_resources(trees, kind)
    assert len(found) == 1, f"entra.bicep must declare exactly one {kind}, found {[symbol for symbol, _, _ in found]}"
    return found[0]


def existing_principal(trees: Trees, symbol: str) -> str:
    """The appId of an `existing` service principal, resolved through the variables."""
    entra = trees[ENTRA]
    declaration = entra["resources"].get(symbol)
    assert declaration and declaration["existing"], f"{symbol} must be an existing service principal"
    assert declaration["type"] == "Microsoft.Graph/servicePrincipals", symbol
    (app_id,) = expand(entra, resource(entra, symbol)["appId"])
    return str(app_id)


def condition_of(tree: Tree, symbol: str, kind: str = "resources") -> Any:
    config = tree[kind][symbol]["config"]
    return config.get("condition")


def entra_module(trees: Trees) -> Tree:
    main = trees[MAIN]
    declaration = main["modules"].get("entraApp")
    assert declaration and declaration["detail"]["path"] == ENTRA, "main.bicep must deploy app/entra.bicep"
    return module_params(main, "entraApp")


def conditional(value: Any) -> Tree:
    """The operands of a ``condition ? a : b`` expression; a failure for anything else."""
    assert isinstance(value, dict) and value.get("operator", {}).get("type") == "conditional", f"not a ?: {value!r}"
    operands: Tree = value["operator"]["operands"]
    return operands


def check_app_mode(trees: Trees) -> None:
    main = trees[MAIN]
    mode = main["parameters"]["entraAppMode"]
    allowed = next(d["argument"] for d in mode["decorators"] if d["type"] == "allowed")
    assert sorted(allowed) == ["", "create", "existing"], allowed
    assert mode.get("default") == "", "the mode resolves from entraClientId unless it is set"
    # Empty resolves to create without a client id, to existing with one (an existing deployment keeps its app).
    resolved = conditional(main["variables"]["appMode"]["value"])
    assert resolved["condition"] == {"function": {"type": "empty", "parameters": {"item_to_test": "entraAppMode"}}}
    inner = conditional(resolved["true_value"])
    assert inner["condition"]["function"]["parameters"]["item_to_test"] == "entraClientId"
    assert (inner["true_value"], inner["false_value"]) == ("create", "existing")
    assert main["variables"]["createApp"]["value"] == {
        "operator": {"type": "equals", "operands": {"operand_1": "appMode", "operand_2": "create"}}
    }
    assert condition_of(main, "entraApp", "modules") == "createApp", "the registration is created in create mode only"
    outputs = main["outputs"]
    assert outputs["ENTRA_APP_MODE"]["value"] == "appMode", "azd must keep the resolved mode for the next run"
    unique = conditional(outputs["ENTRA_APP_UNIQUE_NAME"]["value"])
    assert (unique["condition"], unique["true_value"], unique["false_value"]) == ("createApp", "entraAppUniqueName", "")
    assert "${resourceToken}" in main["variables"]["entraAppUniqueName"]["value"], "one registration per environment"
    assert entra_module(trees)["uniqueName"] == "entraAppUniqueName"
    assert only_graph_resource(trees, "Microsoft.Graph/applications")[1]["uniqueName"] == "uniqueName"


def check_settings_in_both_modes(trees: Trees) -> None:
    main = trees[MAIN]
    passed = module_params(main, "api")["entraClientId"]
    assert passed == "effectiveClientId", f"the app's ENTRA_CLIENT_ID must follow the mode, found {passed!r}"
    branches = [dotted(value) for value in expand(main, passed)]
    assert sorted(branches) == ["entraApp.outputs.clientId", "entraClientId"], branches
    assert conditional(main["variables"]["effectiveClientId"]["value"])["condition"] == "createApp"
    assert main["outputs"]["ENTRA_CLIENT_ID"]["value"] == "effectiveClientId"
    # Every other setting the app reads is the same in both modes: nothing else passed to the app depends on it.
    for name, value in module_params(main, "api").items():
        if name != "entraClientId":
            assert "createApp" not in json.dumps(value) and "entraApp" not in json.dumps(value), name
    assert only_value(app_settings(trees), "ENTRA_CLIENT_ID") == "entraClientId"
    assert trees[ENTRA]["outputs"]["clientId"]["value"] == {
        "operator": {"type": "property_accessor", "operands": {"operand_1": "app", "operand_2": "appId"}}
    }


def check_app_registration(trees: Trees) -> None:
    _, app, is_conditional = only_graph_resource(trees, "Microsoft.Graph/applications")
    assert not is_conditional
    assert app["displayName"] == "displayName"
    web = app["web"]
    assert web["redirectUris"] == "redirectUris"
    assert web["implicitGrantSettings"] == {"enableAccessTokenIssuance": False, "enableIdTokenIssuance": False}
    assert app["signInAudience"] == "signInAudience"
    params = entra_module(trees)
    audience = conditional(params["signInAudience"])
    assert audience == {"condition": "crossTenant", "true_value": "AzureADMultipleOrgs", "false_value": "AzureADMyOrg"}
    assert app["tags"] == "appTags" and "azd-env-name:${environmentName}" in params["appTags"]
    _, principal, is_conditional = only_graph_resource(trees, "Microsoft.Graph/servicePrincipals")
    assert not is_conditional
    assert dotted(principal["appId"]) == "app.appId", "the enterprise application of this registration"
    main = trees[MAIN]
    assert conditional(main["outputs"]["ENTRA_SERVICE_PRINCIPAL_ID"]["value"])["true_value"] == {
        "operator": {
            "type": "property_accessor",
            "operands": {
                "operand_1": "entraApp",
                "operand_2": {
                    "operator": {
                        "type": "property_accessor",
                        "operands": {"operand_1": "outputs", "operand_2": "servicePrincipalId"},
                    }
                },
            },
        }
    }
    cross = main["variables"]["crossTenant"]["value"]["operator"]
    assert cross["type"] == "not_equals", cross
    assert json.dumps(cross["operands"]).count("tenant") >= 2, "compare the mailboxes' tenant with the deployment's"


def check_federated_credential(trees: Trees) -> None:
    symbol, credential, is_conditional = only_graph_resource(
        trees, "Microsoft.Graph/applications/federatedIdentityCredentials"
    )
    assert is_conditional and condition_of(trees[ENTRA], symbol) == "trustManagedIdentity"
    assert credential["name"].startswith("${app.uniqueName}/"), "a child of a Graph resource needs its full name"
    assert credential["subject"] == "managedIdentityPrincipalId"
    assert credential["issuer"] == "issuer"
    assert credential["audiences"] == ["federatedAudience"]
    params = entra_module(trees)
    # The subject is the identity's principal (object) id: its client id is the classic mistake (AADSTS700213).
    assert dotted(params["managedIdentityPrincipalId"]) == "identity.outputs.principalId"
    # The issuer is the tenant of the identity (the deployment), even when the mailboxes live in another tenant.
    assert params["issuer"] == "${environment().authentication.loginEndpoint}${tenant().tenantId}/v2.0"
    assert params["trustManagedIdentity"] == {"operator": {"type": "not", "operands": {"bool_value": "useSecret"}}}
    audiences = trees[MAIN]["variables"]["federatedAudiences"]["value"]
    assert audiences["AzureCloud"] == "api://AzureADTokenExchange", audiences
    audience = params["federatedAudience"]
    assert isinstance(audience, dict) and "federatedAudiences" in json.dumps(audience), audience


def check_permission_ids(trees: Trees) -> None:
    entra = trees[ENTRA]
    variables = entra["variables"]
    assert variables["graphAppId"]["value"] == GRAPH_APP_ID
    assert variables["exchangeOnlineAppId"]["value"] == EXCHANGE_ONLINE_APP_ID
    delegated = variables["graphDelegated"]["value"]
    assert {item["id"] for item in delegated} == set(GRAPH_DELEGATED), "the five delegated Graph permissions"
    assert all(item["type"] == "Scope" for item in delegated)
    required = only_graph_resource(trees, "Microsoft.Graph/applications")[1]["requiredResourceAccess"]
    operands = conditional(required)
    assert operands["condition"] == "appOnly" and operands["false_value"] == "graphAccess", operands
    assert function_args(operands["true_value"], "concat") == ["graphAccess", "exchangeAppOnly"]
    assert variables["graphAccess"]["value"] == [{"resourceAppId": "graphAppId", "resourceAccess": "graphDelegated"}]
    app_only = variables["exchangeAppOnly"]["value"]
    assert app_only == [
        {"resourceAppId": "exchangeOnlineAppId", "resourceAccess": [{"id": "imapAccessAsAppRoleId", "type": "Role"}]}
    ]
    assert variables["imapAccessAsAppRoleId"]["value"] == IMAP_ACCESS_AS_APP, "IMAP.AccessAsApp of Exchange Online"
    assert existing_principal(trees, "graph") == GRAPH_APP_ID
    assert existing_principal(trees, "exchangeOnline") == EXCHANGE_ONLINE_APP_ID


def check_permission_comments(texts: dict[str, str]) -> None:
    text = texts[ENTRA]
    for guid, name in {**GRAPH_DELEGATED, IMAP_ACCESS_AS_APP: "IMAP.AccessAsApp"}.items():
        lines = [line for line in text.splitlines() if f"'{guid}'" in line]
        assert lines, f"{name} ({guid}) is not in entra.bicep"
        assert all(line.rstrip().endswith(f"// {name}") for line in lines), f"{guid} must be named: // {name}"


def check_admin_consent(trees: Trees) -> None:
    entra = trees[ENTRA]
    grants = {
        symbol: (body, is_conditional)
        for symbol, body, is_conditional in graph_resources(trees, "Microsoft.Graph/oauth2PermissionGrants")
    }
    by_resource = {}
    for symbol, (body, is_conditional) in grants.items():
        assert is_conditional and condition_of(entra, symbol) == "grantTenantWideConsent", symbol
        assert dotted(body["clientId"]) == "servicePrincipal.id", f"{symbol}: the client is the enterprise application"
        assert body["consentType"] == "AllPrincipals", f"{symbol}: consent for the whole tenant"
        (scope,) = expand(entra, body["scope"])
        by_resource[dotted(body["resourceId"])] = set(str(scope).split())
    assert by_resource.get("graph.id") == set(GRAPH_DELEGATED.values()), by_resource
    assert by_resource.get("exchangeOnline.id") == {"IMAP.AccessAsUser.All"}, by_resource
    assert entra_module(trees)["grantTenantWideConsent"] == {
        "operator": {"type": "not", "operands": {"bool_value": "crossTenant"}}
    }, "a grant made here would land in the wrong tenant when the mailboxes live elsewhere"


def check_app_only_role(trees: Trees) -> None:
    symbol, assignment, is_conditional = only_graph_resource(trees, "Microsoft.Graph/appRoleAssignedTo")
    assert is_conditional and "appOnly" in json.dumps(condition_of(trees[ENTRA], symbol))
    (role,) = expand(trees[ENTRA], assignment["appRoleId"])
    assert role == IMAP_ACCESS_AS_APP
    assert dotted(assignment["principalId"]) == "servicePrincipal.id"
    assert dotted(assignment["resourceId"]) == "exchangeOnline.id", "the role belongs to Office 365 Exchange Online"
    assert entra_module(trees)["appOnly"] == "entraAppOnly"


def check_redirect_uris(trees: Trees) -> None:
    main = trees[MAIN]
    host = json.loads((ROOT / "host.json").read_text(encoding="utf-8"))
    prefix = host.get("extensions", {}).get("http", {}).get("routePrefix", "api")
    path = f"/{prefix}/{CALLBACK_ROUTE}"
    deployed = conditional(main["variables"]["redirectUri"]["value"])["true_value"]
    assert deployed == f"https://${{functionAppName}}.azurewebsites.net{path}", deployed
    assert main["variables"]["localRedirectUri"]["value"] == f"http://localhost:7071{path}"
    uris = conditional(entra_module(trees)["redirectUris"])
    assert uris == {
        "condition": "entraLocalRedirectUri",
        "true_value": ["redirectUri", "localRedirectUri"],
        "false_value": ["redirectUri"],
    }, uris
    assert module_params(main, "api")["entraRedirectUri"] == "redirectUri", "the app sends the URI it registered"


CHECKS: dict[str, Callable[[Trees], None]] = {
    "settings": check_settings_match_the_code,
    "storage settings": check_storage_settings_use_the_identity,
    "secrets": check_secrets_only_as_key_vault_references,
    "storage account": check_storage_account,
    "function app": check_flex_function_app,
    "key vault": check_key_vault,
    "monitoring": check_monitoring_without_local_auth,
    "roles": check_role_assignments,
    "outputs": check_outputs,
    "tags": check_tags,
    "alerts": check_alerts,
    "app mode": check_app_mode,
    "settings in both modes": check_settings_in_both_modes,
    "app registration": check_app_registration,
    "federated credential": check_federated_credential,
    "permission ids": check_permission_ids,
    "admin consent": check_admin_consent,
    "app-only role": check_app_only_role,
    "redirect uris": check_redirect_uris,
}
TEXT_CHECKS: dict[str, Callable[[dict[str, str]], None]] = {
    "no keys": check_no_keys_anywhere,
    "role comments": check_role_comments,
    "permission comments": check_permission_comments,
}


# ---------------------------------------------------------------------------------------------------------------
# Tests


def test_every_bicep_file_parses() -> None:
    files = bicep_files()
    assert {f"{INFRA.name}/{name}" for name in (MAIN, API, RBAC, KEYVAULT, MONITORING, ALERTS, ENTRA)} <= {
        path.relative_to(ROOT).as_posix() for path in files
    }
    for path in files:
        tree = _parser().parse(text=path.read_text(encoding="utf-8"))
        assert tree.get("resources") or tree.get("modules"), f"{path.name} declares nothing"
    assert _trees()[MAIN]["globals"]["scope"]["value"] == "subscription"


def test_templates_reach_registries_only_through_aliases() -> None:
    # Modules come through Bicep's built-in br/public alias (Azure Verified Modules). The one extension, Microsoft
    # Graph, comes through the alias in bicepconfig.json: Bicep needs an extension's full registry address there (or
    # in the file), so that file alone names Microsoft's registry, pinned to a released version.
    config = json.loads((INFRA / "bicepconfig.json").read_text(encoding="utf-8"))
    assert config == {"extensions": {"microsoftGraphV1": config["extensions"]["microsoftGraphV1"]}}, config
    assert GRAPH_EXTENSION.fullmatch(config["extensions"]["microsoftGraphV1"]), config
    files = [path for path in sorted(INFRA.rglob("*")) if path.suffix in {".bicep", ".json"}]
    for path in files:
        if path.name == "bicepconfig.json":
            continue
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"\bbr:|mcr\.microsoft\.com|^\s*import\s", text, re.MULTILINE), (
            f"{path.name} names a registry"
        )
        for line in re.findall(r"^\s*(?:extension|provider)\b.*$", text, re.MULTILINE):
            assert line.strip() == "extension microsoftGraphV1", (
                f"{path.name}: {line.strip()!r} is not the configured alias"
            )
    trees = _trees()
    declared = {name for name, tree in trees.items() if tree.get("extensions")}
    graph_users = {
        name
        for name, tree in trees.items()
        if any(declaration["type"].startswith("Microsoft.Graph/") for declaration in tree.get("resources", {}).values())
    }
    assert declared == graph_users == {ENTRA}, (declared, graph_users)
    assert set(trees[ENTRA]["extensions"]) == {"microsoftGraphV1"}
    modules = [declaration for tree in trees.values() for declaration in tree.get("modules", {}).values()]
    remote = [declaration for declaration in modules if declaration["type"] != "local"]
    assert remote, "the Azure Verified Modules are gone from main.bicep"
    for declaration in remote:
        assert declaration["type"] == "bicep_registry_alias", declaration["detail"]
        assert declaration["detail"]["alias"] == "public", declaration["detail"]
        assert declaration["detail"]["path"].startswith("avm/res/"), declaration["detail"]


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_infra_check(name: str) -> None:
    CHECKS[name](_trees())


@pytest.mark.parametrize("name", sorted(TEXT_CHECKS))
def test_infra_text_check(name: str) -> None:
    TEXT_CHECKS[name](read_texts())


# (check, file, text to remove or replace, replacement): each check must fail once its property is gone.
MUTATIONS = [
    ("settings", API, "  MAIL_QUEUE_NAME: mailQueueName\n", ""),
    ("settings", API, "  ENTRA_CLIENT_SECRET: '@Microsoft", "  OTHER_NAME: '@Microsoft"),
    ("settings", API, "  APPLICATIONINSIGHTS_AUTHENTICATION_STRING:", "  APPINSIGHTS_AUTH:"),
    (
        "storage settings",
        API,
        "AzureWebJobsStorage__credential: 'managedidentity'",
        "AzureWebJobsStorage__credential: 'x'",
    ),
    ("storage settings", API, "  IMAP_SCOPE: imapScope\n", "  IMAP_SCOPE: imapScope\n  TLS_CA_BUNDLE: 'ca.pem'\n"),
    ("secrets", API, "ENTRA_CLIENT_SECRET: '@Microsoft.KeyVault(VaultName=", "ENTRA_CLIENT_SECRET: 'plain-"),
    ("secrets", API, "GLPI_USER_TOKEN: '@Microsoft.KeyVault(VaultName=", "GLPI_USER_TOKEN: 'plain-"),
    (
        "secrets",
        MAIN,
        "    entraClientSecretName: useSecret ? entraClientSecretName : ''\n",
        "    entraClientSecretName: 'x'\n",
    ),
    ("secrets", API, "    keyVaultReferenceIdentity: identityId\n", ""),
    ("secrets", API, "  ENTRA_CLIENT_SECRET_NAME: entraClientSecretName\n", "  ENTRA_CLIENT_SECRET_NAME: 'entra'\n"),
    ("secrets", API, "SecretName=${entraClientSecretName})", "SecretName=entra-client-secret)"),
    ("storage account", MAIN, "    allowSharedKeyAccess: false\n", ""),
    ("storage account", MAIN, "    allowBlobPublicAccess: false\n", "    allowBlobPublicAccess: true\n"),
    ("storage account", MAIN, "    minimumTlsVersion: 'TLS1_2'\n", ""),
    ("storage account", MAIN, "          name: leaseContainerName\n", "          name: 'other'\n"),
    ("storage account", MAIN, "          name: workQueueName\n", "          name: 'other'\n"),
    ("storage account", MAIN, "          name: consentTableName\n", "          name: 'other'\n"),
    ("function app", API, "    name: 'FC1'\n", "    name: 'Y1'\n"),
    ("function app", API, "        version: '3.11'\n", "        version: '3.12'\n"),
    ("function app", API, "    'azd-service-name': 'api'\n", "    'azd-service-name': 'web'\n"),
    (
        "function app",
        API,
        "            type: 'UserAssignedIdentity'\n",
        "            type: 'StorageAccountConnectionString'\n",
    ),
    ("key vault", KEYVAULT, "    enableRbacAuthorization: true\n", "    enableRbacAuthorization: false\n"),
    ("key vault", KEYVAULT, "enablePurgeProtection ? true : null", "enablePurgeProtection"),
    ("monitoring", MONITORING, "    DisableLocalAuth: true\n", ""),
    (
        "roles",
        RBAC,
        "scope: keyVault\n  properties: {\n    roleDefinitionId: subscriptionResourceId("
        "'Microsoft.Authorization/roleDefinitions', roles.keyVaultSecretsOfficer)\n    principalId: appPrincipalId",
        "scope: storageAccount\n  properties: {\n    roleDefinitionId: subscriptionResourceId("
        "'Microsoft.Authorization/roleDefinitions', roles.keyVaultSecretsOfficer)\n    principalId: appPrincipalId",
    ),
    (
        "roles",
        RBAC,
        "roles.monitoringMetricsPublisher)\n    principalId: appPrincipalId",
        "roles.storageBlobDataContributor)\n    principalId: appPrincipalId",
    ),
    (
        "roles",
        RBAC,
        "name: guid(storageAccount.id, appPrincipalId, roles.storageBlobDataOwner)",
        "name: guid(storageAccount.id, roles.storageBlobDataOwner)",
    ),
    (
        "roles",
        RBAC,
        "'Microsoft.Authorization/roleAssignments@2022-04-01' = if (grantUser) {\n  name: guid(keyVault.id",
        "'Microsoft.Authorization/roleAssignments@2022-04-01' = {\n  name: guid(keyVault.id",
    ),
    ("outputs", MAIN, "output SERVICE_API_URI string", "output serviceApiUri string"),
    ("outputs", MAIN, "output AZURE_STORAGE_TABLE_ENDPOINT string", "output TABLE_ENDPOINT string"),
    ("tags", MAIN, "  'azd-env-name': environmentName\n", "  environment: environmentName\n"),
    (
        "tags",
        MONITORING,
        "  name: appInsightsName\n  location: location\n  tags: tags\n",
        "  name: appInsightsName\n  location: location\n",
    ),
    (
        "tags",
        MAIN,
        "    location: location\n    tags: tags\n    kind: 'StorageV2'\n",
        "    location: location\n    kind: 'StorageV2'\n",
    ),
    ("alerts", ALERTS, r"more=\w+ consecutive_failures=(", r"more=\w+ failures=("),
    ("alerts", ALERTS, "          threshold: consecutiveFailureThreshold\n", "          threshold: 1\n"),
    ("no keys", API, "  KEY_VAULT_URI: keyVaultUri\n", "  KEY_VAULT_URI: storageAccount.listKeys().keys[0].value\n"),
    ("no keys", API, "  IMAP_HOST: imapHost\n", "  IMAP_HOST: 'DefaultEndpointsProtocol=https;AccountKey=x'\n"),
    ("role comments", RBAC, "// Monitoring Metrics Publisher", "// publisher"),
    ("app mode", MAIN, "module entraApp 'app/entra.bicep' = if (createApp) {", "module entraApp 'app/entra.bicep' = {"),
    ("app mode", MAIN, "output ENTRA_APP_MODE string = appMode\n", "output ENTRA_APP_MODE string = entraAppMode\n"),
    ("app mode", MAIN, "(empty(entraClientId) ? 'create' : 'existing')", "'create'"),
    ("settings in both modes", MAIN, "    entraClientId: effectiveClientId\n", "    entraClientId: entraClientId\n"),
    (
        "settings in both modes",
        MAIN,
        "var effectiveClientId = createApp ? entraApp.outputs.clientId : entraClientId",
        "var effectiveClientId = entraApp.outputs.clientId",
    ),
    ("app registration", ENTRA, "      enableIdTokenIssuance: false\n", "      enableIdTokenIssuance: true\n"),
    (
        "app registration",
        MAIN,
        "signInAudience: crossTenant ? 'AzureADMultipleOrgs' : 'AzureADMyOrg'",
        "signInAudience: 'AzureADMyOrg'",
    ),
    ("app registration", ENTRA, "  appId: app.appId\n", "  appId: graphAppId\n"),
    (
        "federated credential",
        MAIN,
        "managedIdentityPrincipalId: identity.outputs.principalId",
        "managedIdentityPrincipalId: identity.outputs.clientId",
    ),
    ("federated credential", ENTRA, "    subject: managedIdentityPrincipalId\n", "    subject: uniqueName\n"),
    ("federated credential", MAIN, "${tenant().tenantId}/v2.0'", "${tenantId}/v2.0'"),
    (
        "federated credential",
        ENTRA,
        "'federatedIdentityCredentials@v1.0' = if (trustManagedIdentity) {",
        "'federatedIdentityCredentials@v1.0' = {",
    ),
    (
        "federated credential",
        MAIN,
        "AzureCloud: 'api://AzureADTokenExchange'",
        "AzureCloud: 'api://AzureADTokenExchangeUSGov'",
    ),
    # Exchange Online's own delegated IMAP.AccessAsUser.All id in place of Graph's, and EWS's full_access_as_app in
    # place of IMAP.AccessAsApp: the mix-ups that peers' issue trackers report.
    (
        "permission ids",
        ENTRA,
        "'652390e4-393a-48de-9484-05f9b1212954' // IMAP.AccessAsUser.All",
        "'195adc35-e27b-454b-a7ed-1ecdffa1c09f' // IMAP.AccessAsUser.All",
    ),
    ("permission ids", ENTRA, "'5e5addcd-3e8d-4e90-baf5-964efab2b20a'", "'dc890d15-9560-4a4c-9b7f-a736ec74ec40'"),
    (
        "permission ids",
        ENTRA,
        "requiredResourceAccess: appOnly ? concat(graphAccess, exchangeAppOnly) : graphAccess",
        "requiredResourceAccess: graphAccess",
    ),
    ("permission comments", ENTRA, "// offline_access\n", "// offline\n"),
    (
        "admin consent",
        ENTRA,
        "  resourceId: exchangeOnline.id\n  scope: exchangeDelegatedScope\n",
        "  resourceId: graph.id\n  scope: exchangeDelegatedScope\n",
    ),
    ("admin consent", ENTRA, "'IMAP.AccessAsUser.All offline_access openid email profile'", "'offline_access openid'"),
    ("admin consent", MAIN, "grantTenantWideConsent: !crossTenant", "grantTenantWideConsent: true"),
    (
        "app-only role",
        ENTRA,
        "  appRoleId: imapAccessAsAppRoleId\n",
        "  appRoleId: '00000000-0000-0000-0000-000000000000'\n",
    ),
    (
        "app-only role",
        ENTRA,
        "  principalId: servicePrincipal.id\n  resourceId: exchangeOnline.id\n",
        "  principalId: servicePrincipal.id\n  resourceId: graph.id\n",
    ),
    (
        "redirect uris",
        MAIN,
        "var localRedirectUri = 'http://localhost:7071/api/auth/callback'",
        "var localRedirectUri = 'http://localhost:7071/auth/callback'",
    ),
    ("redirect uris", MAIN, "azurewebsites.net/api/auth/callback'", "azurewebsites.net/api/callback'"),
    ("redirect uris", MAIN, "      redirectUri\n      localRedirectUri\n", "      redirectUri\n"),
]


@pytest.mark.parametrize(("check", "file", "old", "new"), MUTATIONS, ids=[f"{m[0]}:{m[2][:40]!r}" for m in MUTATIONS])
def test_check_fails_without_its_property(check: str, file: str, old: str, new: str) -> None:
    texts = read_texts()
    assert texts[file].count(old) == 1, f"the mutation no longer matches {file}: {old!r}"
    texts[file] = texts[file].replace(old, new)
    with pytest.raises(AssertionError):
        if check in TEXT_CHECKS:
            TEXT_CHECKS[check](texts)
        else:
            CHECKS[check](parse_all(texts))


def test_every_check_has_a_mutation_that_breaks_it() -> None:
    assert {mutation[0] for mutation in MUTATIONS} == set(CHECKS) | set(TEXT_CHECKS)


# ---------------------------------------------------------------------------------------------------------------
# The log fields the alerts query, as the collector writes them


def _log_formats() -> list[str]:
    source = "\n".join(path.read_text(encoding="utf-8") for path in sorted((ROOT / "collectors").glob("*.py")))
    return re.findall(r'"([^"\n]*mailbox=%s[^"\n]*)"', source)


def test_alert_fields_are_what_the_collector_logs() -> None:
    formats = _log_formats()
    assert any("outcome=%s" in f and "consecutive_failures=%d" in f for f in formats), formats
    from shared.errors import NeedsReconsentError

    # The outcome the re-consent alert looks for, as the log line writes it.
    assert f"{NeedsReconsentError.error_class}" == "needs_reconsent"


def _render(log_format: str, field: str, value: int) -> str:
    """A log line as %-formatting would write it, with ``value`` for the conversion that follows ``field``."""
    head, tail = log_format.split(field, 1)
    conversion = re.match(r"%[-+ 0#]*\d*([sdir])", tail)
    assert conversion, f"{field} is not followed by a %-conversion in {log_format!r}"
    assert conversion.group(1) in "di", f"{field} must be logged as a whole number (%d), found {conversion.group()}"
    others = {"s": "x", "r": "'x'", "d": "0", "i": "0"}

    def fill(text: str) -> str:
        return re.sub(r"%[-+ 0#]*\d*([sdir])", lambda m: others[m.group(1)], text.replace("%%", "%"))

    return f"{fill(head)}{field}{value}{fill(tail[conversion.end() :])}"


def test_credential_alert_reads_what_the_collector_logs() -> None:
    field = "credential_expires_in_days="
    source = "\n".join(path.read_text(encoding="utf-8") for path in sorted((ROOT / "collectors").glob("*.py")))
    formats = re.findall(rf'"([^"\n]*{field}[^"\n]*)"', source)
    assert formats, f"no log line in collectors/ writes {field}"
    query = kql.alert_queries(INFRA / ALERTS)["credentialQuery"]
    for log_format in formats:
        for days in (400, 29, 0, -3):
            line = _render(log_format, field, days)
            found = kql.run(query, [{"timestamp": "t", "message": line}])
            assert [r["credential_expires_in_days"] for r in found] == [days], f"the alert reads {found} from {line!r}"


# ---------------------------------------------------------------------------------------------------------------
# One set of setting names: local.settings.sample.json, the app settings in the Bicep, and shared/settings.py

SAMPLE = ROOT / "local.settings.sample.json"
SETTINGS_SOURCE = ROOT / "shared" / "settings.py"
READERS = {"_text", "_required", "_integer"}
# The Functions runtime's own settings: the runtime reads them, the app does not.
RUNTIME_SETTINGS = {"FUNCTIONS_WORKER_RUNTIME", "AzureWebJobsFeatureFlags"}
RUNTIME_PREFIX = "APPLICATIONINSIGHTS_"
# In SETTING_NAMES because the Functions host reads it (identity-based AzureWebJobsStorage); the app code does not.
# The per-function switch of the GLPI consumer is read by the Functions host as well.
READ_BY_THE_HOST_ONLY = {"AzureWebJobsStorage__credential", "AzureWebJobs.glpi_tickets.Disabled"}
NO_DEFAULT = object()


def app_names(names: Iterable[str]) -> set[str]:
    return {name for name in names if name not in RUNTIME_SETTINGS and not name.startswith(RUNTIME_PREFIX)}


def sample_values() -> dict[str, str]:
    document = json.loads(SAMPLE.read_text(encoding="utf-8"))
    assert document.get("IsEncrypted") is False
    values: dict[str, str] = document["Values"]
    return values


def _strings(node: ast.expr, scope: dict[str, list[str]]) -> list[str]:
    """Every string an expression can be, given the names that hold known strings; a failure for anything else."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.Name) and node.id in scope:
        return scope[node.id]
    if isinstance(node, ast.JoinedStr):
        combined = [""]
        for part in node.values:
            inner = part.value if isinstance(part, ast.FormattedValue) else part
            combined = [head + tail for head in combined for tail in _strings(inner, scope)]
        return combined
    raise AssertionError(f"shared/settings.py line {node.lineno}: cannot tell which setting {ast.unparse(node)} names")


def _known_strings(tree: ast.AST, outer: dict[str, list[str]]) -> dict[str, list[str]]:
    """Names bound to a string literal, or looped over a tuple or list of them, anywhere inside ``tree``."""
    scope = dict(outer)
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                scope[node.targets[0].id] = [node.value.value]
        elif isinstance(node, ast.For | ast.comprehension) and isinstance(node.target, ast.Name):
            items = node.iter.elts if isinstance(node.iter, ast.Tuple | ast.List) else []
            if items and all(isinstance(item, ast.Constant) and isinstance(item.value, str) for item in items):
                scope[node.target.id] = [item.value for item in items if isinstance(item, ast.Constant)]
    return scope


def settings_read_by_the_code() -> dict[str, object]:
    """Every setting shared/settings.py reads through its readers, with the default it falls back to."""
    module = ast.parse(SETTINGS_SOURCE.read_text(encoding="utf-8"))
    constants = {
        node.targets[0].id: node.value.value
        for node in module.body
        if isinstance(node, ast.Assign)
        and len(node.targets) == 1
        and isinstance(node.targets[0], ast.Name)
        and isinstance(node.value, ast.Constant)
    }
    read: dict[str, object] = {}
    # The readers pass their own ``name`` parameter on to each other; the settings are named by their callers.
    callers = [node for node in module.body if isinstance(node, ast.FunctionDef) and node.name not in READERS]
    for function in callers:
        scope = _known_strings(function, {})
        for call in ast.walk(function):
            if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id in READERS):
                continue
            assert len(call.args) >= 2, f"line {call.lineno}: {call.func.id}(env, NAME, ...) expected"
            default: object = NO_DEFAULT
            if call.func.id != "_required" and len(call.args) >= 3:
                given = call.args[2]
                if isinstance(given, ast.Name):
                    assert given.id in constants, f"line {call.lineno}: default {given.id} is not a module constant"
                    default = constants[given.id]
                else:
                    assert isinstance(given, ast.Constant), f"line {call.lineno}: default must be a literal"
                    default = given.value
            for name in _strings(call.args[1], scope):
                if name in read and read[name] is not NO_DEFAULT and default is not NO_DEFAULT:
                    assert read[name] == default, f"{name} is read with two defaults: {read[name]!r}, {default!r}"
                if read.get(name, NO_DEFAULT) is NO_DEFAULT:
                    read[name] = default
    assert read, "no reader call found in shared/settings.py"
    return read


def bicep_default(trees: Trees, setting: str) -> Any:
    """The default of the main.bicep parameter whose value the app setting carries."""
    value = only_value(app_settings(trees), setting)
    if isinstance(value, dict) and value.get("function", {}).get("type") == "string":
        (value,) = function_args(value, "string")
    assert is_ref(value) and value in trees[API]["parameters"], f"{setting} is not an api.bicep parameter: {value!r}"
    passed = module_params(trees[MAIN], "api")[value]
    assert is_ref(passed) and passed in trees[MAIN]["parameters"], f"{setting}: main.bicep passes {passed!r}"
    return param_default(trees[MAIN], passed)


def test_sample_bicep_and_code_name_the_same_settings() -> None:
    code = set(SETTING_NAMES)
    sample = app_names(sample_values())
    bicep = app_names(app_settings(_trees()))
    assert sample == code, f"sample lacks {sorted(code - sample)}; the code does not read {sorted(sample - code)}"
    assert bicep == code - NOT_IN_AZURE, (
        f"Bicep lacks {sorted(code - NOT_IN_AZURE - bicep)}; the code does not read {sorted(bicep - code)}"
    )
    assert set(LOCAL_ONLY_SETTINGS) <= code
    deploy = (ROOT / "docs" / "deploy.md").read_text(encoding="utf-8")
    undocumented = sorted(name for name in NOT_IN_AZURE if f"`{name}`" not in deploy)
    assert not undocumented, f"docs/deploy.md must say why these are not set in Azure: {undocumented}"


def test_every_setting_the_code_reads_is_declared() -> None:
    read = set(settings_read_by_the_code())
    assert {"AzureWebJobsStorage__blobServiceUri", "AzureWebJobsStorage__clientId", "KEY_VAULT_URI"} <= read
    assert read <= set(SETTING_NAMES), f"read but not in SETTING_NAMES: {sorted(read - set(SETTING_NAMES))}"
    assert set(SETTING_NAMES) - read == READ_BY_THE_HOST_ONLY, (
        f"in SETTING_NAMES but read nowhere: {sorted(set(SETTING_NAMES) - read - READ_BY_THE_HOST_ONLY)}"
    )


def test_sample_and_bicep_defaults_are_the_code_defaults() -> None:
    sample = sample_values()
    defaults = {name: value for name, value in settings_read_by_the_code().items() if value is not NO_DEFAULT}
    assert {"IMAP_PORT", "ENTRA_AUTHORITY_HOST", "MAIL_QUEUE_NAME"} <= set(defaults)
    for name, default in defaults.items():
        assert sample[name] == str(default), f"sample {name}={sample[name]!r}, the code's default is {default!r}"
        if name not in NOT_IN_AZURE:
            assert bicep_default(_trees(), name) == default, f"main.bicep's default for {name} is not {default!r}"


def test_sample_holds_placeholders_not_secrets() -> None:
    values = sample_values()
    assert {"ENTRA_CLIENT_ID", "MAIL_QUEUE_NAME"} <= set(values), "the sample's settings were not read"
    assert all(isinstance(value, str) for value in values.values()), "app settings are strings"
    for name, value in values.items():
        if re.search(r"SECRET|PASSWORD|KEY$", name, re.IGNORECASE) and name not in SECRET_NAME_SETTINGS:
            assert value.startswith("<") and value.endswith(">"), f"{name} must hold a placeholder, not a value"
        assert not re.search(r"AccountKey=|SharedAccessSignature=|sig=", value), f"{name} holds a key"
    assert "local.settings.json" in (ROOT / ".gitignore").read_text(encoding="utf-8").split()
    assert "local.settings.sample.json" not in (ROOT / ".gitignore").read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------------
# The files around the Bicep


def test_parameters_file_maps_to_declared_parameters() -> None:
    document = json.loads((INFRA / "main.parameters.json").read_text(encoding="utf-8"))
    declared = set(_trees()[MAIN]["parameters"])
    mapped = set(document["parameters"])
    assert mapped <= declared, f"parameters that main.bicep does not declare: {sorted(mapped - declared)}"
    required = {name for name, spec in _trees()[MAIN]["parameters"].items() if "default" not in spec}
    assert required <= mapped, f"required parameters without a value: {sorted(required - mapped)}"
    for name, spec in document["parameters"].items():
        assert re.fullmatch(r"\$\{[A-Z_]+(=[^}]*)?\}", spec["value"]), f"{name} must come from the azd environment"


def test_azure_yaml_declares_one_function_service_and_the_hooks() -> None:
    text = (ROOT / "azure.yaml").read_text(encoding="utf-8")
    services = text.split("services:", 1)[1].split("\nhooks:", 1)[0]
    assert re.findall(r"^  (\w+):$", services, re.MULTILINE) == ["api"]
    for line in ("    project: .", "    language: python", "    host: function"):
        assert line in services.splitlines()
    for hook in ("prepackage", "preprovision", "postprovision", "postdown"):
        assert f"\n  {hook}:\n" in text, f"azure.yaml lacks the {hook} hook"
        for script in (f"infra/hooks/{hook}.sh", f"infra/hooks/{hook}.ps1"):
            assert f"run: ./{script}" in text
            assert (ROOT / script).is_file()


def test_host_json_choices() -> None:
    host = json.loads((ROOT / "host.json").read_text(encoding="utf-8"))
    assert host["version"] == "2.0"
    assert host["extensionBundle"] == {"id": "Microsoft.Azure.Functions.ExtensionBundle", "version": "[4.*, 5.0.0)"}
    queues = host["extensions"]["queues"]
    assert queues["messageEncoding"] == "base64", "the app sends with TextBase64EncodePolicy"
    assert (queues["maxDequeueCount"], queues["batchSize"]) == (5, 4)
    excluded = set(host["logging"]["applicationInsights"]["samplingSettings"]["excludedTypes"].split(";"))
    assert {"Request", "Exception", "Trace"} <= excluded, "errors and the alerts' log lines are never sampled"
    assert host["logging"]["logLevel"]["Function"] == "Information", "the alerts read the app's Information lines"
    hours, minutes, seconds = (int(part) for part in host["functionTimeout"].split(":"))
    timeout = hours * 3600 + minutes * 60 + seconds
    budget = param_default(_trees()[MAIN], "collectTimeBudgetSeconds")
    assert budget < timeout, "a collector run must end well inside the function timeout"


def test_funcignore_keeps_local_files_out_of_the_package() -> None:
    entries = {line.strip() for line in (ROOT / ".funcignore").read_text(encoding="utf-8").splitlines() if line.strip()}
    needed = {"tests", "infra", "devstack", "bench", ".venv", ".stack", "scripts", "local.settings*.json", ".git*"}
    needed |= {"node_modules", "docs"}
    assert needed <= entries, f"missing: {sorted(needed - entries)}"
    shipped = {"function_app.py", "api", "collectors", "consumers", "shared", "host.json", "requirements.txt"}
    assert not shipped & entries
    # The app's bytecode ships (the prepackage hook compiles it, tests/unit/test_prepackage.py).
    assert not {"__pycache__", "*.pyc"} & entries


# ---------------------------------------------------------------------------------------------------------------
# The postprovision hook (POSIX), run for real in a copy of its folder layout

AZD_ENV = {
    "AZURE_ENV_NAME": "dev",
    "AZURE_STORAGE_BLOB_ENDPOINT": "https://stexample.blob.core.windows.net/",
    "AZURE_STORAGE_QUEUE_ENDPOINT": "https://stexample.queue.core.windows.net/",
    "AZURE_STORAGE_TABLE_ENDPOINT": "https://stexample.table.core.windows.net/",
    "KEY_VAULT_URI": "https://kv-example.vault.azure.net/",
    "KEY_VAULT_NAME": "kv-example",
    "ENTRA_TENANT_ID": "11111111-1111-1111-1111-111111111111",
    "AZURE_TENANT_ID": "11111111-1111-1111-1111-111111111111",
    "ENTRA_CLIENT_ID": "22222222-2222-2222-2222-222222222222",
    "AZURE_CLIENT_ID": "33333333-3333-3333-3333-333333333333",
    "AZURE_MANAGED_IDENTITY_PRINCIPAL_ID": "44444444-4444-4444-4444-444444444444",
    "SERVICE_API_URI": "https://func-api-example.azurewebsites.net",
    "AZURE_FUNCTION_APP_NAME": "func-api-example",
    "RESOURCE_GROUP": "rg-dev",
    "COLLECT_SCHEDULE": "0 */10 * * * *",
}


def _run_hook(
    folder: Path, env: dict[str, str], name: str = "postprovision.sh", path: str | None = None
) -> subprocess.CompletedProcess[str]:
    hooks = folder / "infra" / "hooks"
    hooks.mkdir(parents=True, exist_ok=True)
    script = hooks / name
    script.write_bytes((INFRA / "hooks" / name).read_bytes())
    base = {"PATH": path or os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(folder)}
    command = ["sh", str(script)]
    return subprocess.run(
        command, env={**base, **env}, cwd=folder, capture_output=True, text=True, timeout=60, check=False
    )


def test_postprovision_writes_local_settings_for_the_cloud_resources(tmp_path: Path) -> None:
    result = _run_hook(tmp_path, AZD_ENV)
    assert result.returncode == 0, result.stderr
    path = tmp_path / "local.settings.json"
    values = json.loads(path.read_text(encoding="utf-8"))["Values"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert values["AzureWebJobsStorage__blobServiceUri"] == AZD_ENV["AZURE_STORAGE_BLOB_ENDPOINT"]
    assert values["AzureWebJobsStorage__tableServiceUri"] == AZD_ENV["AZURE_STORAGE_TABLE_ENDPOINT"]
    assert values["KEY_VAULT_URI"] == AZD_ENV["KEY_VAULT_URI"]
    assert values["COLLECT_SCHEDULE"] == "0 */10 * * * *"
    assert values["ENTRA_REDIRECT_URI"] == "http://localhost:7071/api/auth/callback"
    # Locally the developer's identity is used: nothing that would select a managed identity, no secret invented.
    assert not {"AZURE_CLIENT_ID", "AzureWebJobsStorage__credential", "AzureWebJobsStorage__clientId"} & set(values)
    assert "ENTRA_CLIENT_SECRET" not in values
    # The secret and its Key Vault name belong to the deployed app in secret mode; a local run brings its own.
    names_the_app_reads = set(SETTING_NAMES) - NOT_IN_AZURE - {"AZURE_CLIENT_ID", "ENTRA_CLIENT_SECRET"}
    names_the_app_reads -= {"GLPI_APP_TOKEN", "GLPI_USER_TOKEN"}  # Key Vault references; a local run brings its own
    names_the_app_reads -= SECRET_NAME_SETTINGS
    names_the_app_reads -= {"AzureWebJobsStorage__credential", "AzureWebJobsStorage__clientId"}
    assert not set(LOCAL_ONLY_SETTINGS) & set(values), "the developer's own login reaches Key Vault, not a secret"
    assert names_the_app_reads <= set(values), sorted(names_the_app_reads - set(values))
    assert (tmp_path / ".azure" / "dev" / "local.settings.json").read_text() == path.read_text()
    link = "https://func-api-example.azurewebsites.net/api/mailboxes/{address}/authorize?code=<function key>"
    assert link in result.stdout
    assert "az functionapp keys list --name func-api-example --resource-group rg-dev" in result.stdout
    assert "federated-credential create --id 22222222-2222-2222-2222-222222222222" in result.stdout
    assert AZD_ENV["AZURE_MANAGED_IDENTITY_PRINCIPAL_ID"] in result.stdout


def test_postprovision_keeps_a_developer_secret_only_for_the_same_vault(tmp_path: Path) -> None:
    secret = "developer-secret-value-0123"
    previous = {"Values": {"ENTRA_CLIENT_SECRET": secret, "KEY_VAULT_URI": AZD_ENV["KEY_VAULT_URI"]}}
    (tmp_path / "local.settings.json").write_text(json.dumps(previous), encoding="utf-8")
    result = _run_hook(tmp_path, AZD_ENV)
    assert result.returncode == 0, result.stderr
    values = json.loads((tmp_path / "local.settings.json").read_text(encoding="utf-8"))["Values"]
    assert values["ENTRA_CLIENT_SECRET"] == secret
    assert secret not in result.stdout + result.stderr, "the hook must never print a secret"
    assert (tmp_path / ".azure" / "dev" / "local.settings.before-provision.json").is_file()

    other = tmp_path / "other"
    other.mkdir()
    previous["Values"]["KEY_VAULT_URI"] = "https://kv-another.vault.azure.net/"
    (other / "local.settings.json").write_text(json.dumps(previous), encoding="utf-8")
    result = _run_hook(other, AZD_ENV)
    assert result.returncode == 0, result.stderr
    values = json.loads((other / "local.settings.json").read_text(encoding="utf-8"))["Values"]
    assert "ENTRA_CLIENT_SECRET" not in values, "a secret of another deployment must not be carried over"


def test_postprovision_secret_mode_points_at_key_vault_and_names_missing_outputs(tmp_path: Path) -> None:
    result = _run_hook(tmp_path, {**AZD_ENV, "ENTRA_CREDENTIAL_MODE": "secret"})
    assert result.returncode == 0, result.stderr
    command = "az keyvault secret set --vault-name kv-example --name entra-client-secret --file <file>"
    assert f"{command} --expires <end date, UTC>" in result.stdout, "the expiry alert needs the secret's end date"
    assert "federated-credential" not in result.stdout

    partial = {key: value for key, value in AZD_ENV.items() if key != "KEY_VAULT_URI"}
    result = _run_hook(tmp_path / "partial", partial)
    assert result.returncode != 0
    assert "KEY_VAULT_URI" in result.stderr
    assert not (tmp_path / "partial" / "local.settings.json").exists()


# Create mode (the deployment registered the app) and the cross-tenant path.

CREATED = {
    **AZD_ENV,
    "ENTRA_APP_MODE": "create",
    "ENTRA_APP_UNIQUE_NAME": "m365-mail-collector-abc123",
    "ENTRA_SERVICE_PRINCIPAL_ID": "55555555-5555-5555-5555-555555555555",
    "FIRST_MAILBOX": "support@contoso.com",
}


def test_postprovision_create_mode_prints_the_consent_link_and_the_exchange_commands(tmp_path: Path) -> None:
    result = _run_hook(tmp_path, {**CREATED, "ENTRA_APP_ONLY": "true"})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "https://func-api-example.azurewebsites.net/api/mailboxes/support@contoso.com/authorize?code=" in out
    client, principal = CREATED["ENTRA_CLIENT_ID"], CREATED["ENTRA_SERVICE_PRINCIPAL_ID"]
    # The enterprise application's object id, never the registration's: the common app-only mistake.
    assert f"New-ServicePrincipal -AppId {client} -ObjectId {principal}" in out
    assert f"Add-MailboxPermission -Identity support@contoso.com -User {principal} -AccessRights FullAccess" in out
    assert f"Connect-ExchangeOnline -Organization {AZD_ENV['ENTRA_TENANT_ID']}" in out
    assert "created by this deployment" in out and "azd down deletes it" in out
    # The deployment made the federated credential and the consent: no manual command for them.
    assert "federated-credential create" not in out and "adminconsent" not in out

    delegated = _run_hook(tmp_path / "delegated", CREATED)
    assert delegated.returncode == 0, delegated.stderr
    assert "New-ServicePrincipal" not in delegated.stdout, "Exchange commands are for app-only mailboxes"


def test_postprovision_across_tenants_takes_the_multitenant_path(tmp_path: Path) -> None:
    other = "99999999-9999-9999-9999-999999999999"
    result = _run_hook(tmp_path, {**CREATED, "ENTRA_TENANT_ID": other, "ENTRA_APP_ONLY": "true"})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"https://login.microsoftonline.com/{other}/adminconsent?client_id={CREATED['ENTRA_CLIENT_ID']}" in out
    assert "multitenant" in out and "its own tenant only" in out
    # Exchange must know the enterprise application of the mailboxes' tenant, not the one in the identity's tenant.
    assert CREATED["ENTRA_SERVICE_PRINCIPAL_ID"] not in out
    assert f"Connect-ExchangeOnline -Organization {other}" in out
    assert f"created in {other} (signed in to that tenant):\n  az ad sp show --id {CREATED['ENTRA_CLIENT_ID']}" in out
    assert "-ObjectId <enterprise application object id>" in out

    existing = {**AZD_ENV, "ENTRA_TENANT_ID": other}
    manual = _run_hook(tmp_path / "existing", existing)
    assert manual.returncode == 0, manual.stderr
    # The credential's issuer is the identity's tenant; the doc names the two combinations that can work.
    assert f'"issuer": "https://login.microsoftonline.com/{AZD_ENV["AZURE_TENANT_ID"]}/v2.0"' in manual.stdout
    assert "cannot trust this identity" in manual.stdout and "ENTRA_CREDENTIAL_MODE=secret" in manual.stdout

    same = _run_hook(tmp_path / "same", AZD_ENV)
    assert "adminconsent" not in same.stdout and "cannot trust" not in same.stdout


@pytest.mark.parametrize(
    "hostile",
    [
        "support@contoso.com; Remove-Mailbox -Identity *",
        "$(touch pwned)@contoso.com",
        "support@contoso.com\n\x1b[2J",
        "two@@contoso.com",
        "no-at-sign.contoso.com",
    ],
)
def test_postprovision_never_echoes_a_hostile_first_mailbox(tmp_path: Path, hostile: str) -> None:
    result = _run_hook(tmp_path, {**CREATED, "ENTRA_APP_ONLY": "true", "FIRST_MAILBOX": hostile})
    assert result.returncode == 0, result.stderr
    assert hostile not in result.stdout + result.stderr
    assert "FIRST_MAILBOX is not a mail address" in result.stderr
    assert "/api/mailboxes/{address}/authorize" in result.stdout
    assert "Add-MailboxPermission -Identity <mailbox address>" in result.stdout
    assert not (tmp_path / "pwned").exists(), "the value was run as a command"


# The postdown hook, against a stand-in `az` that records its calls (the Graph API cannot be reached from here).

FAKE_AZ = """#!/bin/sh
printf '%s\\n' "$*" >> "$FAKE_AZ_LOG"
case "$*" in
  *"--method get"*)
    if [ -z "$FAKE_AZ_APP" ]; then
      echo 'Not Found({"error":{"code":"Request_ResourceNotFound"}})' >&2
      exit 1
    fi
    printf '%s' "$FAKE_AZ_APP" ;;
  *) exit 0 ;;
esac
"""


def _run_with_fake_az(
    tmp_path: Path, env: dict[str, str], app: dict[str, Any] | None, name: str = "postdown.sh"
) -> tuple[int, str, list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    fake = bin_dir / "az"
    fake.write_text(FAKE_AZ, encoding="utf-8")
    fake.chmod(0o755)
    log = tmp_path / "az.log"
    log.write_text("", encoding="utf-8")
    path = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}"
    fake_env = {"FAKE_AZ_LOG": str(log), "FAKE_AZ_APP": json.dumps(app) if app else ""}
    result = _run_hook(tmp_path, {**env, **fake_env}, name=name, path=path)
    calls = [line for line in log.read_text(encoding="utf-8").splitlines() if line]
    return result.returncode, result.stdout + result.stderr, calls


OUR_APP = {
    "id": "66666666-6666-6666-6666-666666666666",
    "appId": CREATED["ENTRA_CLIENT_ID"],
    "tags": ["azd-env-name:dev", "m365-mail-collector"],
}


def test_postdown_deletes_and_purges_the_registration_it_created(tmp_path: Path) -> None:
    code, out, calls = _run_with_fake_az(tmp_path, CREATED, OUR_APP)
    assert code == 0, out
    graph = "https://graph.microsoft.com/v1.0"
    assert calls == [
        f"rest --method get --url {graph}/applications(uniqueName='m365-mail-collector-abc123')?$select=id,appId,tags"
        " --output json",
        f"rest --method delete --url {graph}/servicePrincipals(appId='{OUR_APP['appId']}') --output json",
        f"rest --method delete --url {graph}/applications/{OUR_APP['id']} --output json",
        # Purged, or the next azd up of this environment fails on the soft-deleted copy's uniqueName.
        f"rest --method delete --url {graph}/directory/deletedItems/{OUR_APP['id']} --output json",
    ]
    assert "deleted the Entra app registration" in out


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"ENTRA_APP_MODE": "existing"}, "not created by this environment"),
        ({"ENTRA_APP_MODE": ""}, "not created by this environment"),
        ({"ENTRA_APP_UNIQUE_NAME": ""}, "not created by this environment"),
        ({"ENTRA_APP_UNIQUE_NAME": "m365-mail-collector-x')/owners"}, "not a name this template gives"),
        ({"ENTRA_CLIENT_ID": "22222222' or 1 eq 1"}, "not an application id"),
    ],
)
def test_postdown_never_touches_a_registration_it_did_not_create(
    tmp_path: Path, change: dict[str, str], reason: str
) -> None:
    code, out, calls = _run_with_fake_az(tmp_path, {**CREATED, **change}, OUR_APP)
    assert reason in out
    assert calls == [], "no Graph call at all"
    assert code == (0 if reason.startswith("not created") else 1)


@pytest.mark.parametrize(
    "app",
    [
        {**OUR_APP, "tags": ["azd-env-name:prod"]},  # another environment's registration under the same name
        {**OUR_APP, "tags": []},  # a registration someone else gave the name to
        {**OUR_APP, "appId": "77777777-7777-7777-7777-777777777777"},
    ],
)
def test_postdown_refuses_a_registration_without_this_environments_mark(tmp_path: Path, app: dict[str, Any]) -> None:
    code, out, calls = _run_with_fake_az(tmp_path, CREATED, app)
    assert code == 1
    assert "is not the one this environment created" in out
    assert [call.split()[2] for call in calls] == ["get"], "read, never deleted"


def test_postdown_when_the_registration_is_gone_or_az_is_missing(tmp_path: Path) -> None:
    code, out, calls = _run_with_fake_az(tmp_path, CREATED, None)
    assert code == 0 and "nothing to delete" in out
    assert len(calls) == 1

    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "bin").mkdir()
    sh = shutil.which("sh")
    assert sh
    (bare / "bin" / "sh").symlink_to(Path(sh).resolve())
    (bare / "bin" / "python3").symlink_to(Path(sys.executable).resolve())
    result = _run_hook(bare, CREATED, name="postdown.sh", path=str(bare / "bin"))
    assert result.returncode == 1
    assert "the Azure CLI (az) is needed" in result.stderr
    assert f"az ad app delete --id {CREATED['ENTRA_CLIENT_ID']}" in result.stderr


def test_deploy_doc_leads_with_the_one_command_path() -> None:
    text = (ROOT / "docs" / "deploy.md").read_text(encoding="utf-8")
    intro = text[: text.index("\n## ")]
    block = re.search(r"```sh\n(.*?)```", intro, re.DOTALL)
    assert block and "azd up" in block.group(1), "docs/deploy.md must open with the azd up path"
    assert "ENTRA_CLIENT_ID" not in block.group(1), "the one-command path needs no app registration beforehand"
    rights = ("Application Administrator", "Application.ReadWrite.All", "DelegatedPermissionGrant.ReadWrite.All")
    for right in (*rights, "AppRoleAssignment.ReadWrite.All"):
        assert right in text, f"the deployer's rights must be documented: {right}"
    assert dict(re.findall(r"^\| `([0-9a-f-]{36})` \| `([^`]+)`", text, re.MULTILINE)) == GRAPH_DELEGATED
    parameters = json.loads((INFRA / "main.parameters.json").read_text(encoding="utf-8"))["parameters"]
    read = {re.sub(r"^\$\{([A-Z_]+).*", r"\1", spec["value"]) for spec in parameters.values()}
    set_by_azd = {"AZURE_ENV_NAME", "AZURE_LOCATION", "AZURE_PRINCIPAL_ID", "AZURE_PRINCIPAL_TYPE"}
    documented = set(re.findall(r"^\| `([A-Z_]+)` \|", text, re.MULTILINE))
    assert read - set_by_azd <= documented, (
        f"undocumented azd environment values: {sorted(read - set_by_azd - documented)}"
    )


# The preprovision hook: a warning before a create-mode deployment that Graph would refuse.


def test_preprovision_warns_a_deployer_who_may_not_register_the_app(tmp_path: Path) -> None:
    plain = {"value": [{"displayName": "User Administrator"}]}
    code, out, calls = _run_with_fake_az(tmp_path, {"AZURE_ENV_NAME": "dev"}, plain, name="preprovision.sh")
    assert code == 0, "a warning only: a custom role may allow it"
    assert "/me/transitiveMemberOf/microsoft.graph.directoryRole" in calls[0]
    assert "Insufficient privileges" in out and "azd env set ENTRA_APP_MODE existing" in out

    admin = {"value": [{"displayName": "User Administrator"}, {"displayName": "Cloud Application Administrator"}]}
    code, out, calls = _run_with_fake_az(tmp_path / "admin", {"AZURE_ENV_NAME": "dev"}, admin, name="preprovision.sh")
    assert (code, out, len(calls)) == (0, "", 1)

    code, out, calls = _run_with_fake_az(tmp_path / "unknown", {"AZURE_ENV_NAME": "dev"}, None, name="preprovision.sh")
    assert code == 0 and "could not read your Entra roles" in out


@pytest.mark.parametrize(
    "env",
    [{"ENTRA_APP_MODE": "existing"}, {"ENTRA_CLIENT_ID": CREATED["ENTRA_CLIENT_ID"]}],
    ids=["existing", "client id"],
)
def test_preprovision_leaves_the_existing_path_alone(tmp_path: Path, env: dict[str, str]) -> None:
    code, out, calls = _run_with_fake_az(tmp_path, env, {"value": []}, name="preprovision.sh")
    assert (code, out, calls) == (0, "", [])
