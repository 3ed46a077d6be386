"""Tests of inference.data.shape_model: the statistical deformation model of the train split's femurs.

Analytic femurs (a head ball and capsules, scaled per "specimen") on a coarse box keep every
registration to a fraction of a second.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from synthetic_shapes import simple_femur_sdf

from inference import cli
from inference import geometry as g
from inference.data import augment as aug
from inference.data import dataset as ds
from inference.data import phantom as ph
from inference.data import shape_model as sm
from inference.errors import ConfigError
from inference.experiments.baselines import StatisticalDeformationModel

HEAD_R = 22.0
MARKS = {
    "head_centre": np.zeros(3), "lesser_trochanter": np.array([-30.0, -10, -55]),
    "greater_trochanter": np.array([-55.0, 0, 8]), "shaft_point_distal": np.array([-42.0, 0, -150]),
    "shaft_point_proximal": np.array([-42.0, 0, -60]), "neck_point": np.array([-20.0, 0, -15]),
}
#: femur name -> (specimen, scale, neck-shaft shear): different sizes and shapes per specimen.
SHAPES = {"A:left": ("A", 1.0, 0.0), "A:right": ("A", 1.06, 0.05), "B:right": ("B", 0.9, -0.08),
          "C:right": ("C", 1.15, 0.12)}
FEMURS = [ds.SourceFemur(name, specimen) for name, (specimen, _, _) in SHAPES.items()]
BOX = dict(spacing_mm=4.0, box_min_mm=(-96.0, -48.0, -176.0), box_max_mm=(48.0, 48.0, 48.0))


def _analytic_model(name: str) -> ph.SubjectModel:
    _, scale, shear = SHAPES[name]
    low, high, spacing = np.array([-100.0, -50, -220]), np.array([50.0, 50, 50]), 3.0
    n = ((high - low) / spacing).astype(int) + 1
    ii, jj, kk = np.meshgrid(*[np.arange(c) for c in n], indexing="ij")
    p = np.stack([ii, jj, kk]).reshape(3, -1) * spacing + low[:, None]
    q = p / scale
    q[0] += shear * q[2]  # the shaft leans: another neck-shaft geometry
    values = (simple_femur_sdf(q, HEAD_R) * scale).reshape(n).transpose(2, 1, 0)
    return ph.SubjectModel.from_fields(name, ph.ScalarField(values, low, spacing), MARKS, HEAD_R * scale)


class GuardedModels(dict):
    """Subject models by name; reading a femur of a forbidden specimen fails the test."""

    def __init__(self, forbidden: set[str]):
        super().__init__({name: _analytic_model(name) for name in SHAPES})
        self.forbidden = forbidden
        self.read: list[str] = []

    def __getitem__(self, name):
        assert SHAPES[name][0] not in self.forbidden, f"the held-out femur {name} was read"
        self.read.append(name)
        return super().__getitem__(name)


@pytest.fixture(scope="module")
def model_ab(tmp_path_factory):
    path = tmp_path_factory.mktemp("sm") / "ab.npz"
    models = GuardedModels({"C"})
    model = sm.build_shape_model(path, {"train": ["A", "B"], "test": ["C"]}, femurs=FEMURS, models=models, **BOX)
    return path, model, models


# ----------------------------------------------------------------------------------------------
# Built from the train split only
# ----------------------------------------------------------------------------------------------
def test_shape_model_reads_only_the_train_split(model_ab):
    path, model, models = model_ab
    assert sorted(set(models.read)) == ["A:left", "A:right", "B:right"]
    loaded = sm.load_shape_model(path)
    assert loaded.meta["femurs"] == ["A:left", "A:right", "B:right"]
    assert loaded.specimens == ("A", "B") and loaded.meta["excluded_specimens"] == ["C"]
    assert loaded.n_components == 2 and np.all(loaded.sdm.sd > 0)
    # the femurs differ by 10-15 % in size: the registrations found displacements of several mm
    assert loaded.sdm.sd[0] > 5.0
    np.testing.assert_array_equal(loaded.sdm.components, model.sdm.components)


def test_an_existing_model_with_the_same_inputs_is_kept(model_ab, tmp_path):
    path, _, _ = model_ab
    before = path.stat().st_mtime_ns
    again = sm.build_shape_model(path, {"train": ["A", "B"], "test": ["C"]}, femurs=FEMURS,
                                 models=GuardedModels({"A", "B", "C"}), **BOX)  # nothing may be read
    assert path.stat().st_mtime_ns == before and again.meta["femurs"] == ["A:left", "A:right", "B:right"]


def test_a_train_split_of_one_femur_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="at least two femurs"):
        sm.build_shape_model(tmp_path / "b.npz", {"train": ["B"]}, femurs=FEMURS, models=GuardedModels(set()), **BOX)
    assert not (tmp_path / "b.npz").exists()


def test_synth_refuses_a_shape_model_that_saw_a_held_out_specimen(model_ab, tmp_path):
    path, _, _ = model_ab
    sampling = sm.ShapeModelSampling(str(path), 1.0)
    assert ds.SynthConfig(split={"train": ["A", "B"], "val": ["C"]}, shape_model=sampling).shape_model is sampling
    with pytest.raises(ConfigError, match=r"B \(val split\)"):
        ds.SynthConfig(split={"train": ["A"], "val": ["B"]}, shape_model=sampling)
    config = ds.SynthConfig(split={"train": ["A", "B"], "val": ["C"]}, shape_model=sampling)
    with pytest.raises(ConfigError, match=r"B \(test split\)"):
        ds.generate_dataset(tmp_path / "d", 2, _tiny_grid(), config=config, femurs=FEMURS,
                            split={"train": ["A"], "test": ["B"]}, workers=0)
    assert not (tmp_path / "d" / "manifest.json").exists()


def test_synth_command_refuses_it_in_one_line(tmp_path, capsys):
    # a model built from the bundled specimens TLEM2 and JIA; JIA is the default val specimen
    names = {"TLEM2_CT:left": "A:left", "TLEM2_CT:right": "A:right", "JIA_MRI:right": "B:right"}
    femurs = [ds.SourceFemur(n, n.split("_")[0]) for n in names]
    models = {n: _analytic_model(a) for n, a in names.items()}
    path = tmp_path / "tj.npz"
    sm.build_shape_model(path, {"train": ["TLEM2", "JIA"]}, femurs=femurs, models=models, **BOX)
    code = cli.main(["synth", "--out", str(tmp_path / "d"), "--subjects", "2", "--shape-model", str(path)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "JIA (val split)" in err[0]
    assert cli.main(["synth", "--out", str(tmp_path / "d"), "--subjects", "2", "--shape-model-sd", "2"]) == 2


# ----------------------------------------------------------------------------------------------
# Sampled deformations: within range, invertible, Jacobian > 0, head fixed
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sd_limit", [0.5, 1.0, 3.0])
def test_sampled_deformations_are_invertible_and_within_range(model_ab, sd_limit):
    _, model, _ = model_ab
    rng = np.random.default_rng(4)
    extent = model.step_mm * (np.array(model.sdm.mean.shape[:3][::-1]) - 1)  # x, y, z
    points = rng.uniform(model.origin_mm - 20, model.origin_mm + extent + 20, (4000, 3))
    for draw in range(20):
        weights = model.sample_weights(rng, sd_limit)
        assert np.all(np.abs(weights) <= sd_limit)
        d = model.deformation(weights)
        assert 0 < d.scale <= 1 and np.all(np.abs(d.weights) <= sd_limit + 1e-12)
        assert d.lipschitz <= sm.LIPSCHITZ_MAX + 1e-9
        jac = d.jacobian_determinant(points)
        assert jac.min() >= (1 - sm.LIPSCHITZ_MAX) ** 3 - 1e-6
        moved = d.apply_points(points)
        np.testing.assert_allclose(d.inverse_points(moved), points, atol=1e-5)
        np.testing.assert_allclose(d.apply_points(np.zeros((1, 3))), 0.0, atol=1e-12)  # the head centre stays


def test_truncated_normal_weights_fill_their_range(model_ab):
    _, model, _ = model_ab
    w = model.sample_weights(np.random.default_rng(0), 1.0)
    draws = np.stack([model.sample_weights(np.random.default_rng(s), 1.0) for s in range(2000)])
    assert draws.shape == (2000, model.n_components) and np.abs(draws).max() <= 1.0
    assert abs(draws.mean()) < 0.03 and 0.5 < draws.std() < 0.56  # sd of N(0,1) truncated at +-1: 0.538
    np.testing.assert_array_equal(w, model.sample_weights(np.random.default_rng(0), 1.0))


def test_a_steep_draw_is_scaled_down_to_the_lipschitz_limit():
    # u_x = a * z (one component, known gradient a): a = 1.6 must be scaled by 0.5 / 1.6
    shape = (6, 5, 4)
    z = np.arange(shape[0], dtype=np.float64)[:, None, None] * 10.0
    field = np.zeros((*shape, 3))
    field[..., 0] = 1.6 * z
    norm = np.linalg.norm(field)
    component = (field / norm).reshape(1, -1).astype(np.float32)
    sdm = StatisticalDeformationModel(np.zeros((*shape, 3), np.float32), component, np.array([norm], np.float32))
    model = sm.FemurShapeModel(sdm, np.zeros(3), 10.0, {"format": sm.SHAPE_MODEL_FORMAT, "specimens": ["A"]})
    assert sm.lipschitz_bound(field, 10.0) == pytest.approx(1.6)
    d = model.deformation([1.0])
    assert d.scale == pytest.approx(0.5 / 1.6) and d.lipschitz == pytest.approx(0.5)
    p = np.array([[5.0, 5.0, 20.0]])
    # u(p) - u(head) = 0.5 * (20 - 0) along x
    np.testing.assert_allclose(d.apply_points(p), [[15.0, 5.0, 20.0]], atol=1e-9)
    np.testing.assert_allclose(d.jacobian_determinant(p), [1.0], atol=1e-9)  # a shear keeps volume
    np.testing.assert_allclose(d.inverse_points(d.apply_points(p)), p, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# Synth with the option: reproducible from its seed, other draws unchanged
# ----------------------------------------------------------------------------------------------
def _tiny_grid() -> ds.DatasetGrid:
    geometry = g.VolumeGeometry.centered((24, 16, 24), (5.3, 5.3, 8.0), (-20.0, 0.0, -55.0))
    return ds.DatasetGrid("tiny", geometry, (20, 28))


def _make(out, model_path, seed, sd=1.0):
    config = ds.SynthConfig(phantom=ds.PhantomSampling(shape=False), realism=aug.RealismRanges(enabled=False),
                            split={"train": ["A", "B"], "val": ["C"]}, split_fractions={"train": 1.0},
                            shape_model=None if model_path is None else sm.ShapeModelSampling(str(model_path), sd))
    models = {name: _analytic_model(name) for name in SHAPES}
    manifest = ds.generate_dataset(out, 3, _tiny_grid(), seed=seed, workers=0, config=config, femurs=FEMURS,
                                   models=models)
    return json.loads(manifest.read_text())


def test_synth_with_the_shape_model_is_reproducible_from_its_seed(model_ab, tmp_path):
    path, model, _ = model_ab
    first, again = _make(tmp_path / "a", path, 5), _make(tmp_path / "b", path, 5)
    assert [s["sha256"] for s in first["samples"]] == [s["sha256"] for s in again["samples"]]
    other = _make(tmp_path / "c", path, 6)
    assert [s["sha256"] for s in other["samples"]] != [s["sha256"] for s in first["samples"]]
    plain = _make(tmp_path / "p", None, 5)
    assert "shape_model" not in plain["parameters"]["config"]
    assert first["parameters"]["config"]["shape_model"]["specimens"] == ["A", "B"]
    for deformed, undeformed in zip(first["samples"], plain["samples"]):
        # only the femur's shape changes: pose, tissue, views and realism are the same draws
        assert deformed["phantom_params"] == undeformed["phantom_params"]
        assert deformed["view_angles_deg"] == undeformed["view_angles_deg"]
        draw = deformed["shape_model"]
        assert len(draw["weights"]) == model.n_components and max(abs(w) for w in draw["weights"]) <= 1.0
        a = ds.load_sample(tmp_path / "a" / deformed["file"])["labels"] == 1
        b = ds.load_sample(tmp_path / "p" / undeformed["file"])["labels"] == 1
        assert a.any() and b.any() and (a != b).any()
    # resuming with another sd limit is another data set: refused
    with pytest.raises(Exception, match="grid, geometry, seed, split or augmentation"):
        _make(tmp_path / "a", path, 5, sd=2.0)
