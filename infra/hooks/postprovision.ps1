# azd postprovision hook (Windows, PowerShell 7): same job as postprovision.sh. Writes local.settings.json for
# running the app on this machine against the resources just provisioned, and prints the admin consent link.
# It prints no key, token or secret: the function key is fetched by the admin when needed.
$ErrorActionPreference = 'Stop'

$repoRoot = (Resolve-Path (Join-Path $PSScriptRoot '..' '..')).Path

function Get-Setting([string] $Name, [string] $Default = '') {
    $value = [Environment]::GetEnvironmentVariable($Name)
    if ([string]::IsNullOrEmpty($value)) { return $Default }
    return $value
}

$required = @(
    'AZURE_STORAGE_BLOB_ENDPOINT', 'AZURE_STORAGE_QUEUE_ENDPOINT', 'AZURE_STORAGE_TABLE_ENDPOINT',
    'KEY_VAULT_URI', 'ENTRA_TENANT_ID'
)
$missing = @($required | Where-Object { -not (Get-Setting $_) })
if ($missing.Count -gt 0) {
    Write-Error ("postprovision: missing azd outputs {0}; run it through azd (azd provision, or azd hooks run postprovision)" -f ($missing -join ', '))
}

# Locally the app runs as the developer (az login / azd auth login), so neither AZURE_CLIENT_ID nor
# AzureWebJobsStorage__credential is written: both would select a managed identity that does not exist here.
$values = [ordered]@{
    FUNCTIONS_WORKER_RUNTIME             = 'python'
    AzureWebJobsStorage__blobServiceUri  = Get-Setting 'AZURE_STORAGE_BLOB_ENDPOINT'
    AzureWebJobsStorage__queueServiceUri = Get-Setting 'AZURE_STORAGE_QUEUE_ENDPOINT'
    AzureWebJobsStorage__tableServiceUri = Get-Setting 'AZURE_STORAGE_TABLE_ENDPOINT'
    KEY_VAULT_URI                        = Get-Setting 'KEY_VAULT_URI'
    ENTRA_TENANT_ID                      = Get-Setting 'ENTRA_TENANT_ID'
    ENTRA_CLIENT_ID                      = Get-Setting 'ENTRA_CLIENT_ID'
    ENTRA_AUTHORITY_HOST                 = Get-Setting 'ENTRA_AUTHORITY_HOST' 'https://login.microsoftonline.com'
    ENTRA_REDIRECT_URI                   = 'http://localhost:7071/api/auth/callback'
    ALLOWED_MAIL_DOMAINS                 = Get-Setting 'ALLOWED_MAIL_DOMAINS'
    IMAP_HOST                            = Get-Setting 'IMAP_HOST' 'outlook.office365.com'
    IMAP_PORT                            = Get-Setting 'IMAP_PORT' '993'
    IMAP_SCOPE                           = Get-Setting 'IMAP_SCOPE' 'https://outlook.office.com/IMAP.AccessAsUser.All'
    COLLECT_SCHEDULE                     = Get-Setting 'COLLECT_SCHEDULE' '0 */5 * * * *'
    COLLECT_MAX_CONCURRENCY              = Get-Setting 'COLLECT_MAX_CONCURRENCY' '8'
    COLLECT_TIME_BUDGET_SECONDS          = Get-Setting 'COLLECT_TIME_BUDGET_SECONDS' '240'
    COLLECT_MEMORY_BUDGET_MB             = Get-Setting 'COLLECT_MEMORY_BUDGET_MB' '512'
    MAIL_QUEUE_NAME                      = Get-Setting 'MAIL_QUEUE_NAME' 'incoming-mail'
    MAIL_CONTAINER_NAME                  = Get-Setting 'MAIL_CONTAINER_NAME' 'raw-mail'
    WORK_QUEUE_NAME                      = Get-Setting 'WORK_QUEUE_NAME' 'collect-work'
    MAILBOX_TABLE_NAME                   = Get-Setting 'MAILBOX_TABLE_NAME' 'mailboxes'
    CONSENT_TABLE_NAME                   = Get-Setting 'CONSENT_TABLE_NAME' 'consentflows'
    LEASE_CONTAINER_NAME                 = Get-Setting 'LEASE_CONTAINER_NAME' 'mailbox-leases'
    # The GLPI tokens are not written: a local run brings its own (they are Key Vault references in Azure).
    GLPI_URL                             = Get-Setting 'GLPI_URL'
    GLPI_STATE_TABLE_NAME                = Get-Setting 'GLPI_STATE_TABLE_NAME' 'glpitickets'
    GLPI_MAILBOX_OPTIONS                 = Get-Setting 'GLPI_MAILBOX_OPTIONS' '{}'
    'AzureWebJobs.glpi_tickets.Disabled' = $(if (Get-Setting 'GLPI_URL') { 'false' } else { 'true' })
}

