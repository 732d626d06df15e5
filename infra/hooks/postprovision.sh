#!/bin/sh
# azd postprovision hook (POSIX): writes local.settings.json for running the app on this machine against the
# resources just provisioned, and prints the admin consent link. azd passes its environment (the Bicep outputs) as
# environment variables. It prints no key, token or secret: the function key is fetched by the admin when needed.
set -eu

repo_root=$(CDPATH='' cd -- "$(dirname -- "$0")/../.." && pwd)
python_bin=$(command -v python3 || command -v python || true)
if [ -z "$python_bin" ]; then
  echo "postprovision: Python 3 is needed to write local.settings.json" >&2
  exit 1
fi

"$python_bin" - "$repo_root" <<'EOF'
import json
import os
import sys
from pathlib import Path

root = Path(sys.argv[1])
env = os.environ

required = (
    "AZURE_STORAGE_BLOB_ENDPOINT",
    "AZURE_STORAGE_QUEUE_ENDPOINT",
    "AZURE_STORAGE_TABLE_ENDPOINT",
    "KEY_VAULT_URI",
    "ENTRA_TENANT_ID",
)
missing = [name for name in required if not env.get(name)]
if missing:
    sys.exit(
        "postprovision: missing azd outputs " + ", ".join(missing)
        + "; run it through azd (azd provision, or azd hooks run postprovision)"
    )


def value(name: str, default: str = "") -> str:
    return env.get(name) or default


# Locally the app runs as the developer (azure-identity picks up `az login` / `azd auth login`), so neither
# AZURE_CLIENT_ID nor AzureWebJobsStorage__credential is written: both would select a managed identity that does
# not exist here. The deploying user holds the data roles on storage and Key Vault (infra/app/rbac.bicep).
values = {
    "FUNCTIONS_WORKER_RUNTIME": "python",
    "AzureWebJobsStorage__blobServiceUri": env["AZURE_STORAGE_BLOB_ENDPOINT"],
    "AzureWebJobsStorage__queueServiceUri": env["AZURE_STORAGE_QUEUE_ENDPOINT"],
    "AzureWebJobsStorage__tableServiceUri": env["AZURE_STORAGE_TABLE_ENDPOINT"],
    "KEY_VAULT_URI": env["KEY_VAULT_URI"],
    "ENTRA_TENANT_ID": env["ENTRA_TENANT_ID"],
    "ENTRA_CLIENT_ID": value("ENTRA_CLIENT_ID"),
    "ENTRA_AUTHORITY_HOST": value("ENTRA_AUTHORITY_HOST", "https://login.microsoftonline.com"),
    "ENTRA_REDIRECT_URI": "http://localhost:7071/api/auth/callback",
    "ALLOWED_MAIL_DOMAINS": value("ALLOWED_MAIL_DOMAINS"),
    "IMAP_HOST": value("IMAP_HOST", "outlook.office365.com"),
    "IMAP_PORT": value("IMAP_PORT", "993"),
    "IMAP_SCOPE": value("IMAP_SCOPE", "https://outlook.office.com/IMAP.AccessAsUser.All"),
    "COLLECT_SCHEDULE": value("COLLECT_SCHEDULE", "0 */5 * * * *"),
    "COLLECT_MAX_CONCURRENCY": value("COLLECT_MAX_CONCURRENCY", "8"),
    "COLLECT_TIME_BUDGET_SECONDS": value("COLLECT_TIME_BUDGET_SECONDS", "240"),
    "COLLECT_MEMORY_BUDGET_MB": value("COLLECT_MEMORY_BUDGET_MB", "512"),
    "MAIL_QUEUE_NAME": value("MAIL_QUEUE_NAME", "incoming-mail"),
    "MAIL_CONTAINER_NAME": value("MAIL_CONTAINER_NAME", "raw-mail"),
    "WORK_QUEUE_NAME": value("WORK_QUEUE_NAME", "collect-work"),
    "MAILBOX_TABLE_NAME": value("MAILBOX_TABLE_NAME", "mailboxes"),
    "CONSENT_TABLE_NAME": value("CONSENT_TABLE_NAME", "consentflows"),
    "LEASE_CONTAINER_NAME": value("LEASE_CONTAINER_NAME", "mailbox-leases"),
    # The GLPI tokens are not written: a local run brings its own (they are Key Vault references in Azure).
    "GLPI_URL": value("GLPI_URL"),
    "GLPI_STATE_TABLE_NAME": value("GLPI_STATE_TABLE_NAME", "glpitickets"),
    "GLPI_MAILBOX_OPTIONS": value("GLPI_MAILBOX_OPTIONS", "{}"),
    "AzureWebJobs.glpi_tickets.Disabled": "false" if value("GLPI_URL") else "true",
}

