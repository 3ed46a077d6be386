"""The registration network (inference/model.py): config validation, build, identity at
initialisation, every ablation trains, FLOPs, .keras round trip with its model card."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import tensorflow as tf

import keras

from inference import model as M
from inference.checksums import sha256_file
from inference.layers import grid as grid_layers
from inference.layers import normalise, plumbing
from inference.errors import ConfigError, ModelError

TINY = M.ModelConfig(
    grid="tiny", shape_zyx=(16, 16, 16), spacing_xyz_mm=(2.0, 2.0, 2.0), detector_hw=(16, 16),
    num_samples=16, affine_widths=(4, 4, 8), local_encoder_widths=(4, 8), depth_copies=4,
    decoder_widths=(8, 4, 4), velocity_downsample=2)

# Every ablation switch is turned off in at least one run (pairs keep the test time down).
ABLATIONS = {
    "full": {},
    "no_fusion_shared_decoder": {"cross_view_fusion": False, "shared_decoder": True},
    "no_skips_no_inv_prost": {"skip_connections": False, "use_inv_prost": False},
    "dice_full_res_velocity": {"dice_weight": 0.5, "velocity_downsample": 1},
    "recomputed_shared_decoder": {"recompute": True, "shared_decoder": True},
    "single_decoder": {"single_decoder": True, "use_inv_prost": False},
    "local_gradient_to_affine": {"local_gradient_to_affine": True},
}


# --------------------------------------------------------------------------------------------
# Synthetic scene: a 16^3 grid (2 mm voxels) at the world origin, AP and lateral views
# --------------------------------------------------------------------------------------------

def _view_matrix(angle_deg, rows=16, cols=16, pixel_mm=2.8, sdd_mm=1000.0, sid_mm=925.0):
    """P of a C-arm view rotated by ``angle_deg`` about z (0 = AP), built as in geometry.md."""
    theta = np.deg2rad(angle_deg)
    source = sid_mm * np.array([np.sin(theta), -np.cos(theta), 0.0])
    n = -source / np.linalg.norm(source)
    e_v = np.array([0.0, 0.0, -1.0])
    e_u = np.cross(e_v, n)
    centre = source + sdd_mm * n
    d0 = centre - (cols - 1) / 2 * pixel_mm * e_u - (rows - 1) / 2 * pixel_mm * e_v
    c_u = (source - d0) @ e_u / pixel_mm
    c_v = (source - d0) @ e_v / pixel_mm
    a = np.stack([e_u / pixel_mm + c_u * n / sdd_mm, e_v / pixel_mm + c_v * n / sdd_mm, n / sdd_mm])
    return np.concatenate([a, (-a @ source)[:, None]], axis=1)


def _index_to_world(config):
    shape = np.array(config.shape_zyx[::-1], float)
    spacing = np.array(config.spacing_xyz_mm)
    i2w = np.diag(list(spacing) + [1.0])
    i2w[:3, 3] = -spacing * (shape - 1) / 2
    return i2w.astype(np.float32)


def _ellipsoid(config, centre_shift_zyx=(0.0, 0.0, 0.0)):
    """A femur-like blob: HU volume and label map (1 inside, 2 = a 'pelvis' slab)."""
    z, y, x = np.mgrid[tuple(slice(0, s) for s in config.shape_zyx)].astype(np.float32)
    sz, sy, sx = config.shape_zyx
    cz, cy, cx = (sz - 1) / 2 + centre_shift_zyx[0], (sy - 1) / 2 + centre_shift_zyx[1], \
        (sx - 1) / 2 + centre_shift_zyx[2]
    r = np.sqrt(((z - cz) / (0.35 * sz)) ** 2 + ((y - cy) / (0.2 * sy)) ** 2 + ((x - cx) / (0.25 * sx)) ** 2)
    labels = (r < 1).astype(np.uint8)
    labels[:2] = np.where(labels[:2] == 0, 2, labels[:2])
    # a denser cortex so that the volume is not a flat blob
    hu = np.where(r < 0.7, 300.0, np.where(r < 1, 1200.0, -1000.0)).astype(np.float32)
    return hu, labels


def _sample(config, shift_zyx=(2.0, 0.0, 1.0)):
    """Model inputs and the fixed volume of a blob moved by ``shift_zyx`` voxels."""
    from inference.layers.prost import ProST

    hu, labels = _ellipsoid(config, shift_zyx)
    fixed = M.femur_intensity(hu, labels)
    i2w = _index_to_world(config)
    rows, cols = config.detector_hw
    projection = np.stack([_view_matrix(0, rows, cols), _view_matrix(90, rows, cols)]).astype(np.float32)
    render = ProST(config.detector_hw, 64, output="integral")
    images = np.stack([render([fixed[None, ..., None], projection[v][None], i2w[None]]).numpy()[0, ..., 0]
                       for v in range(2)])
    masks = (images > 0.05 * images.max()).astype(np.float32)
    inputs = {"images": images[None], "masks": masks[None], "projection": projection[None],
              "index_to_world": i2w[None]}
    return inputs, fixed[None, ..., None], labels[None, ..., None]


@pytest.fixture(scope="module")
def atlas():
    hu, labels = _ellipsoid(TINY)
    return {"volume": hu, "labels": labels}


@pytest.fixture(scope="module")
def sample():
    return _sample(TINY)


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("changes, field", [
    ({"detector_hw": (18, 16)}, "detector_hw"),
    ({"decoder_widths": (8, 4, 4, 4)}, "decoder_widths"),
    ({"num_samples": 24}, "num_samples"),
    ({"velocity_downsample": 3}, "velocity_downsample"),
    ({"shape_zyx": (16, 15, 16)}, "shape_zyx"),
    ({"shape_zyx": (16, 16)}, "shape_zyx"),
    ({"spacing_xyz_mm": (2.0, -1.0, 2.0)}, "spacing_xyz_mm"),
    ({"smooth_weight": -0.1}, "smooth_weight"),
    ({"affine_widths": ()}, "affine_widths"),
    ({"local_encoder_widths": (4, 0)}, "local_encoder_widths"),
    ({"cross_view_fusion": "yes"}, "cross_view_fusion"),
    ({"int_steps": 2.5}, "int_steps"),
    ({"leaky_slope": 1.5}, "leaky_slope"),
    ({"grid": ""}, "grid"),
    ({"single_decoder": True}, "use_inv_prost"),
    ({"single_decoder": True, "use_inv_prost": False, "shared_decoder": True}, "shared_decoder"),
    ({"local_gradient_to_affine": 1}, "local_gradient_to_affine"),
])
def test_bad_config_raises_config_error_naming_the_field(changes, field):
    with pytest.raises(ConfigError, match=field):
        dataclasses.replace(TINY, **changes)


@pytest.mark.parametrize("config", [M.PAPER, M.COMPACT, TINY], ids=["paper", "compact", "tiny"])
def test_config_json_round_trip(config):
    text = config.to_json()
    assert M.ModelConfig.from_json(text) == config
    data = json.loads(text)
    data["unexpected"] = 1
    with pytest.raises(ConfigError, match="unexpected"):
        M.ModelConfig.from_dict(data)


def test_presets_have_the_documented_grids():
    assert M.preset("paper").shape_zyx == (192, 128, 192)
    assert M.preset("paper").detector_hw == (160, 224) and M.preset("paper").num_samples == 256
    assert M.preset("paper").decoder_widths == (64, 32, 32, 16, 16, 16)
    assert M.preset("compact").shape_zyx == (96, 64, 96)
    assert M.preset("compact").detector_hw == (80, 112) and M.preset("compact").num_samples == 128
    # the compact decoder stops at the half-size beam grid that matches the half velocity grid
    assert M.COMPACT.beam_shape == (32, 40, 56) and M.COMPACT.velocity_shape_zyx == (48, 32, 48)
    with pytest.raises(ConfigError, match="huge"):
        M.preset("huge")


def test_femur_intensity_is_relative_attenuation_inside_the_femur():
    hu = np.array([-1000.0, 0.0, 1000.0, -1200.0, 500.0])
    labels = np.array([1, 1, 1, 1, 2])
    np.testing.assert_allclose(M.femur_intensity(hu, labels), [0.0, 1.0, 2.0, 0.0, 0.0])


# --------------------------------------------------------------------------------------------
# Small layers
# --------------------------------------------------------------------------------------------

def test_masked_mean_scale_is_exposure_invariant_with_unit_mean_in_the_mask():
    rng = np.random.default_rng(0)
    image = rng.uniform(1, 5, (1, 8, 8, 1)).astype(np.float32)
    mask = np.zeros_like(image)
    mask[0, 2:6, 1:7] = 1
    layer = normalise.MaskedMeanScale()
    out = layer([image, mask]).numpy()
    assert np.all(out[mask == 0] == 0)
    assert out[mask == 1].mean() == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(layer([7.5 * image, mask]).numpy(), out, rtol=1e-5)


def test_upsample_field_reproduces_a_linear_field():
    # coarse displacement u(a) = 0.1 a_z + 0.3 (voxels of the coarse grid) along every component
    coarse = np.fromfunction(lambda z, y, x: 0.1 * z + 0.3, (6, 5, 4), dtype=np.float32)
    field = np.repeat(coarse[None, ..., None], 3, axis=-1)
    fine = grid_layers.UpsampleField()(field).numpy()[0]
    assert fine.shape == (12, 10, 8, 3)
    # fine index j sits at coarse coordinate (j - 0.5) / 2; displacements double in fine voxels
    j = np.arange(12, dtype=np.float32)
    expected = 2 * (0.1 * (j - 0.5) / 2 + 0.3)
    interior = slice(1, 11)  # the border repeats the edge value (clamped extrapolation)
    np.testing.assert_allclose(fine[interior, 2, 3, 0], expected[interior], rtol=1e-5)
    np.testing.assert_allclose(fine[0, 2, 3, 0], 2 * 0.3, rtol=1e-5)


def test_coarse_index_to_world_keeps_the_grid_box():
    i2w = _index_to_world(TINY)
    coarse = grid_layers.CoarseIndexToWorld(2)(i2w[None]).numpy()[0]
    # the first coarse voxel's lower edge (-0.5) is the first fine voxel's lower edge
    np.testing.assert_allclose(coarse @ [-0.5, -0.5, -0.5, 1], i2w @ [-0.5, -0.5, -0.5, 1], atol=1e-5)
    np.testing.assert_allclose(coarse @ [7.5, 7.5, 7.5, 1], i2w @ [15.5, 15.5, 15.5, 1], atol=1e-5)


def test_resize_to_grid_keeps_constants():
    volume = np.full((1, 4, 6, 8, 2), 3.0, np.float32)
    out = grid_layers.ResizeToGrid((5, 7, 9))(volume).numpy()
    assert out.shape == (1, 5, 7, 9, 2)
    np.testing.assert_allclose(out, 3.0, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------

def test_builds_with_the_documented_outputs_and_starts_at_the_identity(atlas, sample):
    inputs, _, _ = sample
    keras.utils.set_random_seed(0)
    model = M.build_model(TINY, atlas)
    out = model(inputs, training=False)
    grid = TINY.shape_zyx
    assert tuple(out["warped_affine"].shape) == (1, *grid, 1)
    assert tuple(out["warped"].shape) == (1, *grid, 1)
    assert tuple(out["warped_labels"].shape) == (1, *grid, 1)
    assert tuple(out["phi"].shape) == (1, *grid, 3)
    assert tuple(out["psi"].shape) == (1, *grid, 3)
    assert tuple(out["affine_params"].shape) == (1, 7)
    assert "warped_femur" not in out  # only with dice_weight > 0

    stored = M.femur_intensity(atlas["volume"], atlas["labels"])
    # at initialisation T and phi are ~identity: the warped atlases are the atlas
    assert np.abs(out["affine_params"].numpy()).max() < 1e-2
    np.testing.assert_allclose(out["warped_affine"].numpy()[0, ..., 0], stored, atol=2e-3)
    np.testing.assert_allclose(out["warped"].numpy()[0, ..., 0], stored, atol=2e-3)
    np.testing.assert_array_equal(out["warped_labels"].numpy()[0, ..., 0], atlas["labels"])
    assert np.abs(out["phi"].numpy()).max() < 1e-2
    assert M.model_config_of(model) == TINY
    counts = M.count_params(model)
    assert counts["atlas"] == 2 * int(np.prod(grid)) and counts["trainable"] > 0


@pytest.mark.parametrize("ablation", list(ABLATIONS), ids=list(ABLATIONS))
def test_each_ablation_builds_and_trains(ablation, atlas, sample):
    config = dataclasses.replace(TINY, **ABLATIONS[ablation])
    inputs, fixed, fixed_labels = sample
    keras.utils.set_random_seed(1)
    model = M.build_model(config, atlas)
    assert M.estimate_flops(config)["total"] == M.flops_of_model(model)
    optimizer = keras.optimizers.Adam(2e-3)

    # Eager steps: tracing a tf.function train step costs ~10 s here, more than 4 eager steps
    # (the sampling kernels are XLA-compiled functions either way).
    def step():
        with tf.GradientTape() as tape:
            terms = M.registration_losses(config, model(inputs, training=True), fixed, fixed_labels)
        grads = tape.gradient(terms["total"], model.trainable_weights)
        optimizer.apply_gradients(zip(grads, model.trainable_weights))
        return terms, grads

    terms, grads = step()
    assert np.isfinite(float(terms["total"]))
    if config.dice_weight > 0:
        assert 0.0 < float(terms["dice"]) <= 1.0
    dead = [w.path for w, g in zip(model.trainable_weights, grads)
            if g is None or not np.any(g.numpy() != 0)]
    assert not dead, f"no gradient reaches {dead}"
    losses = [float(terms["total"])]
    for _ in range(3):
        losses.append(float(step()[0]["total"]))
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("through", [False, True], ids=["stopped", "through"])
def test_local_gradient_reaches_the_affine_module_only_when_switched_on(through, atlas, sample):
    """The smoothness of phi depends on the affine parameters only through the local module."""
    config = dataclasses.replace(TINY, local_gradient_to_affine=through)
    inputs, _, _ = sample
    keras.utils.set_random_seed(3)
    model = M.build_model(config, atlas)
    kernel = model.get_layer("affine_params").kernel
    with tf.GradientTape() as tape:
        phi = model(inputs, training=True)["phi"]
        smooth = tf.reduce_sum(tf.square(phi[:, 1:] - phi[:, :-1]))
    grad = tape.gradient(smooth, kernel)
    reached = grad is not None and bool(np.any(grad.numpy() != 0))
    assert reached == through


def test_single_decoder_fuses_the_views_into_one_decoder(atlas):
    config = dataclasses.replace(TINY, single_decoder=True, use_inv_prost=False)
    model = M.build_model(config, atlas)
    names = {layer.name for layer in model.layers}
    assert {"local_fusion_l1_conv", "local_fusion_l2_conv", "decoder_l0_conv", "resize_to_grid"} <= names
    assert not any(name.startswith(("decoder_v", "inv_prost")) for name in names)
    # one decoder: its FLOPs are those of the per-view decoders of the same config halved, except
    # for the extra beam channel of the last level
    per_view = M.estimate_flops(dataclasses.replace(TINY, use_inv_prost=False))["decoder"]
    assert M.estimate_flops(config)["decoder"] < per_view


def test_flops_known_terms_and_presets():
    flops = M.estimate_flops(TINY)
    # the velocity conv: 3x3x3 kernel, 2 views x 4 features in, 3 out, on the 8^3 velocity grid
    assert flops["velocity"] == 2 * 27 * (2 * 4) * 3 * 8 ** 3
    assert flops["total"] == sum(v for k, v in flops.items() if k != "total")
    paper, compact = M.estimate_flops(M.PAPER)["total"], M.estimate_flops(M.COMPACT)["total"]
    assert 1e11 < paper < 1e12  # the paper reports 722 GFLOPs for its net
    assert compact < paper / 50


def test_save_and_load_round_trip_with_safe_mode_and_card(tmp_path, atlas, sample):
    inputs, _, _ = sample
    keras.utils.set_random_seed(2)
    model = M.build_model(dataclasses.replace(TINY, dice_weight=0.1), atlas)
    # move away from the identity so that a lost weight would show
    for weight in model.trainable_weights:
        weight.assign(weight.numpy() + np.float32(1e-3))
    path, card_path = M.save_model(model, tmp_path / "tiny.keras", card_extra={"notes": "test"})
    assert path.is_file() and card_path == tmp_path / "model_card.json"
    card = json.loads(card_path.read_text())
    assert card["sha256"] == sha256_file(path) and card["notes"] == "test"

    loaded = M.load_model(path)
    assert loaded._hipatlas_card["sha256"] == card["sha256"]
    assert M.model_config_of(loaded) == M.model_config_of(model)
    expected = model(inputs, training=False)
    got = loaded(inputs, training=False)
    assert set(got) == set(expected)
    for key in expected:
        np.testing.assert_array_equal(got[key].numpy(), expected[key].numpy(), err_msg=key)
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


@pytest.mark.parametrize("shared", [False, True], ids=["per_view", "shared"])
def test_recomputed_decoder_gives_the_same_outputs_gradients_and_file_round_trip(tmp_path, atlas, sample, shared):
    """Gradient checkpointing changes memory, not results: same weights -> same outputs and
    gradients; the checkpointed model saves and loads (safe mode) like any other."""
    inputs, fixed, _ = sample
    plain_config = dataclasses.replace(TINY, shared_decoder=shared)
    keras.utils.set_random_seed(3)
    plain = M.build_model(plain_config, atlas)
    recomputed = M.build_model(dataclasses.replace(plain_config, recompute=True), atlas)
    blocks = [layer for layer in recomputed.layers if isinstance(layer, plumbing.Recomputed)]
    assert len(blocks) == (1 if shared else 2)
    by_path = {w.path: w for w in plain.weights}
    assert sorted(by_path) == sorted(w.path for w in recomputed.weights)
    for weight in recomputed.weights:
        weight.assign(by_path[weight.path].numpy() + np.float32(1e-3))
        by_path[weight.path].assign(weight.numpy())

    def outputs_and_grads(model):
        with tf.GradientTape() as tape:
            outputs = model(inputs, training=True)
            total = M.registration_losses(plain_config, outputs, fixed)["total"]
        grads = tape.gradient(total, model.trainable_weights)
        return outputs, dict(zip((w.path for w in model.trainable_weights), grads))

    calls = []
    inner_call = blocks[0].inner.call
    blocks[0].inner.call = lambda *args, **kwargs: calls.append(1) or inner_call(*args, **kwargs)
    expected, expected_grads = outputs_and_grads(plain)
    got, got_grads = outputs_and_grads(recomputed)
    del blocks[0].inner.call
    # forward once per view it serves, and once more per view in the backward pass
    assert len(calls) == (4 if shared else 2)
    for key in expected:
        np.testing.assert_allclose(got[key].numpy(), expected[key].numpy(), rtol=1e-5, atol=1e-6, err_msg=key)
    decoder_grads = [path for path in got_grads if "decoder" in path]
    assert decoder_grads
    for path, grad in got_grads.items():
        assert grad is not None, path
        np.testing.assert_allclose(grad.numpy(), expected_grads[path].numpy(), rtol=1e-4, atol=1e-7, err_msg=path)

    path, _ = M.save_model(recomputed, tmp_path / "recomputed.keras")
    loaded = M.load_model(path)
    assert M.model_config_of(loaded).recompute
    for key, value in recomputed(inputs, training=False).items():
        np.testing.assert_array_equal(loaded(inputs, training=False)[key].numpy(), value.numpy(), err_msg=key)


def test_load_model_refuses_a_file_that_does_not_match_its_card(tmp_path, atlas):
    model = M.build_model(TINY, atlas)
    path, card_path = M.save_model(model, tmp_path / "m.keras")
    card = json.loads(card_path.read_text())
    bad_card = dict(card, sha256="0" * 64)
    with pytest.raises(ModelError, match="does not match"):
        M.load_model(path, card=bad_card)
    other_config = dict(card, config=dataclasses.replace(TINY, smooth_weight=0.5).to_dict())
    with pytest.raises(ModelError, match="different config"):
        M.load_model(path, card=other_config)
    with pytest.raises(ModelError, match="another model"):
        M.load_model(path, card=dict(card, model_file="other.keras"))
    card_path.unlink()
    with pytest.raises(ModelError, match="no model card"):
        M.load_model(path)
    with pytest.raises(ModelError, match="does not exist"):
        M.load_model(tmp_path / "missing.keras", card=card)


def test_pooled_beam_and_coarse_inv_prost_return_the_downsampled_volume():
    # The local module's conventions together: ProST beam samples (K = 32) average-pooled along
    # the depth to K' = 16, then inv-ProST onto the half-resolution grid placed by
    # CoarseIndexToWorld, give back the volume averaged over 2x2x2 blocks.
    from inference.layers.prost import InvProST, ProST

    z, y, x = np.mgrid[0:16, 0:16, 0:16].astype(np.float32)
    blob = np.exp(-((z - 8) ** 2 + (y - 7) ** 2 + (x - 8.5) ** 2) / (2 * 3.5 ** 2)).astype(np.float32)
    expected = blob.reshape(8, 2, 8, 2, 8, 2).mean(axis=(1, 3, 5))
    i2w = _index_to_world(TINY)[None]
    projection = _view_matrix(30)[None].astype(np.float32)
    _, beam = ProST((16, 16), 32, output="both")([blob[None, ..., None], projection, i2w])
    pooled = keras.layers.AveragePooling3D((2, 1, 1))(beam)

    def back_projected(coarse_i2w):
        return InvProST((8, 8, 8), (16, 16), 32)([pooled, projection, coarse_i2w]).numpy()[0, ..., 0]

    error = np.abs(back_projected(grid_layers.CoarseIndexToWorld(2)(i2w)) - expected).max()
    assert error < 0.05 * expected.max()
    # placing the coarse grid without the half-voxel shift of its centres would show
    naive = tf.matmul(i2w, np.diag([2.0, 2.0, 2.0, 1.0]).astype(np.float32)[None])
    assert np.abs(back_projected(naive) - expected).max() > 2 * error


def test_geometry_stays_float32_under_mixed_precision(atlas, sample):
    inputs, _, _ = sample
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = M.build_model(TINY, atlas)
    finally:
        keras.config.set_dtype_policy(previous)
    geometric = [layer for layer in model.layers if type(layer).__name__ in (
        "ProST", "InvProST", "ViewSelect", "SpatialTransformer", "VecInt", "AffineToField",
        "ComposeAffine", "AtlasVolume", "CoarseIndexToWorld", "UpsampleField", "StopGradient")]
    assert geometric and all(layer.compute_dtype == "float32" for layer in geometric)
    assert any(layer.compute_dtype == "float16" for layer in model.layers)  # convs do use float16
    out = model(inputs, training=False)
    assert out["psi"].dtype == tf.float32 and np.all(np.isfinite(out["warped"].numpy()))
