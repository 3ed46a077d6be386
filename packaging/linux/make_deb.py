"""Turn the PyInstaller one-folder bundle into a Debian package.

Layout of the package::

    /opt/hipatlas/                         the bundle (hipatlas, hipatlas-gui, _internal/)
    /usr/bin/hipatlas, /usr/bin/hipatlas-gui   relative symlinks into /opt/hipatlas
    /usr/share/applications/hipatlas.desktop
    /usr/share/icons/hicolor/<n>x<n>/apps/hipatlas.png, scalable/apps/hipatlas.svg
    /usr/share/doc/hipatlas/copyright

The symlinks are relative (``../../opt/hipatlas/hipatlas``) so that the package also works when
extracted under another root (``dpkg-deb -x``), which is how build_linux.sh tests it. No maintainer
scripts: the desktop database and icon cache are refreshed by the dpkg triggers of
desktop-file-utils and hicolor-icon-theme.

The version comes from pyproject.toml (through bundle_manifest); the lowest glibc the package
needs is read from the bundled binaries themselves.

Usage::

    python packaging/linux/make_deb.py --bundle dist/hipatlas --icons build/icons --out dist
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import re
import shutil
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import bundle_manifest as bm  # noqa: E402

INSTALL_DIR = "opt/hipatlas"

#: System libraries the bundle does not carry: PyInstaller never bundles libGL/libEGL/libxcb (they
#: must match the local graphics driver), and Qt's xcb platform plugin needs the xcb helpers
#: (found with ldd on PySide6's libqxcb.so and libQt6XcbQpa.so). Debian 12 names; Ubuntu 24.04's
#: "t64" packages provide the same names.
DEPENDS: tuple[str, ...] = (
    "libgl1", "libegl1", "libfontconfig1", "libfreetype6", "libdbus-1-3", "libglib2.0-0",
    "libx11-6", "libx11-xcb1", "libxkbcommon0", "libxkbcommon-x11-0",
    "libxcb1", "libxcb-cursor0", "libxcb-icccm4", "libxcb-image0", "libxcb-keysyms1", "libxcb-randr0",
    "libxcb-render0", "libxcb-render-util0", "libxcb-shape0", "libxcb-shm0", "libxcb-sync1",
    "libxcb-util1", "libxcb-xfixes0", "libxcb-xkb1",
)
#: Software OpenGL for machines without a GPU driver (virtual machines, remote desktops).
RECOMMENDS: tuple[str, ...] = ("libgl1-mesa-dri", "libegl-mesa0")
DEFAULT_MIN_GLIBC = "2.17"  # manylinux2014, the oldest that the bundled wheels target

_GLIBC_SYMBOL = re.compile(rb"GLIBC_(2\.\d+)")
_ELF_MAGIC = b"\x7fELF"


def debian_arch() -> str:
    """dpkg's name of this machine's architecture."""
    try:
        return subprocess.run(["dpkg", "--print-architecture"], check=True, capture_output=True,
                              text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


def deb_filename(version: str, arch: str, flavour: str = "full") -> str:
    return f"{bm.package_name(flavour)}_{bm.debian_version(version)}_{arch}.deb"


def _version_key(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("."))


def min_glibc(folder: str | os.PathLike) -> str:
    """Highest ``GLIBC_2.x`` symbol version any ELF file under ``folder`` asks for.

    Bundled libraries come from the wheels and from the build host, so the build host's glibc
    age, not a guess, decides the oldest system the package installs on.
    """
    best = DEFAULT_MIN_GLIBC
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            try:
                with open(path, "rb") as handle:
                    if handle.read(4) != _ELF_MAGIC:
                        continue
                    data = handle.read()
            except OSError:
                continue
            for match in set(_GLIBC_SYMBOL.findall(data)):
                version = match.decode()
                if _version_key(version) > _version_key(best):
                    best = version
    return best


def missing_system_libraries(folder: str | os.PathLike) -> dict[str, list[str]]:
    """Shared libraries that bundled binaries need and neither the bundle nor this system has.

    ``ldd`` reports every dependency it cannot resolve, including libraries that wheels vendor
    under hashed names next to them (found at run time through their RPATH) and that are in the
    bundle; those are left out here. What remains must come from the package's Depends, or
    belongs to an optional plugin (Qt's GTK theme and Wayland plugins are never needed on X11).

    Returns
    -------
    dict
        Library name -> bundled files (relative paths) that need it.
    """
    folder = pathlib.Path(folder)
    libraries = [p for p in folder.rglob("*.so*") if p.is_file() and not p.is_symlink()]
    bundled = {p.name for p in folder.rglob("*.so*")}
    missing: dict[str, list[str]] = {}
    for start in range(0, len(libraries), 50):
        chunk = libraries[start:start + 50]
        result = subprocess.run(["ldd", *map(str, chunk)], capture_output=True, text=True)
        current = None
        for line in result.stdout.splitlines():
            if not line.startswith(("\t", " ")) and line.endswith(":"):
                current = line[:-1]
            elif "=> not found" in line:
                name = line.split("=>")[0].strip()
                if name not in bundled and current is not None:
                    missing.setdefault(name, []).append(str(pathlib.Path(current).relative_to(folder)))
    return missing


RUNTIME_SUMMARY = "HipAtlas registration runtime without TensorFlow (research use only)"
#: What each flavour says it holds, as the last paragraph of the package description.
FLAVOUR_DESCRIPTIONS = {
    "full": (" This is the full installation: TensorFlow is included for training,\n"
             " evaluation, ONNX export and the test-time refinement; registration runs\n"
             " with ONNX Runtime or TensorFlow."),
    "runtime": (" This is the workstation runtime without TensorFlow: registration, mask\n"
                " proposal, the self-test and the planning workstation run the shipped\n"
                " model's ONNX export with ONNX Runtime. Training, evaluation, ONNX export\n"
                " and the test-time refinement are not included (install hipatlas for them)."),
}


def control_text(version: str, arch: str, installed_size_kib: int, glibc: str = DEFAULT_MIN_GLIBC,
                 flavour: str = "full") -> str:
    """The DEBIAN/control file (the version is the Debian spelling of pyproject's).

    Both flavours install the same files (/opt/hipatlas, /usr/bin/hipatlas): each conflicts with
    and replaces the other, so installing one swaps out the other.
    """
    depends = ", ".join((f"libc6 (>= {glibc})", *DEPENDS))
    package = bm.package_name(flavour)
    others = ", ".join(bm.package_name(f) for f in bm.FLAVOURS if f != bm.flavour(flavour))
    description = (
        f"{bm.SUMMARY if package == bm.PACKAGE_NAME else RUNTIME_SUMMARY}\n"
        " HipAtlas reconstructs a patient's proximal femur in 3D from two calibrated\n"
        " radiographs (AP and lateral) by registering a CT atlas with a deep network,\n"
        " then measures the hip centre, femoral head radius, femoral offset and\n"
        " neck-shaft angle for hip replacement planning.\n"
        " .\n"
        " Everything runs offline on the CPU; the trained model, the atlas and a demo\n"
        " case are included. Run `hipatlas --self-test` after installing.\n"
        " .\n"
        f"{FLAVOUR_DESCRIPTIONS[bm.flavour(flavour)]}\n"
        " .\n"
        " Research use only: not for diagnosis or treatment decisions."
    )
    fields = [
        ("Package", package),
        ("Version", bm.debian_version(version)),
        ("Architecture", arch),
        ("Maintainer", bm.MAINTAINER),
        ("Installed-Size", str(installed_size_kib)),
        ("Depends", depends),
        ("Recommends", ", ".join(RECOMMENDS)),
        ("Conflicts", others),
        ("Replaces", others),
        ("Section", "science"),
        ("Priority", "optional"),
        ("Homepage", bm.HOMEPAGE),
        ("Description", description),
    ]
    return "".join(f"{key}: {value}\n" for key, value in fields)


def _link_or_copy(src: str, dst: str) -> None:
    # Hard links make staging a 2 GB bundle instant; fall back to copying across file systems.
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def stage(bundle: pathlib.Path, icons: pathlib.Path, staging: pathlib.Path, version: str, arch: str,
          glibc: str | None = None, flavour: str = "full") -> pathlib.Path:
    """Lay out the package tree under ``staging``; returns the path of DEBIAN/control."""
    for executable in (bm.CLI_NAME, bm.GUI_NAME):
        if not (bundle / executable).is_file():
            raise SystemExit(f"{bundle / executable} is missing: build the bundle with PyInstaller first")
    target = staging / INSTALL_DIR
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(bundle, target, symlinks=True, copy_function=_link_or_copy)

    bin_dir = staging / "usr" / "bin"
    bin_dir.mkdir(parents=True)
    for executable in (bm.CLI_NAME, bm.GUI_NAME):
        os.symlink(os.path.relpath(target / executable, bin_dir), bin_dir / executable)

    applications = staging / "usr" / "share" / "applications"
    applications.mkdir(parents=True)
    shutil.copy2(HERE / "hipatlas.desktop", applications / "hipatlas.desktop")
    hicolor = staging / "usr" / "share" / "icons" / "hicolor"
    (hicolor / "scalable" / "apps").mkdir(parents=True)
    shutil.copy2(HERE.parent / "icons" / "hipatlas.svg", hicolor / "scalable" / "apps" / "hipatlas.svg")
    for png in sorted(icons.glob("hipatlas-*.png")):
        size = png.stem.split("-")[-1]
        folder = hicolor / f"{size}x{size}" / "apps"
        folder.mkdir(parents=True)
        shutil.copy2(png, folder / "hipatlas.png")
    doc = staging / "usr" / "share" / "doc" / bm.package_name(flavour)
    doc.mkdir(parents=True)
    shutil.copy2(HERE / "copyright", doc / "copyright")

    for dirpath, dirnames, filenames in os.walk(staging):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o755)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                mode = os.stat(path).st_mode
                os.chmod(path, 0o755 if mode & 0o111 else 0o644)

    installed_kib = (bm.bundle_size_bytes(staging) + 1023) // 1024
    control_dir = staging / "DEBIAN"
    control_dir.mkdir(mode=0o755)
    control = control_dir / "control"
    control.write_text(control_text(version, arch, installed_kib, glibc or min_glibc(target), flavour))
    os.chmod(control, 0o644)
    return control


def build_deb(staging: pathlib.Path, out_file: pathlib.Path, compression: str = "zstd",
              level: int | None = None) -> None:
    command = ["dpkg-deb", "--root-owner-group", f"-Z{compression}"]
    if level is not None:
        command.append(f"-z{level}")
    command += ["--build", str(staging), str(out_file)]
    subprocess.run(command, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the HipAtlas .deb from a PyInstaller bundle")
    parser.add_argument("--bundle", default=str(bm.ROOT / "dist" / "hipatlas"), help="PyInstaller output folder")
    parser.add_argument("--icons", default=str(bm.ROOT / "build" / "icons"), help="output of make_icons.py")
    parser.add_argument("--out", default=str(bm.ROOT / "dist"), help="folder that receives the .deb")
    parser.add_argument("--arch", default=None, help="Debian architecture (default: this machine's)")
    parser.add_argument("--compression", default="zstd", choices=["zstd", "xz", "gzip", "none"],
                        help="zstd (default) builds fast and is read by the dpkg of every distribution with "
                        "the glibc the bundle needs (Debian 12, Ubuntu 24.04 and newer); xz is smaller, much "
                        "slower to build, and needed only for dpkg older than 1.21.18 (Debian 11)")
    parser.add_argument("--level", type=int, default=None, help="compression level (dpkg-deb -z)")
    parser.add_argument("--flavour", default=None, choices=bm.FLAVOURS,
                        help=f"full (with TensorFlow, package hipatlas) or runtime (ONNX Runtime only, package "
                        f"hipatlas-runtime); default ${bm.FLAVOUR_ENV}, else full")
    parser.add_argument("--control-only", action="store_true", help="print the control file and exit")
    parser.add_argument("--check-libs", metavar="DIR", help="list the system libraries that the binaries "
                        "under DIR need and this machine lacks, then exit (status 1 if any)")
    args = parser.parse_args(argv)
    if args.check_libs:
        missing = missing_system_libraries(args.check_libs)
        for name, users in sorted(missing.items()):
            print(f"{name} (needed by {users[0]}{f' and {len(users) - 1} more' if len(users) > 1 else ''})")
        return 1 if missing else 0

    version = bm.read_version()
    arch = args.arch or debian_arch()
    flavour = bm.flavour(args.flavour)
    if args.control_only:
        sys.stdout.write(control_text(version, arch, 0, flavour=flavour))
        return 0
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    out_file = out_dir / deb_filename(version, arch, flavour)
    staging_parent = pathlib.Path(tempfile.mkdtemp(prefix="hipatlas-deb-", dir=str(bm.ROOT / "build")
                                                   if (bm.ROOT / "build").is_dir() else None))
    try:
        staging = staging_parent / "root"
        stage(pathlib.Path(args.bundle), pathlib.Path(args.icons), staging, version, arch, flavour=flavour)
        # Build next to the target and rename, so a failed build never leaves a truncated .deb.
        partial = out_file.with_name(out_file.name + ".partial")
        build_deb(staging, partial, args.compression, args.level)
        os.replace(partial, out_file)
    finally:
        shutil.rmtree(staging_parent, ignore_errors=True)
    print(out_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
