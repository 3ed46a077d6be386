"""The TensorFlow-free installer flavour (HIPATLAS_FLAVOUR=runtime, package hipatlas-runtime).

The build itself (packaging/build_linux.sh, minutes) is not run here: these tests check what it
is made of (the spec's excludes and its refusal of TensorFlow, the bundle check, the Debian
control file, the build report, the dependency list) and that, with TensorFlow unimportable,
the registration picks ONNX Runtime by itself while training, evaluation, export and the
refinement stop with one line naming TensorFlow.
"""

from __future__ import annotations

import json
import os
import random
import pathlib
import re
import shutil
import subprocess
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGING = ROOT / "packaging"
sys.path.insert(0, str(PACKAGING))
sys.path.insert(0, str(PACKAGING / "linux"))

import build_report  # noqa: E402
import bundle_manifest as bm  # noqa: E402
import make_deb  # noqa: E402

from packaging_helpers import VERSION, run_spec  # noqa: E402

TF_STACK = {"tensorflow", "keras", "tf2onnx", "onnx", "jax", "tensorboard"}


# --------------------------------------------------------------------------------------------
# Spec and manifest
# --------------------------------------------------------------------------------------------

def test_runtime_spec_excludes_the_tensorflow_stack_and_the_full_spec_does_not(monkeypatch):
    (runtime,) = run_spec(monkeypatch, flavour="runtime")["Analysis"]
    excludes = set(runtime.kwargs["excludes"])
    assert TF_STACK <= excludes
    assert "SimpleITK" in excludes  # NIfTI/MetaImage through inference.imageio_numpy
    assert not any(name.startswith("keras") for name in runtime.kwargs["hiddenimports"])
    assert "onnxruntime" not in excludes and "vtkmodules.vtkRenderingOpenGL2" in runtime.kwargs["hiddenimports"]
    # the registration code is bundled whole in both flavours
    assert {"inference.backends", "inference.selftest", "app.cli"} <= set(runtime.kwargs["hiddenimports"])
    # VTK: not the all-in-one module, but every module pyvista loads lazily, and the renderers
    assert {"vtk", "vtkmodules.all"} <= excludes
    assert {"vtkmodules.vtkRenderingOpenGL2", "vtkmodules.vtkFiltersCore", "vtkmodules.vtkCommonDataModel",
            "vtkmodules.vtkInteractionStyle"} <= set(runtime.kwargs["hiddenimports"])
    (collect,) = run_spec(monkeypatch, flavour="runtime")["COLLECT"]
    assert collect.kwargs["strip"] is False  # PyInstaller's strip breaks auditwheel libraries

    (full,) = run_spec(monkeypatch, flavour=None)["Analysis"]
    assert not {"tensorflow", "keras", "SimpleITK"} & set(full.kwargs["excludes"])
    assert {"keras.src.saving", "keras.src.layers"} <= set(full.kwargs["hiddenimports"])
    assert set(full.kwargs["excludes"]) < excludes
    (collect,) = run_spec(monkeypatch, flavour=None)["COLLECT"]
    assert collect.kwargs["strip"] is False


def test_pyvista_vtk_modules_cover_what_pyvista_loads_lazily():
    from pyvista import _vtk

    modules = bm.pyvista_vtk_modules()
    # every class pyvista can hand out comes from a bundled module
    assert {f"vtkmodules.{m}" for m in _vtk._VTK_CLASS_TO_MODULE.values()} <= set(modules)
    assert "vtkmodules.vtkRenderingCore" in modules and "vtkmodules.all" not in modules


