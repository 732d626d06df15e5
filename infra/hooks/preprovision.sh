#!/bin/sh
# azd preprovision hook (POSIX): when this provisioning will register the Entra app (ENTRA_APP_MODE=create, or unset
# with no ENTRA_CLIENT_ID), says before the deployment starts whether the signed-in account looks allowed to, and what
# to do if not. It only warns and never stops provisioning: a custom role or Graph permissions granted to a pipeline's
# service principal may allow it too, and Microsoft Graph gives the final answer. It needs the Azure CLI signed in as
# the deployer (`az login`); without it the check is skipped.
set -eu

python_bin=$(command -v python3 || command -v python || true)
[ -n "$python_bin" ] || exit 0

exec "$python_bin" - <<'EOF'
import json
import os
import shutil
import subprocess
import sys

env = os.environ
mode = env.get("ENTRA_APP_MODE") or ("existing" if env.get("ENTRA_CLIENT_ID") else "create")
if mode != "create":
    sys.exit(0)

# The built-in roles that hold every right the registration needs (Application.ReadWrite.All,
# DelegatedPermissionGrant.ReadWrite.All, AppRoleAssignment.ReadWrite.All for the Exchange Online role).
ENOUGH = {"Global Administrator", "Application Administrator", "Cloud Application Administrator"}

az = shutil.which("az")
if az is None:
    print("preprovision: this provisioning registers the Entra app (ENTRA_APP_MODE=create); the Azure CLI is not here to")
    print("  check your Entra role first (docs/deploy.md, Prerequisites)")
    sys.exit(0)
url = "https://graph.microsoft.com/v1.0/me/transitiveMemberOf/microsoft.graph.directoryRole?$select=displayName"
result = subprocess.run([az, "rest", "--method", "get", "--url", url, "--output", "json"], capture_output=True, text=True)
try:
    roles = {str(role.get("displayName", "")) for role in json.loads(result.stdout).get("value", [])}
except (ValueError, AttributeError):
    roles = None
if result.returncode != 0 or roles is None:
    print("preprovision: could not read your Entra roles (az rest); if provisioning stops at the entra-app deployment")
    print("  with 'Insufficient privileges', see docs/deploy.md, The Entra app registration")
    sys.exit(0)
if roles & ENOUGH:
    sys.exit(0)
print(
    "preprovision: this provisioning registers the Entra app (ENTRA_APP_MODE=create), and your account holds none of\n"
    "  the roles that allow it (Application Administrator, Cloud Application Administrator, Global Administrator).\n"
    "  Unless a custom role gives you Application.ReadWrite.All and DelegatedPermissionGrant.ReadWrite.All, it will\n"
    "  stop at the entra-app deployment with 'Insufficient privileges to complete the operation'. Then either an admin\n"
    "  runs azd provision, or you register the app yourself (docs/deploy.md, Registering the app yourself):\n"
    "    azd env set ENTRA_APP_MODE existing"
)
EOF