$target = Join-Path $repoRoot 'local.settings.json'
$envDir = Join-Path (Join-Path $repoRoot '.azure') (Get-Setting 'AZURE_ENV_NAME' 'default')
New-Item -ItemType Directory -Force -Path $envDir | Out-Null

if (Test-Path $target) {
    # Keep the previous file (the local stack's, or one holding a developer's client secret) and carry that
    # secret over when it belongs to the same deployment.
    $backup = Join-Path $envDir 'local.settings.before-provision.json'
    Copy-Item -Force $target $backup
    try {
        $old = (Get-Content -Raw $target | ConvertFrom-Json).Values
        if ($old.ENTRA_CLIENT_SECRET -and $old.KEY_VAULT_URI -eq $values.KEY_VAULT_URI) {
            $values.ENTRA_CLIENT_SECRET = $old.ENTRA_CLIENT_SECRET
        }
    } catch {
        Write-Verbose 'previous local.settings.json is not JSON; not carried over'
    }
    Write-Host "postprovision: the previous local.settings.json is kept in $backup"
}

$json = [ordered]@{ IsEncrypted = $false; Values = $values } | ConvertTo-Json -Depth 3
foreach ($path in @($target, (Join-Path $envDir 'local.settings.json'))) {
    Set-Content -Path $path -Value $json -Encoding utf8NoBOM
}
Write-Host "postprovision: wrote $target (a copy stays in $(Join-Path $envDir 'local.settings.json'))"
if (-not $values.Contains('ENTRA_CLIENT_SECRET')) {
    Write-Host 'postprovision: a local run has no managed identity to use as the Entra credential; to sign mailboxes in'
    Write-Host '  or renew tokens from this machine, add ENTRA_CLIENT_SECRET to local.settings.json (never commit it) and'
    $howTo = if ((Get-Setting 'ENTRA_APP_MODE') -eq 'create') { ' (azd env set ENTRA_LOCAL_REDIRECT_URI true, then azd provision)' } else { '' }
    Write-Host "  register http://localhost:7071/api/auth/callback as a redirect URI of the app registration$howTo"
}

$appUri = Get-Setting 'SERVICE_API_URI'
$appName = Get-Setting 'AZURE_FUNCTION_APP_NAME' '<function app>'
$group = Get-Setting 'RESOURCE_GROUP' (Get-Setting 'AZURE_RESOURCE_GROUP' '<resource group>')
$mode = Get-Setting 'ENTRA_APP_MODE' 'existing'
$clientId = Get-Setting 'ENTRA_CLIENT_ID'
$authority = Get-Setting 'ENTRA_AUTHORITY_HOST' 'https://login.microsoftonline.com'
$identityTenant = Get-Setting 'AZURE_TENANT_ID'
$mailboxTenant = Get-Setting 'ENTRA_TENANT_ID'

# The first mailbox (azd env set FIRST_MAILBOX ...) fills in the links and commands below. Anything that is not a
# plain mail address is not echoed: it would end up in a link an admin clicks or a command an admin pastes.
$mailbox = '{address}'
$firstMailbox = Get-Setting 'FIRST_MAILBOX'
if ($firstMailbox) {
    if ($firstMailbox -match '^[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+$') {
        $mailbox = $firstMailbox
    } else {
        Write-Warning 'postprovision: FIRST_MAILBOX is not a mail address (letters, digits, . _ % + - and one @); fix it with azd env set FIRST_MAILBOX <address>; the link below keeps {address}'
    }
}

# A federated credential trusts a managed identity of its own tenant only: with the mailboxes in another tenant, the
# registration lives in the identity's tenant as a multitenant app, consented once in the mailboxes' tenant.
$crossTenant = [bool]($identityTenant -and $mailboxTenant -and ($identityTenant -ne $mailboxTenant))

Write-Host ''
if ($mailbox -eq '{address}') {
    Write-Host 'Admin consent link, one per mailbox (replace {address}; the key is a password, keep it out of tickets and chats):'
} else {
    Write-Host "Consent link of $mailbox (the key is a password, keep it out of tickets and chats):"
}
Write-Host "  $appUri/api/mailboxes/$mailbox/authorize?code=<function key>"
Write-Host 'The function key:'
Write-Host "  az functionapp keys list --name $appName --resource-group $group --query functionKeys.default --output tsv"