@pytest.mark.parametrize("pure, binaries, found", [
    (("inference.cli", "tensorflow.python.ops"), (), "module tensorflow"),
    (("inference.cli", "keras.src.saving"), (), "module keras"),
    (("inference.cli",), ("tensorflow/libtensorflow_framework.so.2",), "folder tensorflow"),
    (("inference.cli",), ("libtensorflow_cc.so.2",), "library libtensorflow_cc.so.2"),
    (("inference.io", "SimpleITK.SimpleITK"), (), "module SimpleITK"),
    (("inference.cli",), ("SimpleITK/_SimpleITK.abi3.so",), "folder SimpleITK"),
])
def test_runtime_spec_fails_when_tensorflow_is_collected(monkeypatch, pure, binaries, found):
    with pytest.raises(SystemExit, match=f"runtime flavour must not bundle: .*{re.escape(found)}"):
        run_spec(monkeypatch, flavour="runtime", pure=pure, binaries=binaries)
    # the full flavour bundles TensorFlow on purpose
    spec = run_spec(monkeypatch, flavour="full", pure=pure, binaries=binaries)
    assert len(spec["COLLECT"]) == 1


def test_unknown_flavour_is_refused(monkeypatch):
    with pytest.raises(SystemExit, match="HIPATLAS_FLAVOUR must be one of full, runtime, not 'tiny'"):
        run_spec(monkeypatch, flavour="tiny")


def test_forbidden_files_are_named_and_onnxruntime_is_not():
    files = ["hipatlas", "_internal/onnxruntime/capi/libonnxruntime.so.1.20",
             "_internal/onnxruntime-1.20.0.dist-info/METADATA", "_internal/vtkmodules/libvtkCommonCore-9.3.so",
             "_internal/PySide6/Qt/lib/libQt6Core.so.6"]
    assert bm.forbidden_in_bundle(files=files, name="runtime") == []
    files += ["_internal/keras-3.15.0.dist-info/METADATA", "_internal/tf2onnx/convert.py",
              "_internal/libtensorflow_framework.so.2", "_internal/jaxlib/xla_extension.so",
              "_internal/SimpleITK/_SimpleITK.abi3.so", "_internal/simpleitk-2.5.7.dist-info/METADATA"]
    assert bm.forbidden_in_bundle(files=files, name="runtime") == [
        "folder SimpleITK", "folder jaxlib", "folder keras-3.15.0.dist-info", "folder simpleitk-2.5.7.dist-info",
        "folder tf2onnx", "library libtensorflow_framework.so.2"]
    assert bm.forbidden_in_bundle(files=files, name="full") == []


def test_check_bundle_command_fails_on_a_bundle_with_keras(tmp_path):
    bundle = tmp_path / "hipatlas"
    (bundle / "_internal" / "onnxruntime").mkdir(parents=True)
    (bundle / "_internal" / "onnxruntime" / "__init__.py").write_text("")
    (bundle / "hipatlas").write_text("")
    command = [sys.executable, str(PACKAGING / "bundle_manifest.py"), "check-bundle", "--flavour", "runtime",
               "--bundle", str(bundle)]
    assert subprocess.run(command, capture_output=True, text=True).returncode == 0
    (bundle / "_internal" / "keras" / "src").mkdir(parents=True)
    (bundle / "_internal" / "keras" / "src" / "__init__.py").write_text("")
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip() == "forbidden in the runtime flavour: folder keras"


