"""What goes into a HipAtlas installer, in one place.

The PyInstaller spec (``hipatlas.spec``), the build scripts of each platform and
``tests/test_packaging.py`` all read this module, so that the list of shipped resources, the
hidden imports and the version number are written once:

* :data:`BUNDLED_RESOURCES`: the resource folders copied into the bundle (model, atlas, demo);
* :data:`HIDDEN_IMPORTS`, :data:`COLLECT_SUBMODULES`, :data:`EXCLUDES`: what PyInstaller's import
  analysis cannot see, or must leave out;
* :func:`read_version`: the version from ``pyproject.toml``, the only place it is written. The
  Debian control file, the Inno Setup define and the macOS Info.plist are generated from it at
  build time.

Standard library only: it runs inside PyInstaller, from the build scripts (``python
packaging/bundle_manifest.py version``) and in the test suite.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import pathlib
import re
import sys
from dataclasses import dataclass

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the project needs 3.11, but the build host's python may be older
    tomllib = None

ROOT = pathlib.Path(__file__).resolve().parent.parent

APP_NAME = "HipAtlas"
PACKAGE_NAME = "hipatlas"
CLI_NAME = "hipatlas"
GUI_NAME = "hipatlas-gui"
BUNDLE_IDENTIFIER = "org.hipatlas.HipAtlas"
MAINTAINER = "HipAtlas developers <hipatlas@users.noreply.github.com>"
HOMEPAGE = "https://github.com/hipatlas/hipatlas"
SUMMARY = "3D proximal femur from two calibrated radiographs (research use only)"
#: Environment variable that lets the spec build without a resource (a dry run of the packaging
#: itself); a release build never sets it.
ALLOW_MISSING_ENV = "HIPATLAS_ALLOW_MISSING_RESOURCES"


@dataclass(frozen=True)
class BundledResource:
    """A resource folder that the installers ship.

    Attributes
    ----------
    source : str
        Folder relative to the repository root.
    dest : str
        Folder inside the bundle (next to the ``inference`` package, where
        :func:`inference.resources.resources_root` looks).
    what : str
        Words for messages.
    marker : str
        Glob (relative to ``source``) that must match at least one file for the resource to be
        present: an empty folder does not count.
    """

    source: str
    dest: str
    what: str
    marker: str


BUNDLED_RESOURCES: tuple[BundledResource, ...] = (
    BundledResource("resources/models", "resources/models", "the trained registration model", "*/*.keras"),
    BundledResource("resources/atlas", "resources/atlas", "the CT atlas", "*/atlas.json"),
    BundledResource("resources/demo", "resources/demo", "the demo case", "case.json"),
    BundledResource("resources/implants", "resources/implants", "the implant templates", "*.json"),
)

#: Never shipped from a resource folder: work in progress (the atlas builder writes ".<grid>.xxxx"
#: and renames it), editor and OS debris, training checkpoints.
EXCLUDED_PATTERNS: tuple[str, ...] = (".*", "__pycache__", "*.pyc", "*.tmp", "*.partial", "*~", "Thumbs.db",
                                      "checkpoints", "*.ckpt", "*.weights.h5")

#: Packages whose every submodule is bundled: subcommands and Keras layers are imported by name
#: (``importlib.import_module``, Keras deserialisation), which import analysis cannot follow.
COLLECT_SUBMODULES: tuple[str, ...] = ("inference", "app")

#: Modules imported dynamically by our dependencies.
HIDDEN_IMPORTS: tuple[str, ...] = (
    # VTK's OpenGL back-ends register themselves through object factories when their module is
    # imported; pyvista imports some of them lazily on the first render.
    "vtkmodules.vtkRenderingOpenGL2",
    "vtkmodules.vtkRenderingFreeType",
    "vtkmodules.vtkRenderingContextOpenGL2",
    "vtkmodules.vtkRenderingVolumeOpenGL2",
    "vtkmodules.vtkRenderingUI",
    "vtkmodules.vtkInteractionStyle",
    "vtkmodules.vtkIOGeometry",
    # pyvistaqt picks its Qt binding at run time through qtpy-like checks.
    "PySide6.QtOpenGL",
    "PySide6.QtOpenGLWidgets",
    "PySide6.QtSvg",
    # pydicom finds its pixel data handlers by name.
    "pydicom.pixels",
    "pydicom.encoders",
    # PDF reports.
    "reportlab.graphics.barcode",
    # Keras 3 saving looks layers up through these packages.
    "keras.src.saving",
    "keras.src.layers",
)

#: Development tools, tests and alternative bindings that must not end up in the bundle. Other Qt
#: bindings are excluded because PyInstaller refuses to collect two of them, and pyvista/vtk
#: mention several.
EXCLUDES: tuple[str, ...] = (
    "tests", "benchmarks",
    "pytest", "_pytest", "pytestqt", "pytest_qt", "pytest_timeout", "pluggy", "importlinter", "grimp",
    "IPython", "ipykernel", "ipywidgets", "jupyter_client", "jupyter_core", "notebook", "nest_asyncio",
    "tkinter", "_tkinter",
    "PyQt5", "PyQt6", "PySide2",
    "torch", "jax", "jaxlib",
    "tensorboard",
    "trame", "trame_vtk", "trame_vuetify", "trame_server", "trame_client", "wslink", "aiohttp",
    "vtkmodules.web", "vtkmodules.test", "vtkmodules.tk",
    "sphinx", "docutils",
)

# --------------------------------------------------------------------------------------------
# Flavours: the full installer and the TensorFlow-free workstation runtime
# --------------------------------------------------------------------------------------------

#: Environment variable the build scripts and the spec read: ``full`` (default) or ``runtime``.
FLAVOUR_ENV = "HIPATLAS_FLAVOUR"
#: ``full``: TensorFlow inside (training, evaluation, ONNX export, test-time refinement, both
#: backends). ``runtime``: registration, mask proposal, self-test and the workstation through ONNX
#: Runtime only (packaging/requirements-onnx.txt), no TensorFlow and no SimpleITK.
FLAVOURS: tuple[str, ...] = ("full", "runtime")

#: Top-level packages the runtime flavour must not contain: the TensorFlow stack, the exporters and
#: what only they pull in, and SimpleITK. The spec excludes them and fails the build if one is still
#: collected (:func:`forbidden_in_bundle`).
RUNTIME_FORBIDDEN: tuple[str, ...] = (
    "tensorflow", "tensorflow_io_gcs_filesystem", "tensorflow_estimator", "tensorboard",
    "tensorboard_data_server", "tf_keras", "keras", "tf2onnx", "onnx", "jax", "jaxlib", "torch",
    # SimpleITK is one 259 MiB library (stripping saves nothing) of which registration, the self-test
    # and the workstation only use NIfTI/MetaImage file I/O: inference.io falls back to the numpy
    # reader and writer (inference.imageio_numpy) where it cannot be imported. What needs the rest
    # of it (CT import, the registration baselines) is not part of this flavour (issue 20).
    "SimpleITK",
)
#: Shared-library name stems that mean TensorFlow (or another forbidden runtime) slipped in.
RUNTIME_FORBIDDEN_LIBRARIES: tuple[str, ...] = ("libtensorflow", "_pywrap_tensorflow", "libjax", "libtorch",
                                                "libxla", "_pywrap_tf")
#: Hidden imports that only the full flavour has (they name TensorFlow's Keras).
FULL_ONLY_HIDDEN_IMPORTS: tuple[str, ...] = ("keras.src.saving", "keras.src.layers")


#: The runtime flavour leaves out VTK's all-in-one modules: pyvista names ``vtk`` (which imports
#: ``vtkmodules.all``, every VTK library, ~550 MB) only for type checkers, and imports the VTK
#: modules it uses lazily from a table (:func:`pyvista_vtk_modules`), which become hidden imports.
RUNTIME_VTK_EXCLUDES: tuple[str, ...] = ("vtk", "vtkmodules.all")


def pyvista_vtk_modules() -> list[str]:
    """Every VTK module pyvista's lazy import table (``pyvista._vtk``) can load, as module names.

    Read from the installed pyvista at build time, so that a pyvista upgrade that maps a class to
    a new module bundles it.
    """
    from pyvista import _vtk  # the build environment's pyvista; imports no VTK library

    tables = [value for name, value in vars(_vtk).items()
              if name.startswith("_") and name.endswith("_MODULES") and isinstance(value, dict)]
    if not tables:
        raise SystemExit("pyvista._vtk has no *_MODULES tables: this pyvista loads VTK differently; "
                         "update RUNTIME_VTK_EXCLUDES in packaging/bundle_manifest.py")
    return sorted({f"vtkmodules.{module}" for table in tables for module in table})


def flavour(name: str | None = None) -> str:
    """``name``, else ``$HIPATLAS_FLAVOUR``, else ``full``; validated."""
    value = (name or os.environ.get(FLAVOUR_ENV, "") or "full").strip().lower()
    if value not in FLAVOURS:
        raise SystemExit(f"{FLAVOUR_ENV} must be one of {', '.join(FLAVOURS)}, not {value!r}")
    return value


def excludes(name: str | None = None) -> list[str]:
    """PyInstaller ``excludes`` of a flavour."""
    result = list(EXCLUDES)
    if flavour(name) == "runtime":
        result += [m for m in RUNTIME_FORBIDDEN + RUNTIME_VTK_EXCLUDES if m not in result]
    return result


def hidden_imports(name: str | None = None) -> list[str]:
    """PyInstaller ``hiddenimports`` of a flavour (before the collected submodules)."""
    if flavour(name) == "runtime":
        hidden = [m for m in HIDDEN_IMPORTS if m not in FULL_ONLY_HIDDEN_IMPORTS]
        return hidden + [m for m in pyvista_vtk_modules() if m not in hidden]
    return list(HIDDEN_IMPORTS)


#: Bundled libraries whose symbol tables the runtime flavour strips: VTK's wheels ship them
#: unstripped (libvtkCommonCore 98 -> 62 MB). Only these: libraries that auditwheel patched
#: (numpy.libs, scipy.libs, ...) break when stripped ("ELF load command address/offset not
#: page-aligned", measured), which is why PyInstaller's own ``strip=True`` is not used.
RUNTIME_STRIP_PATTERNS: tuple[str, ...] = ("vtkmodules/*.so", "vtkmodules/*.so.*")


def strip_patterns(name: str | None = None) -> tuple[str, ...]:
    """Bundle paths of the libraries to strip in a flavour (Linux only; none for the full flavour)."""
    if flavour(name) == "runtime" and sys.platform.startswith("linux"):
        return RUNTIME_STRIP_PATTERNS
    return ()


def stripped_binaries(binaries, work_dir: str | os.PathLike, patterns: tuple[str, ...]) -> list[tuple]:
    """PyInstaller's binaries TOC with the entries matching ``patterns`` replaced by stripped copies.

    ``strip --strip-unneeded`` writes each copy under ``work_dir/stripped/<bundle path>`` (kept
    between builds, redone when the source is newer); the bundle path and type stay the same.
    """
    import subprocess

    result = []
    for entry in binaries:
        dest, src, typecode = entry[0], entry[1], entry[2]
        if not any(fnmatch.fnmatch(dest, pattern) for pattern in patterns):
            result.append(tuple(entry))
            continue
        out = pathlib.Path(work_dir) / "stripped" / dest
        if not out.is_file() or out.stat().st_mtime < os.stat(src).st_mtime:
            out.parent.mkdir(parents=True, exist_ok=True)
            partial = out.with_name(out.name + ".partial")
            subprocess.run(["strip", "--strip-unneeded", "-o", str(partial), str(src)], check=True)
            os.replace(partial, out)
        result.append((dest, str(out), typecode))
    return result


def package_name(name: str | None = None) -> str:
    """Debian package (and bundle folder) name: ``hipatlas`` or ``hipatlas-runtime``."""
    return PACKAGE_NAME if flavour(name) == "full" else f"{PACKAGE_NAME}-{flavour(name)}"


def _forbidden_module(module: str) -> str | None:
    for banned in RUNTIME_FORBIDDEN:
        if module == banned or module.startswith(banned + "."):
            return banned
    return None


def forbidden_in_bundle(modules=(), files=(), name: str | None = None) -> list[str]:
    """What a flavour's bundle must not hold, among module names (PyInstaller's ``a.pure``) and
    file paths (``a.binaries``/``a.datas`` destinations, or files of a built bundle).

    Empty for the full flavour. A file counts when a folder of its path is a forbidden top-level
    package (``tensorflow/...``, ``_internal/keras/...``) or its name starts with a forbidden
    library stem.
    """
    if flavour(name) == "full":
        return []
    found = set()
    for module in modules:
        banned = _forbidden_module(module)
        if banned:
            found.add(f"module {banned}")
    tops = {m for m in RUNTIME_FORBIDDEN if "." not in m}
    # distribution folders spell the name in lower case (simpleitk-2.5.7.dist-info)
    distributions = {m.lower() for m in tops}
    for path in files:
        parts = pathlib.PurePath(str(path).replace("\\", "/")).parts
        for part in parts[:-1]:
            if part in tops or part.split("-")[0].lower() in distributions and part.endswith((".dist-info", ".libs")):
                found.add(f"folder {part}")
        base = parts[-1] if parts else ""
        if base.startswith(RUNTIME_FORBIDDEN_LIBRARIES):
            found.add(f"library {base}")
    return sorted(found)


def bundle_files(folder: str | os.PathLike) -> list[str]:
    """Paths (relative, POSIX) of every file and symlink under a built bundle."""
    folder = pathlib.Path(folder)
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir() or p.is_symlink())


#: Bundled as plain ``.py`` next to the bytecode: TensorFlow's AutoGraph reads the source of
#: functions it converts (our layers), and tracebacks in support logs then show code lines.
SOURCE_PACKAGES: tuple[str, ...] = ("inference", "app")


# --------------------------------------------------------------------------------------------
# Version
# --------------------------------------------------------------------------------------------

def read_version(root: str | os.PathLike = ROOT) -> str:
    """``[project] version`` of ``<root>/pyproject.toml``: the only place the number is written."""
    path = pathlib.Path(root) / "pyproject.toml"
    text = path.read_text(encoding="utf-8")
    if tomllib is not None:
        version = tomllib.loads(text).get("project", {}).get("version")
    else:  # pragma: no cover
        match = re.search(r'^version\s*=\s*"([^"]+)"', text, re.M)
        version = match.group(1) if match else None
    if not isinstance(version, str) or not version:
        raise ValueError(f"{path} has no [project] version")
    return version


_PEP440 = re.compile(r"^(?P<release>\d+(?:\.\d+)*)(?:[-_.]?(?P<pre>a|b|rc)(?P<pre_n>\d+))?"
                     r"(?:[-_.]?post(?P<post>\d+))?(?:[-_.]?dev(?P<dev>\d+))?(?:\+(?P<local>[A-Za-z0-9.]+))?$")


def _parse(version: str) -> re.Match:
    match = _PEP440.match(version)
    if not match:
        raise ValueError(f"version {version!r} is not a PEP 440 version this packaging understands")
    return match


def debian_version(version: str) -> str:
    """The Debian spelling of a PEP 440 version: pre-releases and dev builds sort before the
    release with ``~`` (``1.0rc1`` -> ``1.0~rc1``), post releases after it with ``+post``."""
    match = _parse(version)
    text = match["release"]
    if match["pre"]:
        text += f"~{match['pre']}{match['pre_n']}"
    if match["post"]:
        text += f"+post{match['post']}"
    if match["dev"]:
        text += f"~dev{match['dev']}"
    if match["local"]:
        text += f"+{match['local'].replace('_', '.')}"
    return text


def numeric_version(version: str) -> tuple[int, int, int, int]:
    """Four integers for Windows version resources and Inno Setup's ``VersionInfoVersion``."""
    parts = [int(p) for p in _parse(version)["release"].split(".")][:4]
    return tuple(parts + [0] * (4 - len(parts)))  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Resources
