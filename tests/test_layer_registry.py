"""The network's layers live in ``inference.layers`` and keep the names the shipped model records.

A ``.keras`` file names each custom layer by its registered name (``hipatlas>ClassName``), not
by its module; these tests hold the shipped model to that: every name it records resolves to a
layer class of ``inference.layers``, and the model loads with ``safe_mode=True`` and computes
what its independent ONNX export computes.
"""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

from inference.resources import default_model_file

SHIPPED = default_model_file().parent
KERAS_FILE = SHIPPED / "hipatlas-compact.keras"
ONNX_FILE = SHIPPED / "hipatlas-compact.onnx"

pytestmark = pytest.mark.skipif(not KERAS_FILE.is_file(), reason="no shipped model in resources/models")


def _registered_names(node) -> set[str]:
    names = set()
    if isinstance(node, dict):
        name = node.get("registered_name")
        if isinstance(name, str) and name.startswith("hipatlas>"):
            names.add(name)
        for value in node.values():
            names |= _registered_names(value)
    elif isinstance(node, list):
        for value in node:
            names |= _registered_names(value)
    return names


def test_every_layer_the_shipped_model_names_is_registered_from_inference_layers():
    import importlib
    import pkgutil

    import keras

    import inference.layers

    for module in pkgutil.iter_modules(inference.layers.__path__):  # importing registers the layers
        importlib.import_module(f"inference.layers.{module.name}")

    with zipfile.ZipFile(KERAS_FILE) as archive:
        config = json.loads(archive.read("config.json"))
    names = _registered_names(config)
    assert {"hipatlas>AtlasVolume", "hipatlas>ViewSelect", "hipatlas>ProST", "hipatlas>VecInt"} <= names
    homes = {}
    for name in sorted(names):
        cls = keras.saving.get_registered_object(name)
        assert cls is not None, f"{name} is recorded in the shipped model but no longer registered"
        assert keras.saving.get_registered_name(cls) == name
        homes[name] = cls.__module__
    stray = {name: module for name, module in homes.items() if not module.startswith("inference.layers.")}
    assert not stray, f"layers defined outside inference/layers: {stray}"


def _demo_inputs(model):
    """Inputs of a plausible scene: the model's own atlas seen AP and lateral, its femur masks."""
    from inference.geometry import CArmView, projection_matrix
    from inference.layers.prost import ProST
    from inference.model import model_config_of
    from inference.model_config import case_inputs

    config = model_config_of(model)
    atlas = model.get_layer("atlas")
    intensity = np.asarray(atlas.intensity)[None]
    shape_xyz = np.array(config.shape_zyx[::-1], float)
    spacing = np.array(config.spacing_xyz_mm)
    i2w = np.diag([*spacing, 1.0])
    i2w[:3, 3] = -spacing * (shape_xyz - 1) / 2  # the grid centred on the world origin
    rows, cols = config.detector_hw
    projections = [projection_matrix(CArmView(sdd_mm=1000.0, sid_mm=925.0, lao_deg=angle, cranial_deg=0.0, rows=rows,
                                              cols=cols, pixel_mm=2.0)) for angle in (0.0, 90.0)]
    render = ProST(config.detector_hw, 128, output="integral")
    images = [np.asarray(render([intensity, p[None].astype(np.float32), i2w[None].astype(np.float32)]))[0, ..., 0]
              for p in projections]
    masks = [(image > 0.05 * image.max()).astype(np.float32) for image in images]
    assert all(mask.sum() > 100 for mask in masks)  # the femur is in both views
    return case_inputs(images, masks, projections, i2w)


def test_shipped_model_loads_with_safe_mode_and_agrees_with_its_onnx_export():
    pytest.importorskip("onnxruntime")
    if not ONNX_FILE.is_file():
        pytest.skip("no ONNX export beside the shipped model")
    from inference.backends import OnnxBackend
    from inference.model import load_model  # keras.saving.load_model(..., safe_mode=True) inside
    from inference.model_config import read_model_card

    model = load_model(KERAS_FILE)
    inputs = _demo_inputs(model)
    keras_out = {k: np.asarray(v) for k, v in model(inputs, training=False).items()}
    onnx_out = OnnxBackend(ONNX_FILE, read_model_card(SHIPPED / "model_card.json")).run(inputs)
    for key in ("affine_params", "psi"):
        assert np.all(np.isfinite(keras_out[key])), key
        # Same weights, two runtimes (XLA gathers vs the portable ops the export traced).
        np.testing.assert_allclose(onnx_out[key], keras_out[key], atol=1e-3, rtol=0, err_msg=key)
    assert np.abs(keras_out["psi"]).max() > 0  # a real field, not an all-zero output
