# azd preprovision hook (Windows, PowerShell 7): same job as preprovision.sh. When this provisioning will register the
# Entra app (ENTRA_APP_MODE=create, or unset with no ENTRA_CLIENT_ID), says before the deployment starts whether the
# signed-in account looks allowed to, and what to do if not. It only warns: Microsoft Graph gives the final answer.
$ErrorActionPreference = 'Stop'

$mode = [Environment]::GetEnvironmentVariable('ENTRA_APP_MODE')
if (-not $mode) {
    $mode = if ([Environment]::GetEnvironmentVariable('ENTRA_CLIENT_ID')) { 'existing' } else { 'create' }
}
if ($mode -ne 'create') { exit 0 }

# The built-in roles that hold every right the registration needs.
$enough = @('Global Administrator', 'Application Administrator', 'Cloud Application Administrator')

if (-not (Get-Command az -ErrorAction SilentlyContinue)) {
    Write-Host 'preprovision: this provisioning registers the Entra app (ENTRA_APP_MODE=create); the Azure CLI is not here to'
    Write-Host '  check your Entra role first (docs/deploy.md, Prerequisites)'
    exit 0
}
$url = 'https://graph.microsoft.com/v1.0/me/transitiveMemberOf/microsoft.graph.directoryRole?$select=displayName'
$answer = & az rest --method get --url $url --output json 2>$null
if ($LASTEXITCODE -ne 0) {
    Write-Host 'preprovision: could not read your Entra roles (az rest); if provisioning stops at the entra-app deployment'
    Write-Host "  with 'Insufficient privileges', see docs/deploy.md, The Entra app registration"
    exit 0
}
$roles = @((($answer -join "`n") | ConvertFrom-Json).value | ForEach-Object { $_.displayName })
if ($roles | Where-Object { $enough -contains $_ }) { exit 0 }
Write-Host 'preprovision: this provisioning registers the Entra app (ENTRA_APP_MODE=create), and your account holds none of'
Write-Host '  the roles that allow it (Application Administrator, Cloud Application Administrator, Global Administrator).'
Write-Host '  Unless a custom role gives you Application.ReadWrite.All and DelegatedPermissionGrant.ReadWrite.All, it will'
Write-Host "  stop at the entra-app deployment with 'Insufficient privileges to complete the operation'. Then either an admin"
Write-Host '  runs azd provision, or you register the app yourself (docs/deploy.md, Registering the app yourself):'
Write-Host '    azd env set ENTRA_APP_MODE existing'