# --------------------------------------------------------------------------------------------

def _excluded(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in EXCLUDED_PATTERNS)


def is_present(resource: BundledResource, root: str | os.PathLike = ROOT) -> bool:
    folder = pathlib.Path(root) / resource.source
    return any(p.is_file() and not any(_excluded(part) for part in p.relative_to(folder).parts)
               for p in folder.glob(resource.marker))


def missing_resources(root: str | os.PathLike = ROOT) -> list[BundledResource]:
    """The bundled resources that are not (yet) in the source tree."""
    return [r for r in BUNDLED_RESOURCES if not is_present(r, root)]


def _default_model_only(base: pathlib.Path) -> set[str] | None:
    """The model folders an installer ships: only those ``models/DEFAULT`` names, one per line
    (several: registration averages them), None: all.

    The source tree may hold other models, e.g. ``compact-v2``, kept for held-out evaluation on a
    specimen the default model learnt from; an installed workstation registers with the default
    and has no bone surfaces to evaluate on, so they would add 15 MB each for nothing."""
    pointer = base / "DEFAULT"
    if not pointer.is_file():
        return None
    return {line.strip() for line in pointer.read_text(encoding="utf-8").splitlines() if line.strip()}


def resource_files(root: str | os.PathLike = ROOT) -> list[tuple[pathlib.Path, str]]:
    """Every file to ship: (absolute source file, destination folder inside the bundle).

    Files and folders matching :data:`EXCLUDED_PATTERNS` are skipped, at any depth; of the models,
    only the default one (:func:`_default_model_only`).
    """
    root = pathlib.Path(root)
    files = []
    for resource in BUNDLED_RESOURCES:
        base = root / resource.source
        if not base.is_dir():
            continue
        only = _default_model_only(base) if resource.source == "resources/models" else None
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = sorted(d for d in dirnames if not _excluded(d)
                                 and (only is None or pathlib.Path(dirpath) != base or d in only))
            relative = pathlib.Path(dirpath).relative_to(base)
            for name in sorted(filenames):
                if not _excluded(name):
                    dest = pathlib.PurePosixPath(resource.dest, *relative.parts)
                    files.append((pathlib.Path(dirpath) / name, str(dest)))
    return files


