"""Shared, cached test data of the registration tests (test_pipeline, test_localize, test_views, test_cli).

Simulated cases and the untrained compact model are expensive (seconds each on a busy 2-core
machine), so they are built once per test process and reused by every test file that asks for
them: pytest caches session fixtures per defining module, so the memoisation lives here, keyed by
the session's base temporary folder.

Cases come from :func:`inference.data.simulate.simulate_phantom_case` of the validation specimen
(JIA_MRI) on a coarse CT grid (3 mm voxels, femur fields at 2 mm) and small detectors, with the
ground truth (``truth.json``, ``labels.nii.gz``) in a separate folder.
"""

from __future__ import annotations

import functools
import json
import pathlib
import shutil
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

#: Detector of the test cases: 128 x 128 pixels of 2 mm (256 mm field, enough for the compact
#: atlas grid around a head placed up to 25 mm off the isocentre).
DETECTOR = (128, 128, 2.0)
#: Coarse phantom CT grid (3 mm voxels) around the canonical pose pivot: the extent of the
#: default phantom CT grid (the body must fill the radiographs, as in a clinical one).
CT_SHAPE_ZYX = (90, 75, 85)
CT_SPACING_MM = (3.0, 3.0, 3.0)
#: An oblique pair for a left femur: AP turned by +30 deg, lateral by +30 deg (90 deg apart).
OBLIQUE_LEFT_DEG = (30.0, -60.0)


@dataclass(frozen=True)
class SimulatedCase:
    case_dir: pathlib.Path
    truth_dir: pathlib.Path

    @functools.cached_property
    def truth(self) -> dict[str, Any]:
        return json.loads((self.truth_dir / "truth.json").read_text())

    @property
    def hip_centre_mm(self) -> np.ndarray:
        return np.asarray(self.truth["hip_centre_mm"], float)


@functools.cache
def subject_model():
    """The right JIA_MRI femur + pelvis distance fields at 2 mm (disk-cached by the phantom module)."""
    from inference.data import phantom

    return phantom.load_subject_model("JIA_MRI:right", spacing_mm=2.0)


def simulated_case(base: pathlib.Path, side: str = "right", seed: int = 3,
                   angles_deg: tuple[float, float] | None = None,
                   detector: tuple[int, int, float] = DETECTOR) -> SimulatedCase:
    """A simulated case of the JIA_MRI phantom and its truth under ``base`` (built once per key)."""
    # one positional key, however the caller spelled the arguments
    return _simulated_case(pathlib.Path(base), side, int(seed),
                           None if angles_deg is None else tuple(map(float, angles_deg)), tuple(detector))


@functools.cache
def _simulated_case(base, side, seed, angles_deg, detector) -> SimulatedCase:
    from inference import geometry
    from inference.data import phantom, simulate

    tag = f"{side}_{seed}_{'std' if angles_deg is None else '_'.join(f'{a:g}' for a in angles_deg)}"
    tag += f"_{detector[0]}x{detector[1]}"
    case_dir, truth_dir = base / f"case_{tag}", base / f"truth_{tag}"
    geometry_file = None
    if angles_deg is not None:
        # Views around the true head (+ an offset): the geometry file needs the world, so make
        # the phantom's placement first by simulating with a standard geometry into a scratch
        # folder would double the cost; instead aim at the nominal hip position of phantom cases.
        hip = np.asarray(simulate.HIP_POSITION_MM) * ([-1.0, 1.0, 1.0] if side == "left" else 1.0)
        geo = simulate.standard_geometry(hip + [6.0, -8.0, 10.0], side, angles_deg=angles_deg,
                                         rows=detector[0], cols=detector[1], pixel_mm=detector[2])
        geometry_file = simulate.write_geometry_file(base / f"geometry_{tag}.json", geo)
    grid = geometry.VolumeGeometry.centered(CT_SHAPE_ZYX, CT_SPACING_MM, phantom.POSE_PIVOT_MM)
    simulate.simulate_phantom_case("JIA_MRI:right", seed, case_dir, side=side, truth_out=truth_dir,
                                   model=subject_model(), ct_grid=grid, detector=detector,
                                   geometry_file=geometry_file)
    return SimulatedCase(case_dir, truth_dir)


@functools.cache
def compact_model():
    """An untrained compact registration model with the compact atlas (weights seeded by Keras)."""
    import keras

    from inference import model as model_lib
    from inference.data import atlas as atlas_lib

    keras.utils.set_random_seed(0)
    return model_lib.build_model(model_lib.preset("compact"), atlas_lib.load_atlas("compact"))


@functools.cache
def saved_model(base: pathlib.Path) -> pathlib.Path:
    """:func:`compact_model` saved as ``.keras`` with its model card (for the CLI's ``--model``)."""
    from inference import model as model_lib

    path, _ = model_lib.save_model(compact_model(), base / "model" / "compact_untrained.keras")
    return path


def copy_case(case_dir: pathlib.Path, dest: pathlib.Path,
              edit: Callable[[dict], None] | None = None) -> pathlib.Path:
    """Copy a case folder; ``edit(case_json_dict)`` may change case.json in place."""
    shutil.copytree(case_dir, dest)
    if edit is not None:
        raw = json.loads((dest / "case.json").read_text())
        edit(raw)
        (dest / "case.json").write_text(json.dumps(raw, indent=2))
    return dest


def view_files(case_dir: pathlib.Path, index: int) -> tuple[pathlib.Path, pathlib.Path | None]:
    """Image and mask paths of view ``index`` of a case."""
    view = json.loads((case_dir / "case.json").read_text())["views"][index]
    return case_dir / view["image"], (case_dir / view["mask"]) if view.get("mask") else None


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


def assert_equivalent_outputs(reference_dir: pathlib.Path, reference_measurements: dict[str, Any],
                              other_dir: pathlib.Path, other_measurements: dict[str, Any],
                              min_dice: float = 0.999, atol_mm: float = 0.05) -> None:
    """Two registrations' outputs agree: every label's Dice >= ``min_dice`` between the label maps
    and every numeric measurement (scalars and coordinate lists) within ``atol_mm``."""
    import SimpleITK as sitk

    labels = [sitk.GetArrayFromImage(sitk.ReadImage(str(d / "femur_labels.nii.gz"))) for d in (reference_dir, other_dir)]
    assert (labels[0] == 1).sum() > 1000
    for value in np.unique(labels[0]):
        if value == 0:
            continue
        agreement = dice(labels[0] == value, labels[1] == value)
        assert agreement >= min_dice, f"label {value}: Dice {agreement:.5f}"
    checked = 0
    for key, value in reference_measurements.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            assert abs(other_measurements[key] - value) <= atol_mm, (key, value, other_measurements[key])
            checked += 1
        elif isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
            np.testing.assert_allclose(other_measurements[key], value, atol=atol_mm, err_msg=key)
            checked += 1
    assert checked >= 5
