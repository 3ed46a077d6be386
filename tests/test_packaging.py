"""Installers: bundle manifest, PyInstaller spec, Debian layout, version, integrity check, self-test CLI.

The full build (packaging/build_linux.sh) takes many minutes and is not run here; these tests
check every piece it is made of on tiny inputs.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tomllib

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGING = ROOT / "packaging"
sys.path.insert(0, str(PACKAGING))
sys.path.insert(0, str(PACKAGING / "linux"))

import bundle_manifest as bm  # noqa: E402
import make_deb  # noqa: E402
import make_icons  # noqa: E402
from packaging_helpers import run_spec  # noqa: E402

from inference import resources  # noqa: E402
from inference.errors import DataError, ModelError  # noqa: E402

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]


# --------------------------------------------------------------------------------------------
# Bundle manifest
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("resource", bm.BUNDLED_RESOURCES, ids=lambda r: r.source)
def test_bundled_resource_is_in_the_source_tree(resource):
    if not bm.is_present(resource):
        pytest.skip(f"{resource.what} is not in {resource.source} yet (no {resource.marker}); "
                    "the installer build refuses to run until it is")
    files = [(src, dest) for src, dest in bm.resource_files() if dest.startswith(resource.dest)]
    assert files, resource
    for src, dest in files:
        assert src.is_file(), src
        assert pathlib.PurePosixPath(dest, src.name).relative_to(resource.dest)
        assert not any(part.startswith(".") for part in src.relative_to(ROOT).parts), src


def test_resource_files_skip_work_in_progress_and_keep_structure(tmp_path):
    (tmp_path / "resources" / "atlas" / "paper").mkdir(parents=True)
    (tmp_path / "resources" / "atlas" / "paper" / "atlas.json").write_text("{}")
    (tmp_path / "resources" / "atlas" / ".paper.tmp123").mkdir()
    (tmp_path / "resources" / "atlas" / ".paper.tmp123" / "atlas.json").write_text("{}")
    (tmp_path / "resources" / "models" / "m" / "checkpoints").mkdir(parents=True)
    (tmp_path / "resources" / "models" / "m" / "m.keras").write_bytes(b"x")
    (tmp_path / "resources" / "models" / "m" / "checkpoints" / "epoch1.keras").write_bytes(b"x")
    (tmp_path / "resources" / "models" / "m" / "notes.txt~").write_text("x")
    files = {(src.relative_to(tmp_path).as_posix(), dest) for src, dest in bm.resource_files(tmp_path)}
    assert files == {("resources/atlas/paper/atlas.json", "resources/atlas/paper"),
                     ("resources/models/m/m.keras", "resources/models/m")}
    assert [r.source for r in bm.missing_resources(tmp_path)] == ["resources/demo", "resources/implants"]


def test_installers_ship_only_the_default_model(tmp_path):
    models = tmp_path / "resources" / "models"
    for name in ("a-held-out", "b-default"):
        (models / name).mkdir(parents=True)
        (models / name / "m.keras").write_bytes(b"x")
    shipped = lambda: {src.relative_to(tmp_path).as_posix() for src, _ in bm.resource_files(tmp_path)}  # noqa: E731
    assert shipped() == {"resources/models/a-held-out/m.keras", "resources/models/b-default/m.keras"}
    (models / "DEFAULT").write_text("b-default\n")
    assert shipped() == {"resources/models/DEFAULT", "resources/models/b-default/m.keras"}
    (models / "DEFAULT").write_text("b-default\na-held-out\n")  # an ensemble: both ship
    assert shipped() == {"resources/models/DEFAULT", "resources/models/a-held-out/m.keras",
                         "resources/models/b-default/m.keras"}


def test_build_refuses_missing_resources_with_a_clear_message(tmp_path):
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with pytest.raises(SystemExit, match=r"missing the trained registration model .*resources/models"):
        bm.pyinstaller_datas(tmp_path, allow_missing=False)
    datas = bm.pyinstaller_datas(tmp_path, allow_missing=True)
    assert datas == [(str(tmp_path / "pyproject.toml"), ".")]


# --------------------------------------------------------------------------------------------
# The spec, executed against a recording stand-in of PyInstaller's build API
# --------------------------------------------------------------------------------------------

def test_spec_bundles_the_manifest_and_two_executables(monkeypatch):
    spec = run_spec(monkeypatch)
    (analysis,) = spec["Analysis"]
    scripts = [pathlib.Path(s).name for s in analysis.args[0]]
    assert scripts == ["hipatlas_cli.py", "hipatlas_gui.py"]
    datas = analysis.kwargs["datas"]
    for src, dest in bm.resource_files():
        assert (str(src), dest) in datas
    assert (str(ROOT / "pyproject.toml"), ".") in datas
    assert any("hipatlas-" in dest and dest.endswith(".dist-info") for _, dest in datas)
    hidden = set(analysis.kwargs["hiddenimports"])
    assert {"inference.selftest", "inference.resources", "inference.cli_commands", "app.cli",
            "vtkmodules.vtkRenderingOpenGL2"} <= hidden
    assert {"tests", "pytest", "PyQt5", "tkinter"} <= set(analysis.kwargs["excludes"])
    assert analysis.kwargs["module_collection_mode"]["inference"] == "pyz+py"

    exes = {exe.kwargs["name"]: exe for exe in spec["EXE"]}
    assert set(exes) == {"hipatlas", "hipatlas-gui"}
    assert exes["hipatlas"].kwargs["console"] is True and exes["hipatlas-gui"].kwargs["console"] is False
    # Each executable runs the run-time hooks and its own launcher only.
    assert [s[0] for s in exes["hipatlas"].args[1]] == ["pyi_rth_a", "hipatlas_cli"]
    assert [s[0] for s in exes["hipatlas-gui"].args[1]] == ["pyi_rth_a", "hipatlas_gui"]
    assert all(exe.kwargs["exclude_binaries"] for exe in exes.values())
    (collect,) = spec["COLLECT"]
    assert collect.args[0] is exes["hipatlas-gui"] and collect.args[1] is exes["hipatlas"]
    assert collect.kwargs["name"] == "hipatlas"
    assert spec["BUNDLE"] == []


def test_spec_macos_bundle_and_windows_version_come_from_pyproject(monkeypatch):
    spec = run_spec(monkeypatch, platform="darwin")
    (bundle,) = spec["BUNDLE"]
    assert bundle.kwargs["name"] == "HipAtlas.app"
    assert bundle.kwargs["version"] == VERSION
    assert bundle.kwargs["info_plist"]["CFBundleShortVersionString"] == VERSION
    # The app's main executable is the first in COLLECT: the GUI.
    assert bundle.args[0].args[0].kwargs["name"] == "hipatlas-gui"

    spec = run_spec(monkeypatch, platform="win32")
    for exe in spec["EXE"]:
        info = exe.kwargs["version"]
        fixed = info.a[1]["ffi"].a[1]
        assert fixed["filevers"] == bm.numeric_version(VERSION)
        table = info.a[1]["kids"][0].a[0][0][0].a[0][1]
        strings = {s.a[0][0]: s.a[0][1] for s in table}
        assert strings["ProductVersion"] == VERSION and strings["OriginalFilename"] == exe.kwargs["name"] + ".exe"


# --------------------------------------------------------------------------------------------
# Entry points and the self-test command line
# --------------------------------------------------------------------------------------------

def test_entry_points_import_and_launchers_call_them():
    import app.cli
    from inference import cli

    module, _, function = PYPROJECT["project"]["scripts"]["hipatlas"].partition(":")
    assert (module, function) == ("app.cli", "main") and callable(app.cli.main)
    assert callable(cli.main) and callable(cli.build_parser)
    for launcher in ("hipatlas_cli.py", "hipatlas_gui.py"):
        tree = ast.parse((PACKAGING / "launchers" / launcher).read_text())
        imports = {(node.module, alias.name) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                   for alias in node.names}
        assert ("app.cli", "main") in imports, launcher
    gui_module, _, gui_function = PYPROJECT["project"]["gui-scripts"]["hipatlas-gui"].partition(":")
    gui_file = ROOT / (gui_module.replace(".", "/") + ".py")
    if not gui_file.is_file():
        pytest.skip(f"{gui_file.relative_to(ROOT)} (GUI entry point) is not written yet")
    names = {node.name for node in ast.parse(gui_file.read_text()).body if isinstance(node, ast.FunctionDef)}
    assert gui_function in names


def test_self_test_parses_as_flag_and_subcommand():
    import app.cli
    from inference import cli, selftest

    parser = cli.build_parser(extra=(app.cli._add_gui,))
    assert parser.parse_args(["--self-test"]).self_test is True
    args = parser.parse_args(["self-test", "--out", "x", "--json"])
    assert args.handler is selftest.handle and args.out == "x" and args.json
    assert parser.parse_args(["gui", "--demo"]).demo is True
    assert parser.parse_args([]).self_test is False


def test_version_flag_prints_pyproject_version(capsys):
    from inference import cli

    with pytest.raises(SystemExit) as stop:
        cli.run(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"hipatlas {VERSION}"


def test_self_test_fails_with_exit_1_on_a_damaged_installation(tmp_path, monkeypatch, capsys):
    from inference import cli

    root = _fake_resources(tmp_path / "res")
    _flip_byte(root / "models" / "m1" / "m1.keras")
    monkeypatch.setenv(resources.RESOURCES_ENV, str(root))
    monkeypatch.delenv("HIPATLAS_ATLAS_DIR", raising=False)
    assert cli.run(["--self-test"]) == 1
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "self-test FAILED" in line and "m1.keras is damaged" in line and "reinstall HipAtlas" in line


# --------------------------------------------------------------------------------------------
# Version: one number, from pyproject.toml
# --------------------------------------------------------------------------------------------

def test_versions_agree_everywhere():
    import inference

    assert bm.read_version() == VERSION == inference.__version__
    control = make_deb.control_text(VERSION, "amd64", 1234)
    assert f"\nVersion: {bm.debian_version(VERSION)}\n" in control
    assert bm.macos_info_plist(VERSION)["CFBundleShortVersionString"] == VERSION
    out = subprocess.run([sys.executable, str(PACKAGING / "bundle_manifest.py"), "version"],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == VERSION
    iss = (PACKAGING / "windows" / "hipatlas.iss").read_text()
    assert "AppVersion={#AppVersion}" in iss and "#error AppVersion is not defined" in iss
    assert not re.search(r"#define\s+AppVersion\b", iss)
    build_ps1 = (PACKAGING / "windows" / "build.ps1").read_text()
    assert "bundle_manifest.py version" in build_ps1 and '"/DAppVersion=$Version"' in build_ps1


def test_no_version_number_is_written_in_the_packaging_files():
    literal = re.compile(rf"(?<![\d.]){re.escape(VERSION)}(?![\d.])")
    for path in PACKAGING.rglob("*"):
        if path.is_file() and path.suffix in {".py", ".sh", ".ps1", ".iss", ".spec", ".desktop", ".svg", ""}:
            assert not literal.search(path.read_text(errors="replace")), path


@pytest.mark.parametrize("pep440, debian, numeric", [
    ("0.1.0", "0.1.0", (0, 1, 0, 0)),
    ("1.2rc1", "1.2~rc1", (1, 2, 0, 0)),
    ("2.0.1.post3", "2.0.1+post3", (2, 0, 1, 0)),
    ("1.0.dev4", "1.0~dev4", (1, 0, 0, 0)),
    ("1.0+site.2", "1.0+site.2", (1, 0, 0, 0)),
])
def test_version_spellings(pep440, debian, numeric):
    assert bm.debian_version(pep440) == debian
    assert bm.numeric_version(pep440) == numeric


def test_debian_version_order_matches_pep440():
    if shutil.which("dpkg") is None:
        pytest.skip("dpkg is not installed")
    ordered = ["1.0.dev4", "1.0rc1", "1.0", "1.0.post1"]
    for older, newer in zip(ordered, ordered[1:]):
        result = subprocess.run(["dpkg", "--compare-versions", bm.debian_version(older), "lt",
                                 bm.debian_version(newer)])
        assert result.returncode == 0, (older, newer)


# --------------------------------------------------------------------------------------------
# Integrity check of the shipped resources
# --------------------------------------------------------------------------------------------

def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _flip_byte(path, offset=None):
    data = bytearray(path.read_bytes())
    index = len(data) // 2 if offset is None else offset
    data[index] ^= 0x01
    path.write_bytes(bytes(data))


def _fake_resources(root, grid="compact"):
    """A complete, consistent resources tree of tiny files (real formats are not needed: the
    check compares bytes with recorded checksums)."""
    rng = np.random.default_rng(7)
    model_dir = root / "models" / "m1"
    model_dir.mkdir(parents=True)
    model = model_dir / "m1.keras"
    model.write_bytes(rng.bytes(4096))
    (model_dir / "m1.card.json").write_text(json.dumps(
        {"format": resources.MODEL_CARD_FORMAT, "model_file": "m1.keras", "sha256": _sha(model),
         "config": {"grid": grid}}))
    atlas = root / "atlas" / grid
    atlas.mkdir(parents=True)
    for name in resources.ATLAS_FILES:
        (atlas / name).write_bytes(rng.bytes(512))
    (atlas / "atlas.json").write_text(json.dumps(
        {"format": resources.ATLAS_FORMAT, "files": {n: _sha(atlas / n) for n in resources.ATLAS_FILES}}))
    demo = root / "demo"
    demo.mkdir()
    views = []
    for name in ("ap", "lat"):
        (demo / f"{name}.png").write_bytes(b"png")
        (demo / f"{name}_mask.png").write_bytes(b"png")
        views.append({"name": name, "image": f"{name}.png", "mask": f"{name}_mask.png"})
    (demo / "case.json").write_text(json.dumps({"format": "hipatlas-case/1", "side": "right", "views": views}))
    return root


def test_intact_resources_pass(tmp_path):
    root = _fake_resources(tmp_path)
    assert resources.verify_resources(root, demo=True) == []


def test_corrupted_model_copy_is_refused(tmp_path):
    root = _fake_resources(tmp_path)
    _flip_byte(root / "models" / "m1" / "m1.keras", offset=100)
    with pytest.raises(ModelError, match=r"m1\.keras is damaged \(sha256 mismatch.*reinstall HipAtlas"):
        resources.verify_resources(root)
    problems = resources.verify_resources(root, strict=False)
    assert [(p.kind, p.path.name) for p in problems] == [("model", "m1.keras")]


def test_corrupted_atlas_file_is_refused(tmp_path):
    root = _fake_resources(tmp_path)
    _flip_byte(root / "atlas" / "compact" / "labels.nii.gz")
    with pytest.raises(DataError, match=r"atlas file .*labels\.nii\.gz is damaged"):
        resources.verify_resources(root)


@pytest.mark.parametrize("damage, kind, text", [
    (lambda r: (r / "models" / "m1" / "m1.card.json").unlink(), "model", "has no model card"),
    (lambda r: (r / "models" / "m1" / "m1.card.json").write_text("{not json"), "model", "cannot be read"),
    (lambda r: shutil.rmtree(r / "models" / "m1"), "model", "no trained model is installed"),
    (lambda r: (r / "models" / "DEFAULT").write_text("other\n"), "model", "names the model folder 'other'"),
    (lambda r: (r / "atlas" / "compact" / "landmarks.json").unlink(), "atlas", "landmarks.json is missing"),
    (lambda r: (r / "atlas" / "compact").rename(r / "atlas" / "paper"), "atlas", "needs the atlas of grid 'compact'"),
    (lambda r: (r / "demo" / "lat_mask.png").unlink(), "demo", "lat_mask.png is missing"),
])
def test_each_kind_of_damage_is_named(tmp_path, damage, kind, text):
    root = _fake_resources(tmp_path)
    damage(root)
    problems = resources.find_resource_problems(root, demo=True)
    assert len(problems) == 1, problems
    assert problems[0].kind == kind and text in problems[0].message and "reinstall HipAtlas" in problems[0].message


def test_unreadable_files_are_reported_not_raised(tmp_path, monkeypatch):
    # Permissions cannot be tested as root (the test machines run as root): inject the error the
    # system would raise for a user without read access.
    root = _fake_resources(tmp_path)
    model = root / "models" / "m1" / "m1.keras"

    def denied(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(resources, "sha256_file", denied)
    problems = resources.find_resource_problems(root)
    assert [(p.kind, p.path) for p in problems] == [("model", model), ("atlas", root / "atlas" / "compact" /
                                                                       "atlas.nii.gz")]
    assert "cannot be read (Permission denied); check the permissions" in problems[0].message
    with pytest.raises(ModelError, match="Permission denied"):
        resources.verify_resources(root)


def test_shared_model_card_name_is_accepted(tmp_path):
    root = _fake_resources(tmp_path)
    folder = root / "models" / "m1"
    (folder / "m1.card.json").rename(folder / "model_card.json")
    assert resources.find_resource_problems(root) == []
    _flip_byte(folder / "m1.keras")
    assert "damaged" in resources.find_resource_problems(root)[0].message


def test_default_model_follows_the_pointer_else_the_first_folder(tmp_path):
    root = _fake_resources(tmp_path)
    assert resources.default_model_file(root) == root / "models" / "m1" / "m1.keras"
    (root / "models" / "a0").mkdir()
    (root / "models" / "a0" / "a0.keras").write_bytes(b"x")
    assert resources.default_model_file(root).name == "a0.keras"
    (root / "models" / "DEFAULT").write_text("m1\n")
    assert resources.default_model_file(root).name == "m1.keras"
    shutil.rmtree(root / "models")
    with pytest.raises(ModelError, match="no trained model is installed"):
        resources.default_model_file(root)


def _shipped_model_files():
    return sorted(p for p in (ROOT / "resources" / "models").glob("*/*.keras"))


def test_shipped_model_copy_with_one_flipped_byte_is_detected(tmp_path):
    models = _shipped_model_files()
    if not models:
        pytest.skip("no trained model in resources/models yet")
    source = models[0]
    card = resources.model_card_path(source)
    assert card is not None, f"{source} has no model card"
    copy_dir = tmp_path / source.parent.name
    copy_dir.mkdir()
    shutil.copy(source, copy_dir / source.name)
    shutil.copy(card, copy_dir / card.name)
    for export in source.parent.glob("*.onnx"):  # the ONNX export the card records is checked too
        shutil.copy(export, copy_dir / export.name)
    assert resources.check_model_file(copy_dir / source.name) == []
    _flip_byte(copy_dir / source.name)
    (problem,) = resources.check_model_file(copy_dir / source.name)
    assert "damaged" in problem.message


def test_shipped_atlas_is_intact_and_a_damaged_copy_is_detected(tmp_path):
    grids = sorted(p.parent for p in (ROOT / "resources" / "atlas").glob("*/atlas.json"))
    if not grids:
        pytest.skip("no atlas in resources/atlas yet")
    for grid in grids:
        assert resources.check_atlas_grid(grid) == [], grid
    copy = tmp_path / grids[0].name
    shutil.copytree(grids[0], copy)
    _flip_byte(copy / "atlas.nii.gz")
    (problem,) = resources.check_atlas_grid(copy)
    assert "atlas.nii.gz is damaged" in problem.message


# --------------------------------------------------------------------------------------------
# Self-test checks of a registration result
# --------------------------------------------------------------------------------------------

def _fake_outputs(out, labels):
    from inference import io
    from inference.geometry import VolumeGeometry

    out.mkdir()
    grid = VolumeGeometry.centered(labels.shape, (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    io.write_volume(out / "femur_labels.nii.gz", labels, grid, dtype=np.uint8)
    for name in ("warped_atlas.nii.gz", "femur_surface.stl", "measurements.json", "report.json",
                 "overlay_AP.png", "overlay_LAT.png", "silhouette_AP.json", "silhouette_LAT.json"):
        (out / name).write_bytes(b"data")


def test_output_checks_pass_plausible_and_fail_implausible_results(tmp_path):
    from inference import selftest

    labels = np.zeros((8, 8, 8), np.uint8)
    labels[2:6, 2:6, 2:6] = 1
    _fake_outputs(tmp_path / "good", labels)
    good = {"head_radius_mm": 24.0, "neck_shaft_angle_deg": 130.0, "hip_centre_mm": [10.0, 0.0, 0.0]}
    checks = selftest.check_outputs(tmp_path / "good", good, view_names=["AP", "LAT"],
                                    reference_mm=np.array([0.0, 0.0, 0.0]))
    assert all(c.passed for c in checks), checks
    assert any("64 voxels (0 ml)" in c.detail or "64 voxels" in c.detail for c in checks)

    _fake_outputs(tmp_path / "bad", np.zeros((8, 8, 8), np.uint8))
    (tmp_path / "bad" / "report.json").unlink()
    bad = {"head_radius_mm": 60.0, "neck_shaft_angle_deg": 90.0, "hip_centre_mm": [40.0, 0.0, 0.0]}
    checks = selftest.check_outputs(tmp_path / "bad", bad, view_names=["AP", "LAT"],
                                    reference_mm=np.array([0.0, 0.0, 0.0]))
    failed = {c.name for c in checks if not c.passed}
    assert failed == {"outputs", "femur label", "head radius", "neck-shaft angle", "hip centre"}


def test_demo_truth_is_found_in_the_supported_places(tmp_path):
    from inference import selftest

    assert selftest.demo_truth_hip_centre(tmp_path) == (None, "")
    (tmp_path / "case.json").write_text(json.dumps({"format": "hipatlas-case/1",
                                                   "truth": {"landmarks_mm": {"head_centre": [1, 2, 3]}}}))
    centre, source = selftest.demo_truth_hip_centre(tmp_path)
    assert source == "case.json" and centre.tolist() == [1, 2, 3]
    (tmp_path / "truth.json").write_text(json.dumps({"measurements": {"hip_centre_mm": [4, 5, 6]}}))
    centre, source = selftest.demo_truth_hip_centre(tmp_path)
    assert source == "truth.json" and centre.tolist() == [4, 5, 6]


def test_self_test_summary_is_one_line():
    from inference.selftest import Check, SelfTestResult

    result = SelfTestResult([Check("a", True, "fine"), Check("b", False, "broken\nreally")], elapsed_s=1.0)
    assert not result.passed and "FAILED" in result.summary() and "b: broken" in result.summary()
    assert not SelfTestResult().passed  # no check run is not a pass


# --------------------------------------------------------------------------------------------
# Debian package layout and icons
# --------------------------------------------------------------------------------------------

def test_min_glibc_reads_symbol_versions(tmp_path):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "a.so").write_bytes(b"\x7fELF" + b"\0" * 20 + b"GLIBC_2.17\0GLIBC_2.34\0GLIBC_2.4\0")
    (tmp_path / "notes.txt").write_bytes(b"GLIBC_2.99")  # not an ELF file: ignored
    assert make_deb.min_glibc(tmp_path) == "2.34"


def test_deb_package_layout_installs_and_runs_through_the_symlinks(tmp_path):
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is not installed")
    bundle = tmp_path / "bundle"
    (bundle / "_internal" / "resources").mkdir(parents=True)
    (bundle / "_internal" / "resources" / "x.json").write_text("{}")
    for name in ("hipatlas", "hipatlas-gui"):
        script = bundle / name
        # Like the PyInstaller bootloader, find _internal next to the real executable.
        script.write_text('#!/bin/sh\nhere="$(dirname "$(readlink -f "$0")")"\n'
                          f'test -f "$here/_internal/resources/x.json" && echo "{name} ok $*"\n')
        script.chmod(0o755)
    icons = tmp_path / "icons"
    make_icons.write_icons(icons)
    staging = tmp_path / "stage"
    control = make_deb.stage(bundle, icons, staging, VERSION, "amd64", glibc="2.31")
    text = control.read_text()
    assert f"Version: {bm.debian_version(VERSION)}" in text and "libc6 (>= 2.31)" in text
    assert "libxcb-cursor0" in text and int(re.search(r"Installed-Size: (\d+)", text).group(1)) > 0
    deb = tmp_path / make_deb.deb_filename(VERSION, "amd64")
    make_deb.build_deb(staging, deb, compression="none")
    info = subprocess.run(["dpkg-deb", "--field", str(deb), "Package", "Version"], capture_output=True,
                          text=True, check=True).stdout
    assert "Package: hipatlas" in info and bm.debian_version(VERSION) in info

    root = tmp_path / "root"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    link = root / "usr" / "bin" / "hipatlas"
    assert link.is_symlink() and not os.path.isabs(os.readlink(link))
    assert link.resolve() == (root / "opt" / "hipatlas" / "hipatlas").resolve()
    out = subprocess.run([str(link), "--self-test"], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "hipatlas ok --self-test"
    desktop = (root / "usr" / "share" / "applications" / "hipatlas.desktop").read_text()
    assert "Exec=hipatlas-gui %f" in desktop and "Icon=hipatlas" in desktop
    assert (root / "usr" / "share" / "icons" / "hicolor" / "256x256" / "apps" / "hipatlas.png").is_file()
    assert (root / "usr" / "share" / "icons" / "hicolor" / "scalable" / "apps" / "hipatlas.svg").is_file()
    assert (root / "usr" / "share" / "doc" / "hipatlas" / "copyright").is_file()
    validate = shutil.which("desktop-file-validate")
    if validate:
        result = subprocess.run([validate, str(PACKAGING / "linux" / "hipatlas.desktop")], capture_output=True,
                                text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_icons_are_drawn_in_every_format(tmp_path):
    from PIL import Image

    written = make_icons.write_icons(tmp_path)
    with Image.open(written["png"]) as png:
        assert png.size == (256, 256)
        pixels = np.asarray(png.convert("RGBA"))
    assert pixels[..., 3].max() == 255 and pixels[0, 0, 3] == 0  # opaque icon, transparent corner
    colours = {tuple(c) for c in pixels[::16, ::16, :3].reshape(-1, 3)}
    assert len(colours) >= 3  # background, bone and accent: not a blank square
    with Image.open(written["ico"]) as ico:
        assert ico.format == "ICO"
    with Image.open(written["icns"]) as icns:
        assert icns.format == "ICNS"


@pytest.mark.slow
def test_self_test_passes_on_the_shipped_resources(tmp_path):
    """The whole self-test (a real registration of the demo case, ~30 s on 2 cores)."""
    from inference import selftest

    missing = bm.missing_resources()
    if missing:
        pytest.skip("not shipped yet: " + ", ".join(r.what for r in missing))
    result = selftest.run_self_test(tmp_path / "out")
    assert result.passed, result.summary()
    names = {c.name for c in result.checks}
    assert {"resources", "registration", "outputs", "femur label", "head radius", "neck-shaft angle",
            "hip centre"} <= names
    assert (tmp_path / "out" / "measurements.json").is_file()
