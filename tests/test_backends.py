"""Inference backends: TensorFlow and ONNX Runtime give the same registration; the ONNX path never
imports TensorFlow; the portable (exportable) layer ops equal the XLA kernels; the ONNX file is
verified like the .keras."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from inference.resources import default_model_file

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHIPPED = default_model_file().parent
KERAS_FILE = SHIPPED / "hipatlas-compact.keras"
ONNX_FILE = SHIPPED / "hipatlas-compact.onnx"

onnxruntime = pytest.importorskip("onnxruntime")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "HIPATLAS_BACKEND"}
    env.update(TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT), **extra)
    return env


# --------------------------------------------------------------------------------------------
# Portable ops (what the export traces) against the XLA kernels
# --------------------------------------------------------------------------------------------

def test_adjugate_inverses_match_numpy():
    import tensorflow as tf

    from inference.layers.prost import affine_inverse, inverse3

    rng = np.random.default_rng(4)
    a = rng.normal(size=(5, 3, 3)) + 3 * np.eye(3)
    np.testing.assert_allclose(inverse3(tf.constant(a)).numpy(), np.linalg.inv(a), rtol=1e-12, atol=1e-12)
    m = np.tile(np.eye(4), (5, 1, 1))
    m[:, :3, :3] = a
    m[:, :3, 3] = rng.normal(size=(5, 3)) * 100
    np.testing.assert_allclose(affine_inverse(tf.constant(m)).numpy(), np.linalg.inv(m), atol=1e-10)


def test_portable_sampling_layers_equal_the_xla_kernels():
    import tensorflow as tf

    from inference.layers import prost, sampling, warp

    rng = np.random.default_rng(7)
    volume = rng.uniform(0, 1, size=(1, 12, 10, 14, 2)).astype(np.float32)
    field = rng.normal(scale=2.0, size=(1, 12, 10, 14, 3)).astype(np.float32)
    coords = rng.uniform(-3, 16, size=(1, 500, 3)).astype(np.float32)
    coords[:, :100] = np.round(coords[:, :100] * 2) / 2  # ties of nearest-neighbour rounding
    # a small cone-beam view of the volume (the project's P convention)
    from inference import geometry

    view = geometry.CArmView(sdd_mm=1000, sid_mm=925, lao_deg=20, cranial_deg=5, rows=8, cols=9,
                             pixel_mm=4.0, isocentre_mm=(8, 6, 10))
    projection = geometry.projection_matrix(view)[None].astype(np.float32)
    i2w = np.diag([1.5, 1.2, 1.0, 1.0])[None].astype(np.float32)
    labels = rng.integers(0, 3, size=(1, 12, 10, 14, 1)).astype(np.float32)

    def run():
        prost_layer = prost.ProST((8, 9), 16, output="both")
        integral, beam = prost_layer([tf.constant(volume), projection, i2w])
        inv = prost.InvProST((12, 10, 14), (8, 9), 16)([beam, projection, i2w])
        return {
            "trilinear": sampling.trilinear_sample(volume, coords),
            "nearest": sampling.nearest_sample(labels, coords),
            "integral": prost.ProST((8, 9), 16)([tf.constant(volume), projection, i2w]),
            "beam": beam, "integral_of_beam": integral, "inv_prost": inv,
            "warp": warp.warp(volume, field), "warp_nearest": warp.warp(labels, field, "nearest"),
            "vecint": warp.integrate_velocity(field, 5),
            "affine": warp.affine_field(tf.constant([[[1.0, 0.1, 0, 2], [0, 0.9, 0, -1], [0.05, 0, 1.1, 0.5],
                                                      [0, 0, 0, 1]]]), (12, 10, 14)),
            "compose_affine": warp.compose_affine(field, tf.constant([[[1.0, 0.1, 0, 2], [0, 0.9, 0, -1],
                                                                       [0.05, 0, 1.1, 0.5], [0, 0, 0, 1]]])),
        }

    reference = run()
    with sampling.portable_ops():
        portable = run()
    assert not sampling.portable()
    for name, value in reference.items():
        np.testing.assert_allclose(np.asarray(portable[name]), np.asarray(value), rtol=1e-4, atol=1e-4,
                                   err_msg=name)
    assert np.abs(np.asarray(reference["integral"])).max() > 1.0  # the view sees the volume


# --------------------------------------------------------------------------------------------
# Choosing and verifying
# --------------------------------------------------------------------------------------------

@pytest.fixture()
def model_copy(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    for name in (KERAS_FILE.name, ONNX_FILE.name, "model_card.json"):
        shutil.copy2(SHIPPED / name, folder / name)
    return folder


def test_auto_prefers_onnx_and_falls_back_to_tensorflow(model_copy, monkeypatch):
    from inference import backends
    from inference.errors import ConfigError, ModelError

    monkeypatch.delenv(backends.BACKEND_ENV, raising=False)
    assert backends.load_backend(model_copy / KERAS_FILE.name).name == "onnx"
    assert backends.load_backend(model_copy, "tf").name == "tf"
    monkeypatch.setenv(backends.BACKEND_ENV, "tf")
    assert backends.load_backend(model_copy).name == "tf"
    monkeypatch.setenv(backends.BACKEND_ENV, "gpu")
    with pytest.raises(ConfigError, match="HIPATLAS_BACKEND"):
        backends.load_backend(model_copy)
    monkeypatch.delenv(backends.BACKEND_ENV)
    monkeypatch.setattr(backends, "onnxruntime_available", lambda: False)
    assert backends.load_backend(model_copy).name == "tf"
    with pytest.raises(ModelError, match="onnxruntime"):
        backends.load_backend(model_copy, "onnx")
    monkeypatch.undo()
    # a card without the ONNX entry: auto runs TensorFlow, onnx explains what to do
    card = json.loads((model_copy / "model_card.json").read_text())
    del card["onnx"]
    (model_copy / "model_card.json").write_text(json.dumps(card))
    assert backends.load_backend(model_copy, "auto").name == "tf"
    with pytest.raises(ModelError, match="export-onnx"):
        backends.load_backend(model_copy, "onnx")


def test_damaged_onnx_file_is_refused_and_reported(model_copy):
    from inference import backends, resources
    from inference.errors import ModelError

    assert resources.check_model_file(model_copy / KERAS_FILE.name) == []
    data = bytearray((model_copy / ONNX_FILE.name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (model_copy / ONNX_FILE.name).write_bytes(bytes(data))
    problems = resources.check_model_file(model_copy / KERAS_FILE.name)
    assert len(problems) == 1 and "ONNX model" in problems[0].message and "sha256" in problems[0].message
    with pytest.raises(ModelError, match="does not match its model card"):
        backends.load_backend(model_copy, "onnx")
    (model_copy / ONNX_FILE.name).unlink()
    assert "missing" in resources.check_model_file(model_copy / KERAS_FILE.name)[0].message


def test_shipped_onnx_records_its_source_and_opset():
    from inference.model_config import read_model_card
    from inference.checksums import sha256_file

    card = read_model_card(SHIPPED / "model_card.json")
    entry = card["onnx"]
    assert entry["file"] == ONNX_FILE.name and entry["sha256"] == sha256_file(ONNX_FILE)
    assert entry["source_sha256"] == card["sha256"] == sha256_file(KERAS_FILE)
    assert entry["opset"] == 20 and entry["samplers"] == "GridSample"  # inference.onnx_samplers
    assert entry["inputs"]["images"] == [1, 2, *card["config"]["detector_hw"]]


# --------------------------------------------------------------------------------------------
# No TensorFlow on the ONNX path; both backends register alike
# --------------------------------------------------------------------------------------------

def test_registration_with_the_onnx_backend_never_imports_tensorflow(tmp_path):
    # the demo without its masks: the mask proposal runs the network too
    case = tmp_path / "case"
    shutil.copytree(ROOT / "resources" / "demo", case)
    raw = json.loads((case / "case.json").read_text())
    for view in raw["views"]:
        view.pop("mask", None)
    (case / "case.json").write_text(json.dumps(raw))
    code = (
        "import sys, json\n"
        "from inference.cli import run\n"
        f"status = run(['register', {str(case)!r}, '--out', {str(tmp_path / 'out')!r}, "
        "'--backend', 'onnx', '--quiet'])\n"
        "import inference.backends, inference.pipeline, inference.mask_proposal, inference.selftest\n"
        "print(json.dumps({'status': status, 'tf': sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('tensorflow', 'keras', 'tf2onnx'))}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            env=_env())
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer == {"status": 0, "tf": []}
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["model"]["backend"] == "onnx"
    assert "mask_proposal" in report


def _register_both(case_dir, out_root, masks=None):
    from inference import pipeline

    results = {}
    for backend in ("tf", "onnx"):
        results[backend] = pipeline.run_to_completion(pipeline.register_case(
            case_dir, out_root / backend, model=KERAS_FILE, backend=backend, masks=masks))
        assert results[backend].report["model"]["backend"] == backend
    return results


def _assert_equivalent(results):
    from tests.register_helpers import assert_equivalent_outputs

    tf, onnx = results["tf"], results["onnx"]
    assert_equivalent_outputs(tf.out_dir, tf.measurements, onnx.out_dir, onnx.measurements)


@pytest.mark.slow
def test_backends_agree_on_the_demo_case(tmp_path):
    _assert_equivalent(_register_both(ROOT / "resources" / "demo", tmp_path))


@pytest.mark.slow
def test_backends_agree_on_a_simulated_case(tmp_path, tmp_path_factory):
    from tests.register_helpers import OBLIQUE_LEFT_DEG, simulated_case

    case = simulated_case(tmp_path_factory.getbasetemp(), side="left", seed=11, angles_deg=OBLIQUE_LEFT_DEG)
    _assert_equivalent(_register_both(case.case_dir, tmp_path))


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(1800)  # tf2onnx takes minutes on a busy 2-core machine
def test_export_cli_writes_a_verified_onnx_that_matches_keras(tmp_path):
    pytest.importorskip("tf2onnx")
    from inference import backends, model as model_lib
    from inference.cli import run

    config = model_lib.ModelConfig(
        grid="tiny", shape_zyx=(16, 16, 16), spacing_xyz_mm=(4.0, 4.0, 4.0), detector_hw=(16, 16),
        num_samples=16, affine_widths=(4, 4), local_encoder_widths=(4, 4), depth_copies=2,
        decoder_widths=(4, 4, 4), velocity_downsample=2, int_steps=3,
        affine_init_stddev=0.05, velocity_init_stddev=0.05)
    rng = np.random.default_rng(2)
    volume_hu = rng.uniform(-200, 1500, size=config.shape_zyx).astype(np.float32)
    labels = (rng.uniform(size=config.shape_zyx) > 0.5).astype(np.uint8)
    net = model_lib.build_model(config, (volume_hu, labels))
    model_path, _ = model_lib.save_model(net, tmp_path / "tiny.keras")
    assert run(["export-onnx", str(model_path)]) == 0
    card = model_lib.read_model_card(model_lib.card_path_for(model_path))
    assert card["onnx"]["source_sha256"] == card["sha256"]
    # the trilinear samplers are GridSample nodes (opset 20), none is left as gathers
    assert card["onnx"]["opset"] == 20 and card["onnx"]["samplers"] == "GridSample"
    import onnx
    from inference import onnx_samplers

    exported = onnx.load(str(model_path.with_suffix(".onnx")))
    assert sum(n.op_type == "GridSample" for n in exported.graph.node) == card["onnx"]["gridsample_count"] > 0
    assert onnx_samplers.find_samplers(exported) == []
    onnx_backend = backends.load_backend(model_path, "onnx")
    tf_backend = backends.load_backend(model_path, "tf")
    from inference import geometry

    views = [geometry.CArmView(sdd_mm=1000, sid_mm=925, lao_deg=a, cranial_deg=0, rows=16, cols=16,
                               pixel_mm=5.0, isocentre_mm=(30, 30, 30)) for a in (0.0, 90.0)]
    inputs = model_lib.case_inputs(
        [rng.uniform(0, 5, size=(16, 16)) for _ in views], [np.ones((16, 16)) for _ in views],
        [geometry.projection_matrix(v) for v in views], model_lib.grid_matrix(config))
    expected, actual = tf_backend.run(inputs), onnx_backend.run(inputs)
    assert np.abs(expected["psi"]).max() > 1e-3  # not the identity
    for name in backends.OUTPUT_NAMES:
        np.testing.assert_allclose(actual[name], expected[name], atol=2e-4, err_msg=name)


def test_workstation_setting_becomes_the_default_backend(tmp_path, monkeypatch):
    pytest.importorskip("PySide6")
    from PySide6.QtCore import QSettings

    from app.settings import Settings
    from inference import backends

    monkeypatch.delenv(backends.BACKEND_ENV, raising=False)
    settings = Settings(QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat))
    assert settings.backend == "auto"
    settings.backend = "tf"
    with pytest.raises(ValueError):
        settings.backend = "cuda"
    settings.apply_backend()
    assert backends.requested_backend() == "tf"
    assert backends.requested_backend("onnx") == "onnx"  # --backend wins over the setting


def test_missing_tensorflow_is_one_line_with_status_2(monkeypatch, capsys):
    from inference import cli, onnx_export

    def no_tensorflow(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'tensorflow'", name="tensorflow")

    monkeypatch.setattr(onnx_export, "export_onnx", no_tensorflow)
    assert cli.run(["export-onnx", str(KERAS_FILE), "--out", "unused.onnx"]) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["hipatlas: error: export-onnx needs the package tensorflow, which this installation "
                   "does not have (registration runs with --backend onnx)"]