def test_runtime_requirements_are_the_project_dependencies_without_tensorflow():
    """packaging/requirements-onnx.txt (the runtime build's venv) must follow pyproject.toml: a
    dependency added there and not here would be missing from the runtime installer. Left out on
    purpose: TensorFlow/Keras, and SimpleITK (NIfTI/MetaImage through inference.imageio_numpy)."""
    project = [d.replace(" ", "") for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
    runtime = [line.split("#")[0].replace(" ", "") for line in
               (PACKAGING / "requirements-onnx.txt").read_text().splitlines() if line.split("#")[0].strip()]
    left_out = [d for d in project if re.match(r"(tensorflow|keras|simpleitk)\b", d, re.I)]
    assert {re.match(r"[a-z]+", d, re.I)[0].lower() for d in left_out} == {"tensorflow", "keras", "simpleitk"}
    assert sorted(runtime) == sorted(d for d in project if d not in left_out)


# --------------------------------------------------------------------------------------------
# Debian package and build report
# --------------------------------------------------------------------------------------------

def test_runtime_deb_has_its_own_name_and_replaces_the_full_package(tmp_path):
    runtime = make_deb.control_text(VERSION, "amd64", 300_000, "2.31", flavour="runtime")
    fields = dict(line.split(": ", 1) for line in runtime.splitlines() if ": " in line and not line.startswith(" "))
    assert fields["Package"] == "hipatlas-runtime"
    assert fields["Conflicts"] == fields["Replaces"] == "hipatlas"
    assert "without TensorFlow" in fields["Description"] and "not included" in runtime
    full = make_deb.control_text(VERSION, "amd64", 300_000, "2.31")
    assert "Package: hipatlas\n" in full and "Conflicts: hipatlas-runtime\n" in full
    assert make_deb.deb_filename(VERSION, "amd64", "runtime").startswith("hipatlas-runtime_")
    assert make_deb.deb_filename(VERSION, "amd64") == f"hipatlas_{bm.debian_version(VERSION)}_amd64.deb"

    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is not installed")
    bundle = tmp_path / "bundle"
    (bundle / "_internal").mkdir(parents=True)
    for name in ("hipatlas", "hipatlas-gui"):
        (bundle / name).write_text("#!/bin/sh\n")
    staging = tmp_path / "stage"
    make_deb.stage(bundle, tmp_path / "no-icons", staging, VERSION, "amd64", glibc="2.31", flavour="runtime")
    assert (staging / "usr" / "share" / "doc" / "hipatlas-runtime" / "copyright").is_file()
    deb = tmp_path / make_deb.deb_filename(VERSION, "amd64", "runtime")
    make_deb.build_deb(staging, deb, compression="none")
    info = subprocess.run(["dpkg-deb", "--field", str(deb), "Package", "Conflicts"], capture_output=True,
                          text=True, check=True).stdout
    assert info.splitlines() == ["Package: hipatlas-runtime", "Conflicts: hipatlas"]


def test_build_report_records_sizes_against_the_full_flavour(tmp_path):
    bundle = tmp_path / "hipatlas"
    (bundle / "_internal" / "onnxruntime").mkdir(parents=True)
    (bundle / "_internal" / "onnxruntime" / "lib.so").write_bytes(b"\0" * (3 * build_report.MIB))
    (bundle / "_internal" / "libQt6Core.so.6").write_bytes(b"\0" * build_report.MIB)
    (bundle / "_internal" / "libQt6Gui.so.6").write_bytes(b"\0" * build_report.MIB)
    (bundle / "hipatlas").write_bytes(b"\0" * 1024)
    deb = tmp_path / "hipatlas-runtime_0_amd64.deb"
    deb.write_bytes(b"\0" * (2 * build_report.MIB))
    out = tmp_path / "dist" / "build-report-runtime.json"
    argv = ["write", "--flavour", "runtime", "--bundle", str(bundle), "--deb", str(deb), "--out", str(out),
            "--build-s", "600", "--pyinstaller-s", "400", "--deb-s", "20", "--self-test", "passed in 30 s",
            "--self-test-s", "30", "--self-test-backend", "onnx"]
    assert build_report.main(argv) == 0
    record = json.loads(out.read_text())
    assert record["package"] == "hipatlas-runtime" and record["self_test_backend"] == "onnx"
    assert record["deb_mib"] == 2.0 and record["installed_mib"] == 5.0
    assert record["deb_share_of_full"] == round(2.0 / build_report.FULL_REFERENCE["deb_mib"], 3)
    assert record["largest_parts"][:2] == [{"part": "onnxruntime", "mib": 3.0}, {"part": "libQt6*", "mib": 2.0}]
    assert record["gui_smoke"] == "not run" and record["forbidden_in_bundle"] == []

    assert build_report.main(["publish", str(out), "--out-dir", str(tmp_path / "results")]) == 0
    text = (tmp_path / "results" / "package_runtime.md").read_text()
    assert "| `.deb` (zstd) | 2.0 MiB | 553 MiB | 0.4% |" in text
    assert "`HIPATLAS_FLAVOUR=runtime DEB_COMPRESSION=zstd GUI_SMOKE=0 packaging/build_linux.sh`" in text
    assert "passed in 30 s with the onnx backend" in text
    assert json.loads((tmp_path / "results" / "package_runtime.json").read_text()) == record


# --------------------------------------------------------------------------------------------
# With TensorFlow unimportable (what the runtime bundle is)
# --------------------------------------------------------------------------------------------

_BLOCKER = '''
import importlib.abc, sys
class _NoTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "keras", "tf2onnx", "onnx", "tf_keras"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, _NoTensorFlow())
'''


def _run_without_tensorflow(code: str, cwd: pathlib.Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HIPATLAS_BACKEND"}
    env.update(PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-c", _BLOCKER + code], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=300)


def test_without_tensorflow_auto_picks_onnx_and_tensorflow_commands_stop_with_one_line(tmp_path):
    model = next((ROOT / "resources" / "models").glob("*/*.keras"))
    demo = ROOT / "resources" / "demo"
    commands = {
        "train": ["train", "--data", str(demo), "--out", str(tmp_path / "run")],
        "evaluate": ["evaluate", str(model.parent), str(demo), "--out", str(tmp_path / "eval")],
        "export-onnx": ["export-onnx", str(model), "--out", str(tmp_path / "model.onnx")],
        "refine": ["register", str(demo), "--out", str(tmp_path / "refined"), "--refine"],
        "tf backend": ["register", str(demo), "--out", str(tmp_path / "tf"), "--backend", "tf"],
    }
    code = (
        "import contextlib, io, json\n"
        "from inference import backends\n"
        "from inference.cli import run\n"
        "net = backends.load_backend(None, 'auto')\n"
        "answers = {'auto': sorted({type(m).__name__ for m in getattr(net, 'members', [net])}),\n"
        "           'tf_available': backends.tensorflow_available()}\n"
        f"for name, argv in {commands!r}.items():\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err):\n"
        "        status = run(argv)\n"
        "    answers[name] = [status, err.getvalue()]\n"
        "answers['loaded'] = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras'))\n"
        "print(json.dumps(answers))\n"
    )
    result = _run_without_tensorflow(code, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    answers = json.loads(result.stdout.strip().splitlines()[-1])
    assert answers.pop("auto") == ["OnnxBackend"]  # every shipped model of the default (DEFAULT may name several)
    assert answers.pop("tf_available") is False
    assert answers.pop("loaded") == []
    for name, (status, err) in answers.items():
        lines = err.strip().splitlines()
        assert status == 2 and len(lines) == 1, (name, status, err)
        assert lines[0].startswith("hipatlas: error: ") and "tensorflow" in lines[0].lower(), (name, err)
    assert "--refine" in answers["refine"][1] and "without --refine" in answers["refine"][1]
    # nothing half-written by a command that could not run
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_compression_estimate_scales_the_real_deb_by_the_sample_ratios(tmp_path):
    if not (shutil.which("zstd") and shutil.which("xz")):
        pytest.skip("zstd or xz is not installed")
    bundle = tmp_path / "hipatlas"
    (bundle / "_internal").mkdir(parents=True)
    rng = random.Random(7)
    words = [f"symbol_{rng.getrandbits(40):x}" for _ in range(4000)]
    # a big file (sliced) of words drawn from a vocabulary (stronger compressors find more of its
    # repeats), and small text files (every 16th taken whole)
    text = " ".join(rng.choice(words) for _ in range(200_000)).encode()
    (bundle / "_internal" / "lib.so").write_bytes(text[:2 * build_report.MIB])
    for index in range(32):
        (bundle / "_internal" / f"m{index:02d}.py").write_text("import os\n" * 200)
    sample = build_report.bundle_sample(bundle)
    assert len(sample) == 2 * build_report.MIB // 16 + 2 * 2000
    estimate = build_report.compression_estimate(bundle, deb_mib=100.0)
    assert estimate["estimated_deb_mib"]["zstd"] == 100.0
    assert set(estimate["estimated_deb_mib"]) == {"zstd", "zstd-19", "xz"}
    assert 0 < estimate["estimated_deb_mib"]["xz"] < 100 and 0 < estimate["estimated_deb_mib"]["zstd-19"] < 100
