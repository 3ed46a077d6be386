; Inno Setup script of the HipAtlas Windows installer (Inno Setup 6.3 or newer).
;
; Build it with packaging\windows\build.ps1, which runs PyInstaller and then
;   ISCC.exe /DAppVersion=<pyproject version> /DAppNumericVersion=<a.b.c.d> /DDistDir=<dist\hipatlas>
;        /DIconFile=<build\icons\hipatlas.ico> /DOutputDir=<dist> packaging\windows\hipatlas.iss
; The version is never written here: it comes from pyproject.toml through those defines.
;
; Installs per machine into "C:\Program Files\HipAtlas" (administrator rights), with a start-menu
; entry and an uninstaller (Settings > Apps, or unins000.exe in the install folder).
;
; Silent install and uninstall (e.g. for software deployment tools):
;   HipAtlas-<version>-setup.exe /VERYSILENT /SUPPRESSMSGBOXES /NORESTART /LOG="%TEMP%\hipatlas-install.log"
;   optional: /DIR="D:\Apps\HipAtlas"  /TASKS="desktopicon"  /NOICONS
;   "C:\Program Files\HipAtlas\unins000.exe" /VERYSILENT /SUPPRESSMSGBOXES /NORESTART

#ifndef AppVersion
  #error AppVersion is not defined: build with packaging\windows\build.ps1 (it reads the version from pyproject.toml)
#endif
#ifndef AppNumericVersion
  #error AppNumericVersion is not defined: build with packaging\windows\build.ps1
#endif
#ifndef DistDir
  #define DistDir "..\..\dist\hipatlas"
#endif
#ifndef OutputDir
  #define OutputDir "..\..\dist"
#endif

#define AppName "HipAtlas"
#define GuiExe "hipatlas-gui.exe"
#define CliExe "hipatlas.exe"

[Setup]
; AppId identifies the product across versions (upgrades replace the old install): never change it.
AppId={{6B0E1D52-3C1F-4E0B-9A57-2F7C4B9E8D31}
AppName={#AppName}
AppVersion={#AppVersion}
AppVerName={#AppName} {#AppVersion}
AppPublisher=HipAtlas developers
AppPublisherURL=https://github.com/hipatlas/hipatlas
AppComments=3D proximal femur from two calibrated radiographs. Research use only, not for diagnosis.
VersionInfoVersion={#AppNumericVersion}
VersionInfoProductVersion={#AppNumericVersion}
VersionInfoProductTextVersion={#AppVersion}
VersionInfoDescription={#AppName} {#AppVersion} setup
DefaultDirName={autopf}\{#AppName}
DefaultGroupName={#AppName}
DisableProgramGroupPage=yes
PrivilegesRequired=admin
ArchitecturesAllowed=x64compatible
ArchitecturesInstallIn64BitMode=x64compatible
MinVersion=10.0
OutputDir={#OutputDir}
OutputBaseFilename={#AppName}-{#AppVersion}-setup
#ifdef IconFile
SetupIconFile={#IconFile}
#endif
UninstallDisplayIcon={app}\{#GuiExe}
UninstallDisplayName={#AppName} {#AppVersion}
; lzma2 on the 2 GB bundle: the setup is about a third of that. /max would add minutes for a few %.
Compression=lzma2
SolidCompression=yes
LZMAUseSeparateProcess=yes
WizardStyle=modern
CloseApplications=yes
RestartApplications=no
ChangesEnvironment=no

[Languages]
Name: "english"; MessagesFile: "compiler:Default.isl"

[Tasks]
Name: "desktopicon"; Description: "{cm:CreateDesktopIcon}"; GroupDescription: "{cm:AdditionalIcons}"; Flags: unchecked

[InstallDelete]
; An upgrade replaces the whole bundle: stale libraries of an older version must not be loaded.
Type: filesandordirs; Name: "{app}\_internal"

[Files]
Source: "{#DistDir}\*"; DestDir: "{app}"; Flags: ignoreversion recursesubdirs createallsubdirs

[Icons]
Name: "{group}\{#AppName}"; Filename: "{app}\{#GuiExe}"; WorkingDir: "{userdocs}"; Comment: "Hip arthroplasty planning from two radiographs"
Name: "{group}\{#AppName} self-test"; Filename: "{cmd}"; Parameters: "/k ""{app}\{#CliExe}"" --self-test"; WorkingDir: "{userdocs}"; Comment: "Check the installation"
Name: "{group}\Uninstall {#AppName}"; Filename: "{uninstallexe}"
Name: "{autodesktop}\{#AppName}"; Filename: "{app}\{#GuiExe}"; WorkingDir: "{userdocs}"; Tasks: desktopicon

[Run]
Filename: "{app}\{#GuiExe}"; Description: "{cm:LaunchProgram,{#AppName}}"; Flags: nowait postinstall skipifsilent

[UninstallDelete]
; Python writes __pycache__ folders next to bundled sources at run time.
Type: filesandordirs; Name: "{app}\_internal"