def pyinstaller_datas(root: str | os.PathLike = ROOT, *, allow_missing: bool | None = None
                      ) -> list[tuple[str, str]]:
    """``datas`` for PyInstaller's Analysis: every resource file, plus ``pyproject.toml``.

    ``pyproject.toml`` goes to the bundle's top so that :data:`inference.__version__` finds the
    version even if the package metadata were not collected.

    Raises
    ------
    SystemExit
        When a resource is missing, unless ``allow_missing`` (default: the environment variable
        :data:`ALLOW_MISSING_ENV` is "1"): an installer without its model cannot work offline.
    """
    root = pathlib.Path(root)
    if allow_missing is None:
        allow_missing = os.environ.get(ALLOW_MISSING_ENV) == "1"
    missing = missing_resources(root)
    if missing and not allow_missing:
        names = "; ".join(f"{r.what} ({r.source}/{r.marker})" for r in missing)
        raise SystemExit(f"cannot build the HipAtlas bundle: missing {names}. Build or install them first "
                         f"(set {ALLOW_MISSING_ENV}=1 only for a dry run of the packaging).")
    datas = [(str(src), dest) for src, dest in resource_files(root)]
    datas.append((str(root / "pyproject.toml"), "."))
    return datas


def bundle_size_bytes(folder: str | os.PathLike) -> int:
    """Bytes of all regular files under ``folder`` (symlinks not followed)."""
    total = 0
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                total += os.path.getsize(path)
    return total