target = root / "local.settings.json"
env_dir = root / ".azure" / value("AZURE_ENV_NAME", "default")
env_dir.mkdir(parents=True, exist_ok=True)

if target.exists():
    # The file may be the local stack's, or hold a client secret the developer added: keep it, then carry that
    # secret over when it belongs to the same deployment (a re-provision must not drop it).
    old_text = target.read_text(encoding="utf-8")
    backup = env_dir / "local.settings.before-provision.json"
    backup.write_text(old_text, encoding="utf-8")
    backup.chmod(0o600)
    try:
        old = json.loads(old_text).get("Values", {})
    except (ValueError, AttributeError):
        old = {}
    if old.get("ENTRA_CLIENT_SECRET") and old.get("KEY_VAULT_URI") == values["KEY_VAULT_URI"]:
        values["ENTRA_CLIENT_SECRET"] = old["ENTRA_CLIENT_SECRET"]
    print(f"postprovision: the previous local.settings.json is kept in {backup}")

text = json.dumps({"IsEncrypted": False, "Values": values}, indent=2) + "\n"
for path in (target, env_dir / "local.settings.json"):
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)
print(f"postprovision: wrote {target} (a copy stays in {env_dir / 'local.settings.json'})")
if "ENTRA_CLIENT_SECRET" not in values:
    print(
        "postprovision: a local run has no managed identity to use as the Entra credential; to sign mailboxes in\n"
        "  or renew tokens from this machine, add ENTRA_CLIENT_SECRET to local.settings.json (never commit it) and\n"
        "  register http://localhost:7071/api/auth/callback as a redirect URI of the app registration"
        + (" (azd env set ENTRA_LOCAL_REDIRECT_URI true, then azd provision)" if value("ENTRA_APP_MODE") == "create" else "")
    )
EOF

app_uri=${SERVICE_API_URI:-}
app_name=${AZURE_FUNCTION_APP_NAME:-<function app>}
group=${RESOURCE_GROUP:-${AZURE_RESOURCE_GROUP:-<resource group>}}
mode=${ENTRA_APP_MODE:-existing}
client_id=${ENTRA_CLIENT_ID:-}
authority=${ENTRA_AUTHORITY_HOST:-https://login.microsoftonline.com}
identity_tenant=${AZURE_TENANT_ID:-}
mailbox_tenant=${ENTRA_TENANT_ID:-}

# The first mailbox (azd env set FIRST_MAILBOX ...) fills in the links and commands below. Anything that is not a
# plain mail address is not echoed: it would end up in a link an admin clicks or a command an admin pastes.
mailbox='{address}'
if [ -n "${FIRST_MAILBOX:-}" ]; then
  # The case pattern rejects any other character (a newline or an escape would slip past a line-based grep).
  case $FIRST_MAILBOX in
    *[!A-Za-z0-9._%+@-]*) valid=false ;;
    *) valid=true ;;
  esac
  if [ "$valid" = true ] && printf '%s' "$FIRST_MAILBOX" | grep -Eq '^[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+$'; then
    mailbox=$FIRST_MAILBOX
  else
    echo "postprovision: FIRST_MAILBOX is not a mail address (letters, digits, . _ % + - and one @); fix it with" >&2
    echo "  azd env set FIRST_MAILBOX <address>; the link below keeps {address}" >&2
  fi
fi

# A federated credential trusts a managed identity of its own tenant only: with the mailboxes in another tenant, the
# registration lives in the identity's tenant as a multitenant app, consented once in the mailboxes' tenant.
cross_tenant=false
if [ -n "$identity_tenant" ] && [ -n "$mailbox_tenant" ] \
  && [ "$(printf '%s' "$identity_tenant" | tr 'A-F' 'a-f')" != "$(printf '%s' "$mailbox_tenant" | tr 'A-F' 'a-f')" ]; then
  cross_tenant=true
fi

echo
if [ "$mailbox" = '{address}' ]; then
  echo "Admin consent link, one per mailbox (replace {address}; the key is a password, keep it out of tickets and chats):"
else
  echo "Consent link of $mailbox (the key is a password, keep it out of tickets and chats):"
fi
echo "  ${app_uri}/api/mailboxes/${mailbox}/authorize?code=<function key>"
echo "The function key:"
echo "  az functionapp keys list --name ${app_name} --resource-group ${group} --query functionKeys.default --output tsv"

