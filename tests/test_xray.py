"""The independent renderer of the held-out evaluation (inference.experiments.xray): known line
integrals, the material split, the polychromatic beam, and a simulated case drawn with it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from inference import geometry, io
from inference.experiments import xray


def _camera(sdd_mm=1000.0, sid_mm=600.0, rows=33, cols=33, pixel_mm=1.0):
    """A pinhole looking along +y (LPS posterior) at the origin from y = -sid; image u along x, v along -z."""
    f = sdd_mm / pixel_mm
    intrinsics = np.array([[f, 0.0, (cols - 1) / 2], [0.0, f, (rows - 1) / 2], [0.0, 0.0, 1.0]])
    rotation = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])  # camera x, y, z in world
    extrinsics = np.hstack([rotation, -rotation @ np.array([[0.0], [-sid_mm], [0.0]])])
    return intrinsics @ extrinsics


def test_a_ray_through_a_cube_integrates_its_thickness():
    grid = geometry.VolumeGeometry.centered((20, 20, 20), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    cube = np.ones(grid.shape_zyx, np.float32)
    P = _camera()
    (path,) = xray.line_integrals([cube], grid, P, 33, 33, step_mm=0.25)
    # the central ray crosses 40 mm of the cube (trilinear: the faces ramp over one voxel, same area)
    assert path[16, 16] == pytest.approx(40.0, abs=0.3)
    # a ray that misses the cube integrates nothing; one through its edge less than the centre
    far = _camera(rows=33, cols=33, pixel_mm=4.0)
    (wide,) = xray.line_integrals([cube], grid, far, 33, 33, step_mm=0.25)
    assert wide[0, 0] == 0.0 and 0.0 < wide[16, 24] < wide[16, 16] - 5.0


def test_materials_keep_each_voxels_attenuation_at_60_kev():
    hu = np.array([-1000.0, -100.0, 0.0, 500.0, xray.BONE_HU_60KEV, 3000.0], np.float32)
    water, bone = xray.materials(hu)
    np.testing.assert_allclose(water[:3], [0.0, 0.9, 1.0], atol=1e-6)
    np.testing.assert_allclose(bone[:3], 0.0)
    assert water[4] == pytest.approx(0.0, abs=1e-6) and bone[4] == pytest.approx(xray.BONE_DENSITY)
    mu_60 = water * 0.2059 + bone * 0.3148  # cm^2/g x g/cm^3 = 1/cm
    np.testing.assert_allclose(mu_60[1:5], 0.2059 * (1.0 + hu[1:5] / 1000.0), rtol=1e-4)
    assert bone[5] == pytest.approx(xray.BONE_DENSITY)  # denser than cortical bone: capped


def test_the_polychromatic_beam_hardens_through_bone():
    """Each further cm of bone attenuates less than the one before (monochromatic: the same)."""
    def exponent(bone_cm):
        return -np.log(sum(w * np.exp(-mu_b * xray.BONE_DENSITY * bone_cm) for _, w, _, mu_b in xray.SPECTRUM))

    steps = np.diff([exponent(c) for c in (0.0, 1.0, 2.0, 3.0)])
    assert steps[0] > steps[1] > steps[2] > 0
    assert sum(w for _, w, _, _ in xray.SPECTRUM) == pytest.approx(1.0)


def test_a_simulated_case_redrawn_by_the_independent_renderer(tmp_path, tmp_path_factory):
    import register_helpers as rh

    sim = rh.simulated_case(tmp_path_factory.getbasetemp(), "right")
    cases = []
    for name in ("a", "b"):
        case = tmp_path / name
        shutil.copytree(sim.case_dir, case)
        xray.rerender_case(case, sim.truth_dir, seed=4, pixel_mm=rh.DETECTOR[2])
        cases.append(case)
    raw = json.loads((cases[0] / "case.json").read_text())
    assert all(view["image"].endswith(".tif") for view in raw["views"])
    assert not any(p.suffix == ".png" and "mask" not in p.name for p in cases[0].iterdir())
    before, after, again = io.load_case(sim.case_dir), io.load_case(cases[0]), io.load_case(cases[1])
    for old, new, same in zip(before.views, after.views, again.views):
        np.testing.assert_array_equal(new.mask, old.mask)  # masks and cameras kept
        np.testing.assert_array_equal(new.P, old.P)
        np.testing.assert_array_equal(new.image.pixels, same.image.pixels)  # seeded
        image = new.image.pixels
        assert image.shape == old.image.pixels.shape
        # the same anatomy: strongly correlated with the first renderer's image, bone brighter
        assert np.corrcoef(image.ravel(), old.image.pixels.ravel())[0, 1] > 0.9
        body = image > np.percentile(image, 50)
        assert image[new.mask].mean() > image[body & ~new.mask].mean()