# --------------------------------------------------------------------------------------------
# macOS
# --------------------------------------------------------------------------------------------

def macos_info_plist(version: str) -> dict[str, object]:
    """Info.plist entries of HipAtlas.app (PyInstaller's BUNDLE fills in the rest)."""
    return {
        "CFBundleName": APP_NAME,
        "CFBundleDisplayName": APP_NAME,
        "CFBundleShortVersionString": version,
        "CFBundleVersion": ".".join(str(n) for n in numeric_version(version)[:3]),
        "CFBundleIdentifier": BUNDLE_IDENTIFIER,
        "NSHighResolutionCapable": True,
        "LSMinimumSystemVersion": "11.0",
        "NSHumanReadableCopyright": "HipAtlas developers, Apache-2.0. Research use only, not for diagnosis.",
        "LSApplicationCategoryType": "public.app-category.medical",
    }


# --------------------------------------------------------------------------------------------
# Command line for the build scripts
# --------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="HipAtlas bundle manifest (used by the build scripts)")
    parser.add_argument("what", choices=["version", "debian-version", "numeric-version", "check", "list",
                                         "package-name", "check-bundle"])
    parser.add_argument("--root", default=str(ROOT), help="repository root")
    parser.add_argument("--flavour", default=None, choices=FLAVOURS,
                        help=f"installer flavour (default: ${FLAVOUR_ENV}, else full)")
    parser.add_argument("--bundle", default=None, help="check-bundle: the built bundle folder")
    args = parser.parse_args(argv)
    if args.what == "package-name":
        print(package_name(args.flavour))
        return 0
    if args.what == "check-bundle":
        if not args.bundle:
            parser.error("check-bundle needs --bundle")
        found = forbidden_in_bundle(files=bundle_files(args.bundle), name=args.flavour)
        for item in found:
            print(f"forbidden in the {flavour(args.flavour)} flavour: {item}", file=sys.stderr)
        return 1 if found else 0
    version = read_version(args.root)
    if args.what == "version":
        print(version)
    elif args.what == "debian-version":
        print(debian_version(version))
    elif args.what == "numeric-version":
        print(".".join(str(n) for n in numeric_version(version)))
    elif args.what == "check":
        missing = missing_resources(args.root)
        for resource in missing:
            print(f"missing: {resource.what} ({resource.source}/{resource.marker})", file=sys.stderr)
        return 1 if missing else 0
    else:
        for src, dest in resource_files(args.root):
            print(f"{dest}\t{src}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
