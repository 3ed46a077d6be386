#!/usr/bin/env bash
# Build the HipAtlas Linux installer: PyInstaller one-folder bundle -> .deb -> self-test of the
# package extracted into a temporary root.
#
#   packaging/build_linux.sh                            # full build (several minutes, ~2 GB of disk)
#   HIPATLAS_FLAVOUR=runtime packaging/build_linux.sh   # TensorFlow-free build (make package-runtime)
#
# Environment:
#   HIPATLAS_FLAVOUR      full (default: TensorFlow inside, package "hipatlas") or runtime (ONNX Runtime
#                         only, package "hipatlas-runtime": registration, mask proposal, self-test and the
#                         workstation; no training, evaluation, export or refinement)
#   HIPATLAS_BUILD_VENV   virtualenv to build in (default: .venv for full, build/venv-runtime for
#                         runtime, which gets packaging/requirements-onnx.txt only; created if missing)
#   SKIP_PIP=1            do not pip-install the project and PyInstaller into it
#   DEB_COMPRESSION       zstd (the full flavour's default: 20 s for the 2.2 GB bundle; the dpkg of every
#                         system with the glibc the package needs reads it), xz (the runtime flavour's
#                         default, where size is the point: 24% smaller than zstd, 8.5 min for its 1 GB
#                         bundle on 2 shared cores; 34 min for the full one), gzip
#   DEB_LEVEL             compression level for dpkg-deb -z
#   SKIP_SELF_TEST=1      skip `hipatlas --self-test` of the extracted package
#   GUI_SMOKE=1           also open the demo case in the extracted GUI (under Xvfb if installed),
#                         register it and quit
#
# Outputs: dist/hipatlas/ (the bundle; runtime: dist/runtime/hipatlas/), dist/<package>_<version>_<arch>.deb,
# dist/build-report-<flavour>.json (sizes, times, self-test; packaging/build_report.py publishes it),
# build/ (work files).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
START=$(date +%s)
FLAVOUR="${HIPATLAS_FLAVOUR:-full}"
export HIPATLAS_FLAVOUR="$FLAVOUR"
case "$FLAVOUR" in
    full) DEFAULT_VENV="$ROOT/.venv"; DIST="dist"; WORK="build/pyinstaller"; DEFAULT_COMPRESSION=zstd ;;
    runtime) DEFAULT_VENV="$ROOT/build/venv-runtime"; DIST="dist/runtime"; WORK="build/pyinstaller-runtime"
        DEFAULT_COMPRESSION=xz ;;
    *) echo "error: HIPATLAS_FLAVOUR must be full or runtime, not '$FLAVOUR'" >&2; exit 2 ;;
esac
VENV="${HIPATLAS_BUILD_VENV:-$DEFAULT_VENV}"
COMPRESSION="${DEB_COMPRESSION:-$DEFAULT_COMPRESSION}"
PY="$VENV/bin/python"
BUNDLE="$DIST/hipatlas"

step() { printf '\n== %s (%ds)\n' "$*" "$(( $(date +%s) - START ))"; }

step "build environment ($FLAVOUR flavour): $VENV"
if [ ! -x "$PY" ]; then
    "${PYTHON:-python3.11}" -m venv "$VENV"
fi
if [ "${SKIP_PIP:-0}" != 1 ]; then
    "$PY" -m pip install -q --upgrade pip
    if [ "$FLAVOUR" = runtime ]; then
        # no TensorFlow: the workstation's dependencies only, then the project without its own
        # dependency list (which names tensorflow); PyInstaller as in the "packaging" extra
        "$PY" -m pip install -q -r packaging/requirements-onnx.txt "pyinstaller>=6.5"
        "$PY" -m pip install -q --no-deps -e .
    else
        "$PY" -m pip install -q -e ".[packaging]"
    fi
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
rm -rf "$BUNDLE"
PYINSTALLER_START=$(date +%s)
"$PY" -m PyInstaller --noconfirm --log-level WARN --distpath "$DIST" --workpath "$WORK" \
    packaging/hipatlas.spec
PYINSTALLER_S=$(( $(date +%s) - PYINSTALLER_START ))
# The spec already refused forbidden modules; this checks the files that ended up in the folder.
"$PY" packaging/bundle_manifest.py check-bundle --flavour "$FLAVOUR" --bundle "$BUNDLE"
BUNDLE_VERSION="$("$BUNDLE/hipatlas" --version)"
if [ "$BUNDLE_VERSION" != "hipatlas $VERSION" ]; then
    echo "error: the bundle reports '$BUNDLE_VERSION', pyproject.toml says $VERSION" >&2
    exit 1
