#!/bin/sh
# azd postdown hook (POSIX): deletes the Entra app registration that this environment's provisioning created
# (ENTRA_APP_MODE=create), and never one it did not create. `azd down` removes the resource group only; Entra objects
# are not in it. It runs after azd down succeeded, so a cancelled or failed down leaves the registration alone.
#
# A registration counts as created here only if all of these hold: the environment says create mode, the registration
# is found by the uniqueName this template gave it (a registration made by hand has none), its application id is
# ENTRA_CLIENT_ID, and it carries this environment's azd-env-name tag. Deleting it also deletes what hangs off it: the
# federated credential, the enterprise application with its consent grants and role assignment. It is then purged
# from Entra's deleted items: a soft-deleted registration keeps its uniqueName, and the next `azd up` of the same
# environment would fail on it ("Another object with the same value for property uniqueName already exists").
set -eu

python_bin=$(command -v python3 || command -v python || true)
if [ -z "$python_bin" ]; then
  echo "postdown: Python 3 is needed to delete the Entra app registration ${ENTRA_CLIENT_ID:-}; delete it yourself:" >&2
  echo "  az ad app delete --id ${ENTRA_CLIENT_ID:-<client id>}" >&2
  exit 1
fi

exec "$python_bin" - <<'EOF'
import json
import os
import re
import shutil
import subprocess
import sys
import time

env = os.environ
mode = env.get("ENTRA_APP_MODE", "")
unique_name = env.get("ENTRA_APP_UNIQUE_NAME", "")
client_id = env.get("ENTRA_CLIENT_ID", "")
env_name = env.get("AZURE_ENV_NAME", "")

if mode != "create" or not unique_name:
    print(
        f"postdown: the Entra app registration {client_id or '(none)'} was not created by this environment "
        f"(ENTRA_APP_MODE={mode or 'unset'}); it is left as it is"
    )
    sys.exit(0)

# The name and id go into Graph URLs: only what this template produces is accepted (main.bicep: entraAppUniqueName).
if not re.fullmatch(r"m365-mail-collector-[a-z0-9]{1,32}", unique_name):
    sys.exit("postdown: ENTRA_APP_UNIQUE_NAME is not a name this template gives; nothing deleted")
if not re.fullmatch(r"[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}", client_id):
    sys.exit("postdown: ENTRA_CLIENT_ID is not an application id; nothing deleted")

manual = f"  az ad app delete --id {client_id}"
az = shutil.which("az")
if az is None:
    sys.exit(f"postdown: the Azure CLI (az) is needed to delete the Entra app registration; delete it yourself:\n{manual}")

# Microsoft Graph of the cloud the authority belongs to.
graph = {
    "https://login.microsoftonline.us": "https://graph.microsoft.us",
    "https://login.chinacloudapi.cn": "https://microsoftgraph.chinacloudapi.cn",
}.get(env.get("ENTRA_AUTHORITY_HOST", "").rstrip("/"), "https://graph.microsoft.com") + "/v1.0"


def rest(method: str, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [az, "rest", "--method", method, "--url", url, "--output", "json"],
        capture_output=True, text=True, check=False,
    )


def not_found(result: subprocess.CompletedProcess[str]) -> bool:
    return "Request_ResourceNotFound" in result.stderr or "Not Found" in result.stderr


found = rest("get", f"{graph}/applications(uniqueName='{unique_name}')?$select=id,appId,tags")
if found.returncode != 0:
    if not_found(found):
        print(f"postdown: no app registration named {unique_name} is left; nothing to delete")
        sys.exit(0)
    sys.exit(
        "postdown: could not read the app registration (az rest: "
        + (found.stderr.strip().splitlines() or ["no answer"])[-1]
        + f"); sign in to its tenant with az login, or delete it yourself:\n{manual}"
    )
try:
    app = json.loads(found.stdout)
except ValueError:
    sys.exit(f"postdown: az rest did not answer JSON; nothing deleted. Delete it yourself:\n{manual}")

mark = f"azd-env-name:{env_name}"
if str(app.get("appId", "")).lower() != client_id.lower() or mark not in app.get("tags", []):
    sys.exit(
        f"postdown: the registration named {unique_name} is not the one this environment created (application id or "
        f"the {mark} tag differ); nothing deleted"
    )

object_id = str(app.get("id", ""))
if not re.fullmatch(r"[0-9a-fA-F-]{36}", object_id):
    sys.exit("postdown: the registration has no object id; nothing deleted")

steps = (
    (f"{graph}/servicePrincipals(appId='{client_id}')", "the enterprise application", 1),
    (f"{graph}/applications/{object_id}", "the app registration", 1),
    # The deleted copy appears a moment after the delete: try again before giving up on it.
    (f"{graph}/directory/deletedItems/{object_id}", "its soft-deleted copy (frees the uniqueName)", 6),
)
for url, what, attempts in steps:
    for attempt in range(attempts):
        result = rest("delete", url)
        if result.returncode == 0 or not not_found(result) or attempt == attempts - 1:
            break
        time.sleep(5)  # seconds
    if result.returncode != 0 and not (not_found(result) and attempts == 1):
        sys.exit(
            f"postdown: could not delete {what} (az rest: "
            + (result.stderr.strip().splitlines() or ["no answer"])[-1]
            + f"); finish by hand:\n  az rest --method delete --url \"{url}\""
        )
print(f"postdown: deleted the Entra app registration {client_id} ({unique_name}) that this environment created")
EOF
