#!/usr/bin/env bash
# Build the HipAtlas Linux installer: PyInstaller one-folder bundle -> .deb -> self-test of the
# package extracted into a temporary root.
#
#   packaging/build_linux.sh            # full build (several minutes, ~2 GB of disk in build/ and dist/)
#
# Environment:
#   HIPATLAS_BUILD_VENV   virtualenv to build in (default: .venv; created if missing)
#   SKIP_PIP=1            do not pip-install the project and PyInstaller into it
#   DEB_COMPRESSION       zstd (default: 20 s for the 2.2 GB bundle; the dpkg of every system with the
#                         glibc the package needs reads it), xz (25% smaller, but 34 min on 2 shared
#                         cores; needed only when building for Debian 11 or older), gzip
#   DEB_LEVEL             compression level for dpkg-deb -z
#   SKIP_SELF_TEST=1      skip `hipatlas --self-test` of the extracted package
#   GUI_SMOKE=1           also open the demo case in the extracted GUI (under Xvfb if installed),
#                         register it and quit
#
# Outputs: dist/hipatlas/ (the bundle), dist/hipatlas_<version>_<arch>.deb, build/ (work files).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
START=$(date +%s)
VENV="${HIPATLAS_BUILD_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"

step() { printf '\n== %s (%ds)\n' "$*" "$(( $(date +%s) - START ))"; }

step "build environment: $VENV"
if [ ! -x "$PY" ]; then
    "${PYTHON:-python3.11}" -m venv "$VENV"
fi
if [ "${SKIP_PIP:-0}" != 1 ]; then
    "$PY" -m pip install -q --upgrade pip
    "$PY" -m pip install -q -e ".[packaging]"
fi
VERSION="$("$PY" packaging/bundle_manifest.py version)"
echo "HipAtlas $VERSION, $("$PY" -c 'import PyInstaller; print("PyInstaller", PyInstaller.__version__)')"

step "resources"
if ! "$PY" packaging/bundle_manifest.py check; then
    echo "error: resources are missing (see above); the installer must work offline, so it ships them." >&2
    exit 1
fi
# Never package a damaged model or atlas: the same check the installed program runs at start.
"$PY" -c "from inference.resources import verify_resources; verify_resources(demo=True)"

step "icons"
"$PY" packaging/make_icons.py --out build/icons >/dev/null

step "PyInstaller bundle"
rm -rf dist/hipatlas
"$PY" -m PyInstaller --noconfirm --log-level WARN --distpath dist --workpath build/pyinstaller \
    packaging/hipatlas.spec
BUNDLE_VERSION="$(dist/hipatlas/hipatlas --version)"
if [ "$BUNDLE_VERSION" != "hipatlas $VERSION" ]; then
    echo "error: the bundle reports '$BUNDLE_VERSION', pyproject.toml says $VERSION" >&2
    exit 1
fi

step "Debian package"
DEB="$("$PY" packaging/linux/make_deb.py --bundle dist/hipatlas --icons build/icons --out dist \
    --compression "${DEB_COMPRESSION:-zstd}" ${DEB_LEVEL:+--level "$DEB_LEVEL"} | tail -n 1)"
dpkg-deb --info "$DEB" | sed -n '/Package:/,/Description:/p'

step "test the package extracted into a temporary root"
TEST_ROOT="$(mktemp -d -t hipatlas-deb-test.XXXXXX)"
trap 'rm -rf "$TEST_ROOT"' EXIT
dpkg-deb -x "$DEB" "$TEST_ROOT/root"
if ! missing_libs="$("$PY" packaging/linux/make_deb.py --check-libs "$TEST_ROOT/root/opt/hipatlas")"; then
    echo "note: system libraries this machine lacks (Qt's optional GTK-theme and Wayland plugins need"
    echo "gtk/wayland only on such desktops; anything else must be in the package's Depends):"
    echo "$missing_libs"
fi
# A clean HOME and no resource overrides: the self-test must use what the package installed.
# Run as an unprivileged user when building as root, as on a workstation, where /opt/hipatlas is
# read-only: anything that tries to write into the installation fails here too.
mkdir -p "$TEST_ROOT/home/tmp"
AS_USER=()
if [ "$(id -u)" = 0 ] && command -v setpriv >/dev/null; then
    chmod 755 "$TEST_ROOT"
    chown -R 65534:65534 "$TEST_ROOT/home"
    AS_USER=(setpriv --reuid=65534 --regid=65534 --clear-groups)
fi
run_installed() {
    env -u HIPATLAS_RESOURCES_DIR -u HIPATLAS_ATLAS_DIR -u PYTHONPATH HOME="$TEST_ROOT/home" \
        TMPDIR="$TEST_ROOT/home/tmp" "${AS_USER[@]}" "$@"
}
run_installed "$TEST_ROOT/root/usr/bin/hipatlas" --version
SELF_TEST=skipped
if [ "${SKIP_SELF_TEST:-0}" != 1 ]; then
    SELF_TEST_START=$(date +%s)
    if run_installed "$TEST_ROOT/root/usr/bin/hipatlas" --self-test; then
        SELF_TEST="passed in $(( $(date +%s) - SELF_TEST_START )) s"
    else
        echo "error: the installed package's self-test failed" >&2
        exit 1
    fi
fi
if [ "${GUI_SMOKE:-0}" = 1 ]; then
    # A real X server (Xvfb) exercises Qt's xcb plugin and the system libraries it needs.
    if command -v xvfb-run >/dev/null; then
        run_installed xvfb-run -a "$TEST_ROOT/root/usr/bin/hipatlas-gui" --demo --quit-after-register
    else
        run_installed env QT_QPA_PLATFORM=offscreen "$TEST_ROOT/root/usr/bin/hipatlas-gui" --demo --quit-after-register
    fi
    echo "GUI smoke test passed"
fi

step "done"
BUNDLE_MB=$(( $("$PY" -c 'import sys; sys.path.insert(0, "packaging"); import bundle_manifest as b; print(b.bundle_size_bytes("dist/hipatlas"))') / 1048576 ))
DEB_MB=$(( $(stat -c %s "$DEB") / 1048576 ))
echo "bundle:    dist/hipatlas  ${BUNDLE_MB} MiB installed"
echo "package:   $DEB  ${DEB_MB} MiB (${DEB_COMPRESSION:-zstd})"
echo "self-test: $SELF_TEST"
echo "build time: $(( $(date +%s) - START )) s"