fi

step "Debian package"
DEB_START=$(date +%s)
DEB="$("$PY" packaging/linux/make_deb.py --flavour "$FLAVOUR" --bundle "$BUNDLE" --icons build/icons --out dist \
    --compression "$COMPRESSION" ${DEB_LEVEL:+--level "$DEB_LEVEL"} | tail -n 1)"
DEB_S=$(( $(date +%s) - DEB_START ))
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
SELF_TEST_S=
SELF_TEST_BACKEND=
if [ "${SKIP_SELF_TEST:-0}" != 1 ]; then
    SELF_TEST_START=$(date +%s)
    if run_installed "$TEST_ROOT/root/usr/bin/hipatlas" --self-test | tee "$TEST_ROOT/self-test.txt"; then
        SELF_TEST_S=$(( $(date +%s) - SELF_TEST_START ))
        SELF_TEST="passed in $SELF_TEST_S s"
    else
        echo "error: the installed package's self-test failed" >&2
        exit 1
    fi
    # which backend registered the demo: "demo registered in 3.1 s (onnx)"
    SELF_TEST_BACKEND="$(sed -n 's/.*demo registered in .* s (\([a-z]*\)).*/\1/p' "$TEST_ROOT/self-test.txt" | head -n 1)"
    if [ "$FLAVOUR" = runtime ] && [ "$SELF_TEST_BACKEND" != onnx ]; then
        echo "error: the runtime flavour's self-test ran the '${SELF_TEST_BACKEND:-?}' backend, not onnx" >&2
        exit 1
    fi
fi
if [ "$FLAVOUR" = runtime ]; then
    # What needs TensorFlow must stop with one line that names it, and write nothing.
    SHIPPED="$TEST_ROOT/root/opt/hipatlas/_internal/resources"
    MODEL_KERAS="$(ls "$SHIPPED"/models/*/*.keras | head -n 1)"
    for command in "train --data $SHIPPED/demo --out $TEST_ROOT/home/run" \
                   "export-onnx $MODEL_KERAS --out $TEST_ROOT/home/m.onnx" \
                   "register $SHIPPED/demo --out $TEST_ROOT/home/refined --refine"; do
        set +e
        # shellcheck disable=SC2086  # the words of $command are the arguments
        message="$(run_installed "$TEST_ROOT/root/usr/bin/hipatlas" $command 2>&1)"
        status=$?
        set -e
        if [ "$status" != 2 ] || [ "$(printf '%s\n' "$message" | wc -l)" != 1 ] \
                || ! printf '%s' "$message" | grep -qi tensorflow; then
            echo "error: 'hipatlas ${command%% *}' in the runtime flavour: status $status, expected 2 and one line naming TensorFlow:" >&2
            printf '%s\n' "$message" >&2
            exit 1
        fi
        echo "hipatlas ${command%% *}: $message"
    done
    if [ -e "$TEST_ROOT/home/refined" ] || [ -e "$TEST_ROOT/home/run" ]; then
        echo "error: a command that needs TensorFlow wrote output in the runtime flavour" >&2
        exit 1
    fi
fi
GUI_SMOKE_S=
if [ "${GUI_SMOKE:-0}" = 1 ]; then
    GUI_SMOKE_START=$(date +%s)
    # A real X server (Xvfb) exercises Qt's xcb plugin and the system libraries it needs.
    if command -v xvfb-run >/dev/null; then
        run_installed xvfb-run -a "$TEST_ROOT/root/usr/bin/hipatlas-gui" --demo --quit-after-register
    else
        run_installed env QT_QPA_PLATFORM=offscreen "$TEST_ROOT/root/usr/bin/hipatlas-gui" --demo --quit-after-register
    fi
    GUI_SMOKE_S=$(( $(date +%s) - GUI_SMOKE_START ))
    echo "GUI smoke test passed"
fi

step "done"
"$PY" packaging/build_report.py write --flavour "$FLAVOUR" --bundle "$BUNDLE" --deb "$DEB" \
    --compression "$COMPRESSION" --build-s "$(( $(date +%s) - START ))" --pyinstaller-s "$PYINSTALLER_S" \
    --deb-s "$DEB_S" --self-test "$SELF_TEST" ${SELF_TEST_S:+--self-test-s "$SELF_TEST_S"} \
    ${SELF_TEST_BACKEND:+--self-test-backend "$SELF_TEST_BACKEND"} ${GUI_SMOKE_S:+--gui-smoke-s "$GUI_SMOKE_S"} \
    --out "dist/build-report-$FLAVOUR.json"
