<#
.SYNOPSIS
  Build the HipAtlas Windows installer: PyInstaller one-folder bundle, self-test, Inno Setup.

.DESCRIPTION
  Run from any folder on a Windows 10/11 x64 machine with Python 3.11 (py launcher) and
  Inno Setup 6.3+ (https://jrsoftware.org/isinfo.php; ISCC.exe) installed:

    powershell -ExecutionPolicy Bypass -File packaging\windows\build.ps1

  Outputs dist\hipatlas\ (the bundle) and dist\HipAtlas-<version>-setup.exe. The version is read
  from pyproject.toml (packaging\bundle_manifest.py) and passed to ISCC; it is written nowhere else.

.PARAMETER Venv
  Build virtual environment (default: build\venv-win; created if missing).
.PARAMETER Python
  Python used to create the venv (default: "py -3.11").
.PARAMETER Iscc
  Path of ISCC.exe (default: looked up in Program Files and on PATH).
.PARAMETER SkipSelfTest
  Do not run "hipatlas.exe --self-test" on the bundle before packaging it.
#>
param(
    [string]$Venv = "",
    [string]$Python = "py -3.11",
    [string]$Iscc = "",
    [switch]$SkipSelfTest
)
$ErrorActionPreference = "Stop"
$Start = Get-Date
$Root = (Resolve-Path (Join-Path $PSScriptRoot "..\..")).Path
Set-Location $Root
if (-not $Venv) { $Venv = Join-Path $Root "build\venv-win" }
$Py = Join-Path $Venv "Scripts\python.exe"

function Step($Message) {
    $elapsed = [int]((Get-Date) - $Start).TotalSeconds
    Write-Host "`n== $Message ($elapsed s)"
}
function Check($What) {
    if ($LASTEXITCODE -ne 0) { throw "$What failed with exit code $LASTEXITCODE" }
}

Step "build environment: $Venv"
if (-not (Test-Path $Py)) {
    $exe, $pyArgs = $Python -split " "
    & $exe @pyArgs -m venv $Venv; Check "creating the virtual environment"
}
& $Py -m pip install -q --upgrade pip; Check "pip upgrade"
& $Py -m pip install -q -e ".[packaging]"; Check "installing HipAtlas and PyInstaller"

$Version = (& $Py packaging\bundle_manifest.py version).Trim(); Check "reading the version"
$Numeric = (& $Py packaging\bundle_manifest.py numeric-version).Trim(); Check "reading the version"
Write-Host "HipAtlas $Version"

Step "resources"
& $Py packaging\bundle_manifest.py check; Check "resource check (model, atlas, demo case must be present)"
& $Py -c "from inference.resources import verify_resources; verify_resources(demo=True)"; Check "resource integrity"

Step "icons"
& $Py packaging\make_icons.py --out build\icons | Out-Null; Check "icons"

Step "PyInstaller bundle"
if (Test-Path dist\hipatlas) { Remove-Item -Recurse -Force dist\hipatlas }
& $Py -m PyInstaller --noconfirm --log-level WARN --distpath dist --workpath build\pyinstaller packaging\hipatlas.spec
Check "PyInstaller"
$Reported = (& dist\hipatlas\hipatlas.exe --version).Trim(); Check "hipatlas.exe --version"
if ($Reported -ne "hipatlas $Version") { throw "the bundle reports '$Reported', pyproject.toml says $Version" }

$SelfTest = "skipped"
if (-not $SkipSelfTest) {
    Step "self-test of the bundle"
    & dist\hipatlas\hipatlas.exe --self-test; Check "hipatlas.exe --self-test"
    $SelfTest = "passed"
}

Step "Inno Setup"
if (-not $Iscc) {
    $candidates = @(
        (Join-Path ${env:ProgramFiles(x86)} "Inno Setup 6\ISCC.exe"),
        (Join-Path $env:ProgramFiles "Inno Setup 6\ISCC.exe"),
        (Join-Path $env:LOCALAPPDATA "Programs\Inno Setup 6\ISCC.exe")
    )
    $Iscc = $candidates | Where-Object { $_ -and (Test-Path $_) } | Select-Object -First 1
    if (-not $Iscc) { $Iscc = (Get-Command ISCC.exe -ErrorAction SilentlyContinue).Source }
    if (-not $Iscc) { throw "ISCC.exe (Inno Setup 6) not found: install it or pass -Iscc <path>" }
}
& $Iscc /Q "/DAppVersion=$Version" "/DAppNumericVersion=$Numeric" "/DDistDir=$Root\dist\hipatlas" `
    "/DIconFile=$Root\build\icons\hipatlas.ico" "/DOutputDir=$Root\dist" packaging\windows\hipatlas.iss
Check "ISCC"

Step "done"
$Setup = Join-Path $Root "dist\HipAtlas-$Version-setup.exe"
$BundleMiB = [int]((Get-ChildItem -Recurse -File dist\hipatlas | Measure-Object -Property Length -Sum).Sum / 1MB)
$SetupMiB = [int]((Get-Item $Setup).Length / 1MB)
Write-Host "bundle:     dist\hipatlas  $BundleMiB MiB installed"
Write-Host "installer:  $Setup  $SetupMiB MiB"
Write-Host "self-test:  $SelfTest"
Write-Host ("build time: {0} s" -f [int]((Get-Date) - $Start).TotalSeconds)