if [ "$mode" = "create" ]; then
  echo
  echo "Entra app registration ${client_id}: created by this deployment (ENTRA_APP_MODE=create); azd down deletes it."
  if [ "$cross_tenant" = true ]; then
    echo "The mailboxes' tenant (${mailbox_tenant}) is not the subscription's (${identity_tenant}). A federated credential"
    echo "can trust a managed identity of its own tenant only, so the registration lives in ${identity_tenant} as a"
    echo "multitenant app, and an admin of ${mailbox_tenant} consents to it once (this creates its enterprise application"
    echo "there; sign in as an admin of that tenant):"
    echo "  ${authority}/${mailbox_tenant}/adminconsent?client_id=${client_id}"
  else
    echo "Admin consent for the tenant is granted; the managed identity is its client credential (no secret)."
  fi
fi

if [ -z "$client_id" ]; then
  echo
  echo "ENTRA_CLIENT_ID is empty: register the Entra app (docs/deploy.md, redirect URI ${ENTRA_REDIRECT_URI:-<redirect uri>}), then"
  echo "  azd env set ENTRA_CLIENT_ID <application (client) id> && azd provision"
  echo "or let the deployment register it: azd env set ENTRA_APP_MODE create && azd provision"
fi

if [ "${ENTRA_CREDENTIAL_MODE:-federated}" = "secret" ]; then
  echo
  echo "Secret mode: put the client secret into Key Vault (read from a file, not typed on the command line) with the"
  echo "secret's own end date as its expiry, which the expiry alert watches; then restart the app so that the Key Vault"
  echo "reference resolves:"
  if [ "$mode" = "create" ] && [ -n "$client_id" ]; then
    echo "  az ad app credential reset --id ${client_id} --append --display-name mail-collector --end-date <end date, UTC> \\"
    echo "    --query password --output tsv | tr -d '\\r\\n' > <file>     (umask 077 first)"
  fi
  echo "  az keyvault secret set --vault-name ${KEY_VAULT_NAME:-<key vault>} --name ${ENTRA_CLIENT_SECRET_NAME:-entra-client-secret} --file <file> --expires <end date, UTC>"
  echo "  az functionapp restart --name ${app_name} --resource-group ${group}"
elif [ "$mode" != "create" ] && [ -n "$client_id" ]; then
  echo
  echo "Federated mode: the app registration must trust the managed identity (once):"
  echo "  az ad app federated-credential create --id ${client_id} --parameters '{\"name\": \"function-app-identity\","
  echo "    \"issuer\": \"https://login.microsoftonline.com/${identity_tenant:-<tenant id>}/v2.0\","
  echo "    \"subject\": \"${AZURE_MANAGED_IDENTITY_PRINCIPAL_ID:-<identity principal id>}\", \"audiences\": [\"api://AzureADTokenExchange\"]}'"
  if [ "$cross_tenant" = true ]; then
    echo "This works only with a registration in the subscription's tenant (${identity_tenant}), made multitenant and"
    echo "consented by an admin of the mailboxes' tenant (${mailbox_tenant}):"
    echo "  ${authority}/${mailbox_tenant}/adminconsent?client_id=${client_id}"
    echo "A registration in ${mailbox_tenant} cannot trust this identity: use ENTRA_CREDENTIAL_MODE=secret with it instead."
  fi
fi

if [ "$mode" = "create" ] && [ "${ENTRA_APP_ONLY:-false}" = "true" ]; then
  principal=${ENTRA_SERVICE_PRINCIPAL_ID:-<enterprise application object id>}
  echo
  echo "App-only mailboxes (IMAP.AccessAsApp): register the enterprise application in Exchange, then grant each mailbox."
  if [ "$cross_tenant" = true ]; then
    # The enterprise application that Exchange must know is the one in the mailboxes' tenant, made by the consent.
    principal='<enterprise application object id>'
    echo "Its object id is the one the admin consent created in ${mailbox_tenant} (signed in to that tenant):"
    echo "  az ad sp show --id ${client_id} --query id --output tsv"
  fi
  echo "Exchange Online PowerShell (the object id is the enterprise application's, not the app registration's):"
  echo "  Connect-ExchangeOnline -Organization ${mailbox_tenant:-<tenant id>}"
  echo "  New-ServicePrincipal -AppId ${client_id} -ObjectId ${principal} -DisplayName \"M365 mail collector\""
  identity=$mailbox
  [ "$identity" = '{address}' ] && identity='<mailbox address>'
  echo "  Add-MailboxPermission -Identity ${identity} -User ${principal} -AccessRights FullAccess"
fi