if ($mode -eq 'create') {
    Write-Host ''
    Write-Host "Entra app registration ${clientId}: created by this deployment (ENTRA_APP_MODE=create); azd down deletes it."
    if ($crossTenant) {
        Write-Host "The mailboxes' tenant ($mailboxTenant) is not the subscription's ($identityTenant). A federated credential"
        Write-Host "can trust a managed identity of its own tenant only, so the registration lives in $identityTenant as a"
        Write-Host "multitenant app, and an admin of $mailboxTenant consents to it once (this creates its enterprise application"
        Write-Host 'there; sign in as an admin of that tenant):'
        Write-Host "  $authority/$mailboxTenant/adminconsent?client_id=$clientId"
    } else {
        Write-Host 'Admin consent for the tenant is granted; the managed identity is its client credential (no secret).'
    }
}

if (-not $clientId) {
    Write-Host ''
    $redirect = Get-Setting 'ENTRA_REDIRECT_URI' '<redirect uri>'
    Write-Host "ENTRA_CLIENT_ID is empty: register the Entra app (docs/deploy.md, redirect URI $redirect), then"
    Write-Host '  azd env set ENTRA_CLIENT_ID <application (client) id>; azd provision'
    Write-Host 'or let the deployment register it: azd env set ENTRA_APP_MODE create; azd provision'
}

if ((Get-Setting 'ENTRA_CREDENTIAL_MODE' 'federated') -eq 'secret') {
    $vault = Get-Setting 'KEY_VAULT_NAME' '<key vault>'
    $secretName = Get-Setting 'ENTRA_CLIENT_SECRET_NAME' 'entra-client-secret'
    Write-Host ''
    Write-Host 'Secret mode: put the client secret into Key Vault (read from a file, not typed on the command line) with the'
    Write-Host "secret's own end date as its expiry, which the expiry alert watches; then restart the app so that the Key Vault"
    Write-Host 'reference resolves:'
    if ($mode -eq 'create' -and $clientId) {
        Write-Host "  az ad app credential reset --id $clientId --append --display-name mail-collector --end-date <end date, UTC> --query password --output tsv > <file>"
    }
    Write-Host "  az keyvault secret set --vault-name $vault --name $secretName --file <file> --expires <end date, UTC>"
    Write-Host "  az functionapp restart --name $appName --resource-group $group"
} elseif ($mode -ne 'create' -and $clientId) {
    $tenant = if ($identityTenant) { $identityTenant } else { '<tenant id>' }
    $principal = Get-Setting 'AZURE_MANAGED_IDENTITY_PRINCIPAL_ID' '<identity principal id>'
    Write-Host ''
    Write-Host 'Federated mode: the app registration must trust the managed identity (once):'
    Write-Host "  az ad app federated-credential create --id $clientId --parameters '{`"name`": `"function-app-identity`","
    Write-Host "    `"issuer`": `"https://login.microsoftonline.com/$tenant/v2.0`","
    Write-Host "    `"subject`": `"$principal`", `"audiences`": [`"api://AzureADTokenExchange`"]}'"
    if ($crossTenant) {
        Write-Host "This works only with a registration in the subscription's tenant ($identityTenant), made multitenant and"
        Write-Host "consented by an admin of the mailboxes' tenant (${mailboxTenant}):"
        Write-Host "  $authority/$mailboxTenant/adminconsent?client_id=$clientId"
        Write-Host "A registration in $mailboxTenant cannot trust this identity: use ENTRA_CREDENTIAL_MODE=secret with it instead."
    }
}

if ($mode -eq 'create' -and (Get-Setting 'ENTRA_APP_ONLY' 'false') -eq 'true') {
    $spId = Get-Setting 'ENTRA_SERVICE_PRINCIPAL_ID' '<enterprise application object id>'
    $identity = if ($mailbox -eq '{address}') { '<mailbox address>' } else { $mailbox }
    $organization = if ($mailboxTenant) { $mailboxTenant } else { '<tenant id>' }
    Write-Host ''
    Write-Host 'App-only mailboxes (IMAP.AccessAsApp): register the enterprise application in Exchange, then grant each mailbox.'
    if ($crossTenant) {
        # The enterprise application that Exchange must know is the one in the mailboxes' tenant, made by the consent.
        $spId = '<enterprise application object id>'
        Write-Host "Its object id is the one the admin consent created in $mailboxTenant (signed in to that tenant):"
        Write-Host "  az ad sp show --id $clientId --query id --output tsv"
    }
    Write-Host "Exchange Online PowerShell (the object id is the enterprise application's, not the app registration's):"
    Write-Host "  Connect-ExchangeOnline -Organization $organization"
    Write-Host "  New-ServicePrincipal -AppId $clientId -ObjectId $spId -DisplayName `"M365 mail collector`""
    Write-Host "  Add-MailboxPermission -Identity $identity -User $spId -AccessRights FullAccess"
}
