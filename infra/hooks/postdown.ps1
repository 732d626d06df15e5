# azd postdown hook (Windows, PowerShell 7): same job as postdown.sh. Deletes the Entra app registration that this
# environment's provisioning created (ENTRA_APP_MODE=create), and never one it did not create: it must be found by the
# uniqueName this template gave it, carry ENTRA_CLIENT_ID as its application id and this environment's azd-env-name
# tag. It is then purged from Entra's deleted items, so that the next `azd up` can use the same uniqueName again.
$ErrorActionPreference = 'Stop'

function Get-Setting([string] $Name, [string] $Default = '') {
    $value = [Environment]::GetEnvironmentVariable($Name)
    if ([string]::IsNullOrEmpty($value)) { return $Default }
    return $value
}

$mode = Get-Setting 'ENTRA_APP_MODE'
$uniqueName = Get-Setting 'ENTRA_APP_UNIQUE_NAME'
$clientId = Get-Setting 'ENTRA_CLIENT_ID'
$envName = Get-Setting 'AZURE_ENV_NAME'

if ($mode -ne 'create' -or -not $uniqueName) {
    Write-Host "postdown: the Entra app registration $clientId was not created by this environment (ENTRA_APP_MODE=$mode); it is left as it is"
    exit 0
}
# The name and id go into Graph URLs: only what this template produces is accepted (main.bicep: entraAppUniqueName).
if ($uniqueName -cnotmatch '^m365-mail-collector-[a-z0-9]{1,32}$') {
    Write-Error 'postdown: ENTRA_APP_UNIQUE_NAME is not a name this template gives; nothing deleted'
}
if ($clientId -notmatch '^[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}$') {
    Write-Error 'postdown: ENTRA_CLIENT_ID is not an application id; nothing deleted'
}
$manual = "  az ad app delete --id $clientId"
if (-not (Get-Command az -ErrorAction SilentlyContinue)) {
    Write-Error "postdown: the Azure CLI (az) is needed to delete the Entra app registration; delete it yourself:`n$manual"
}

$graph = switch ((Get-Setting 'ENTRA_AUTHORITY_HOST').TrimEnd('/')) {
    'https://login.microsoftonline.us' { 'https://graph.microsoft.us' }
    'https://login.chinacloudapi.cn' { 'https://microsoftgraph.chinacloudapi.cn' }
    default { 'https://graph.microsoft.com' }
}
$graph = "$graph/v1.0"

function Invoke-Graph([string] $Method, [string] $Url) {
    $output = & az rest --method $Method --url $Url --output json 2>&1
    return [pscustomobject]@{ Ok = ($LASTEXITCODE -eq 0); Text = ($output -join "`n") }
}
function Test-NotFound($Result) {
    return $Result.Text -match 'Request_ResourceNotFound|Not Found'
}

$found = Invoke-Graph 'get' "$graph/applications(uniqueName='$uniqueName')?`$select=id,appId,tags"
if (-not $found.Ok) {
    if (Test-NotFound $found) {
        Write-Host "postdown: no app registration named $uniqueName is left; nothing to delete"
        exit 0
    }
    Write-Error "postdown: could not read the app registration; sign in to its tenant with az login, or delete it yourself:`n$manual"
}
$app = $found.Text | ConvertFrom-Json
$mark = "azd-env-name:$envName"
if ($app.appId -ne $clientId -or -not (@($app.tags) -contains $mark)) {
    Write-Error "postdown: the registration named $uniqueName is not the one this environment created (application id or the $mark tag differ); nothing deleted"
}
$objectId = [string] $app.id

$steps = @(
    @{ Url = "$graph/servicePrincipals(appId='$clientId')"; What = 'the enterprise application'; Attempts = 1 },
    @{ Url = "$graph/applications/$objectId"; What = 'the app registration'; Attempts = 1 },
    # The deleted copy appears a moment after the delete: try again before giving up on it.
    @{ Url = "$graph/directory/deletedItems/$objectId"; What = 'its soft-deleted copy (frees the uniqueName)'; Attempts = 6 }
)
foreach ($step in $steps) {
    for ($attempt = 1; $attempt -le $step.Attempts; $attempt++) {
        $result = Invoke-Graph 'delete' $step.Url
        if ($result.Ok -or -not (Test-NotFound $result) -or $attempt -eq $step.Attempts) { break }
        Start-Sleep -Seconds 5
    }
    if (-not $result.Ok -and -not ((Test-NotFound $result) -and $step.Attempts -eq 1)) {
        Write-Error "postdown: could not delete $($step.What); finish by hand:`n  az rest --method delete --url `"$($step.Url)`""
    }
}
Write-Host "postdown: deleted the Entra app registration $clientId ($uniqueName) that this environment created"
