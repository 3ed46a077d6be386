#!/usr/bin/env bash
# Build HipAtlas.app and HipAtlas-<version>.dmg on macOS 11+ (Apple silicon or Intel; the app is
# built for the machine's own architecture).
#
#   packaging/macos/build.sh
#
# Needs Python 3.11 (python.org or Homebrew) and Xcode command line tools (hdiutil, codesign).
# Environment:
#   HIPATLAS_BUILD_VENV   virtualenv to build in (default: build/venv-macos; created if missing)
#   SKIP_PIP=1            do not pip-install the project and PyInstaller
#   CODESIGN_IDENTITY     "Developer ID Application: ..." to sign the app (default: ad-hoc signature
#                         made by PyInstaller; Gatekeeper then asks users to confirm the first start,
#                         see docs/install.md). Notarisation (xcrun notarytool) is not automated.
#   SKIP_SELF_TEST=1      skip the self-test of the built app
#
# Outputs: dist/HipAtlas.app, dist/HipAtlas-<version>.dmg
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
START=$(date +%s)
VENV="${HIPATLAS_BUILD_VENV:-$ROOT/build/venv-macos}"
PY="$VENV/bin/python"
step() { printf '\n== %s (%ds)\n' "$*" "$(( $(date +%s) - START ))"; }

if [ "$(uname -s)" != Darwin ]; then
    echo "error: the macOS app can only be built on macOS (hdiutil, Mach-O binaries)" >&2
    exit 1
fi

step "build environment: $VENV"
if [ ! -x "$PY" ]; then
    "${PYTHON:-python3.11}" -m venv "$VENV"
fi
if [ "${SKIP_PIP:-0}" != 1 ]; then
    "$PY" -m pip install -q --upgrade pip
    "$PY" -m pip install -q -e ".[packaging]"
fi
VERSION="$("$PY" packaging/bundle_manifest.py version)"
echo "HipAtlas $VERSION"

step "resources"
"$PY" packaging/bundle_manifest.py check
"$PY" -c "from inference.resources import verify_resources; verify_resources(demo=True)"

step "icons"
"$PY" packaging/make_icons.py --out build/icons >/dev/null

step "PyInstaller app bundle"
rm -rf dist/hipatlas dist/HipAtlas.app
"$PY" -m PyInstaller --noconfirm --log-level WARN --distpath dist --workpath build/pyinstaller \
    packaging/hipatlas.spec
APP="dist/HipAtlas.app"
CLI="$APP/Contents/MacOS/hipatlas"
# Files written through mkstemp (model, model card) are private to their owner; every user of the
# Mac must be able to read the installed app.
chmod -R u+rwX,go+rX,go-w "$APP"
PLIST_VERSION="$(/usr/libexec/PlistBuddy -c 'Print :CFBundleShortVersionString' "$APP/Contents/Info.plist")"
if [ "$PLIST_VERSION" != "$VERSION" ] || [ "$("$CLI" --version)" != "hipatlas $VERSION" ]; then
    echo "error: version mismatch: Info.plist $PLIST_VERSION, pyproject.toml $VERSION" >&2
    exit 1
fi

if [ -n "${CODESIGN_IDENTITY:-}" ]; then
    step "signing with $CODESIGN_IDENTITY"
    codesign --force --deep --options runtime --timestamp --sign "$CODESIGN_IDENTITY" "$APP"
    codesign --verify --deep --strict "$APP"
fi

SELF_TEST=skipped
if [ "${SKIP_SELF_TEST:-0}" != 1 ]; then
    step "self-test of the app"
    env -u HIPATLAS_RESOURCES_DIR -u HIPATLAS_ATLAS_DIR "$CLI" --self-test
    SELF_TEST=passed
fi

step "disk image"
DMG="dist/HipAtlas-$VERSION.dmg"
STAGE="$(mktemp -d -t hipatlas-dmg)"
trap 'rm -rf "$STAGE"' EXIT
cp -R "$APP" "$STAGE/"
ln -s /Applications "$STAGE/Applications"   # drag-to-install target
rm -f "$DMG"
hdiutil create -volname "HipAtlas $VERSION" -srcfolder "$STAGE" -fs HFS+ -format UDZO -ov "$DMG"
if [ -n "${CODESIGN_IDENTITY:-}" ]; then
    codesign --force --sign "$CODESIGN_IDENTITY" "$DMG"
fi

step "done"
echo "app:        $APP  $(du -sm "$APP" | cut -f1) MiB"
echo "disk image: $DMG  $(du -sm "$DMG" | cut -f1) MiB"
echo "self-test:  $SELF_TEST"
echo "build time: $(( $(date +%s) - START )) s"
