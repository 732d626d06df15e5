# azd prepackage hook (Windows, PowerShell 7): same job as prepackage.sh. Compiles the app's own modules to
# hash-checked bytecode (PEP 552) with the Python version the app runs on (infra/app/api.bicep), so that a cold start
# on Azure, where the package is mounted read-only, loads them instead of compiling them again.
$ErrorActionPreference = 'Stop'

$runtime = '3.11'
$packages = @('function_app.py', 'api', 'collectors', 'consumers', 'shared')

$python = $null
$candidates = @(@('py', "-$runtime"), @('python'), @('python3'))
foreach ($candidate in $candidates) {
    if (-not (Get-Command $candidate[0] -ErrorAction SilentlyContinue)) { continue }
    $extra = @($candidate | Select-Object -Skip 1)
    $version = & $candidate[0] @extra -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>$null
    if ($LASTEXITCODE -eq 0 -and "$version".Trim() -eq $runtime) { $python = $candidate; break }
}

# Bytecode left by local runs (another version, or checked by file times) is not shipped either way.
foreach ($folder in @('.') + $packages) {
    if (Test-Path $folder -PathType Container) {
        Get-ChildItem -Path $folder -Recurse -Directory -Filter '__pycache__' | Remove-Item -Recurse -Force
    }
}

if (-not $python) {
    Write-Host "prepackage: Python $runtime (the app's runtime) was not found; the package ships without bytecode, and every"
    Write-Host "  cold start compiles the app's modules (tens of milliseconds). Install Python $runtime to ship it compiled."
    exit 0
}
$extra = @($python | Select-Object -Skip 1)
& $python[0] @extra -m compileall -q --invalidation-mode checked-hash @packages
if ($LASTEXITCODE -ne 0) { throw "prepackage: compileall failed (exit $LASTEXITCODE)" }
Write-Host "prepackage: the app's modules are compiled for Python $runtime (hash-checked bytecode)"
