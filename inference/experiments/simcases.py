"""Held-out simulated cases run through ``hipatlas register``, and how their outputs are scored.

A *case* is a case folder (hipatlas-case/1: two radiographs, masks and projection matrices) and a
truth folder (label map, landmarks, measurements) made by
:func:`inference.data.simulate.simulate_phantom_case` from a phantom of a validation specimen. Its
*plan* (:func:`case_plan`) fixes everything about it from a seed, so the same cases come back on
every run. :func:`register_variant` registers a case as ``hipatlas register`` does with the options
of one pipeline step (:data:`VARIANTS`) and scores the output against the truth
(:func:`case_metrics`).

Used by ``tools/eval_cases.py`` (and the studies in ``tools/``) and by the angle-sensitivity
experiment (:mod:`inference.experiments.angle`), which records the lateral matrix rotated by a
known angle (:func:`perturb_lateral`) to measure what self-calibration recovers.
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
import shutil
import time
from typing import Any

import numpy as np

from inference import measure
from inference.errors import ConfigError, HipAtlasError

log = logging.getLogger(__name__)

#: The steps of issue 13, each a set of :func:`inference.pipeline.register_case` options.
#: The first five are one network pass (as measured before the shift ensemble existed); the
#: ``ensemble`` ones average five (:mod:`inference.ensemble`); ``ensemble-auto`` is ``register``'s default.
VARIANTS = {
    "network": {"full_resolution": False, "refine": False, "ensemble": False},
    "fullres": {"full_resolution": True, "refine": False, "ensemble": False},
    "refine": {"full_resolution": True, "refine": True, "self_calibrate": False, "ensemble": False},
    "selfcal": {"full_resolution": True, "refine": True, "self_calibrate": True, "ensemble": False},
    "auto": {"full_resolution": True, "refine": "auto", "self_calibrate": False, "ensemble": False},
    "ensemble": {"full_resolution": True, "refine": False, "ensemble": True},
    "ensemble-auto": {"full_resolution": True, "refine": "auto", "self_calibrate": False, "ensemble": True},
    # the refinement always run (not only where the outlines disagree with the masks)
    "ensemble-refine": {"full_resolution": True, "refine": True, "self_calibrate": False, "ensemble": True},
    # what register did before the shaft fit (session 17): its effect, paired on the same cases
    "ensemble-auto-no-shaft-fit": {"full_resolution": True, "refine": "auto", "self_calibrate": False,
                                   "ensemble": True, "shaft_fit": False},
    # without the head anchor (session 18; since session 19 it runs only where the outline fit does not)
    "ensemble-auto-no-head-anchor": {"full_resolution": True, "refine": "auto", "self_calibrate": False,
                                     "ensemble": True, "head_anchor": False},
    # what register did before the outline fit (session 19): the head anchor then runs
    "ensemble-auto-no-outline-fit": {"full_resolution": True, "refine": "auto", "self_calibrate": False,
                                     "ensemble": True, "outline_fit": False},
}
#: Measurements compared with the truth measured on the true label (the head radius has its phantom truth).
COMPARED = tuple(m for m in measure.MEASUREMENTS if m.kind == "scalar" and m.key != "head_radius_mm")
#: How the radiographs of a simulated case are drawn (:func:`simulate_case`).
RENDERERS = ("drr", "xray")
#: The detector of a plan without variety: rows, columns, pixel pitch (mm).
DEFAULT_DETECTOR = (768, 768, 0.4)


def error_name(m) -> str:
    """The row field of measurement ``m``'s error, e.g. ``femoral_offset_error_mm``."""
    return f"{m.key[:-len(m.unit) - 1]}_error_{m.unit}"


def covered_name(m) -> str:
    """The row field saying whether ``m``'s error is within two stated uncertainties (``femoral_offset_covered``)."""
    return f"{m.key[:-len(m.unit) - 1]}_covered"


# --------------------------------------------------------------------------------------------
# Plans and simulation
# --------------------------------------------------------------------------------------------

def case_plan(index: int, seed: int, vary: bool, sides: list[str],
              view_separation_deg: float | None = None) -> dict[str, Any]:
    """Everything that defines case ``index`` (reproducible from ``seed``).

    Parameters
    ----------
    index : int
        Case number; the case's own seed is ``seed * 1000 + index``.
    seed : int
        Base seed of the series.
    vary : bool
        Draw radiograph size (512-1024 px) and pitch (0.25-0.5 mm), image format and intensity
        scale, a random scale and sign of each P, and oblique views (+-30 deg).
    sides : list of "right" / "left"
        Cycled over the cases.
    view_separation_deg : float or None
        AP at 0 deg and the second view this far from it towards the lateral side (90 = orthogonal).
    """
    rng = np.random.default_rng([seed, index])
    plan: dict[str, Any] = {"index": index, "seed": int(seed * 1000 + index), "side": sides[index % len(sides)],
                            "detector": DEFAULT_DETECTOR, "angles_offset_deg": (0.0, 0.0), "image_format": "png",
                            "intensity_scale": 1.0, "p_scale": (1.0, 1.0)}
    if view_separation_deg is not None:
        # AP at 0 deg, the second view at the separation towards the lateral side (90 = orthogonal)
        offset = view_separation_deg - 90.0
        plan["angles_offset_deg"] = (0.0, offset if plan["side"] == "right" else -offset)
    if vary:
        size = int(rng.choice([512, 640, 768, 1024]))
        pitch = float(rng.uniform(0.25, 0.5))
        # keep a field of view of at least 250 mm at the detector so the hip fits
        pitch = max(pitch, 250.0 / size)
        plan["detector"] = (size, size, round(pitch, 4))
        plan["angles_offset_deg"] = tuple(float(a) for a in rng.uniform(-30.0, 30.0, 2))
        plan["image_format"] = str(rng.choice(["png", "tiff"]))
        plan["intensity_scale"] = float(10.0 ** rng.uniform(-2.0, 2.0))
        plan["p_scale"] = tuple(float(s) for s in rng.choice([-1.0, 1.0], 2) * 10.0 ** rng.uniform(-3, 3, 2))
    return plan


def simulate_case(plan: dict[str, Any], subject: str, work: pathlib.Path, ct_spacing_mm: float,
                  shaft_mm: float | None = None, renderer: str = "drr") -> tuple[pathlib.Path, pathlib.Path]:
    """The case folder and truth folder of ``plan`` (with only ``shaft_mm`` of shaft showing, if given).

    Written to ``work/case_NNN`` and ``work/truth_NNN`` (NNN the plan's index); ``subject`` is a
    shared femur such as ``"JIA_MRI:right"``; ``ct_spacing_mm`` the phantom CT's voxel size (1.5 mm
    as evaluated, 3 mm for a quick look). ``renderer``: ``"drr"``, the radiographs of the training
    data's renderer (:mod:`inference.drr` and its realism augmentation); ``"xray"``, the same
    phantom CT drawn by the independent renderer :mod:`inference.experiments.xray`.

    Raises
    ------
    HipAtlasError
        The phantom or its radiographs could not be made.
    """
    if renderer not in RENDERERS:
        raise ConfigError(f"renderer must be one of {RENDERERS}, not {renderer!r}")
    case_dir, truth_dir = _simulate(plan, subject, work, ct_spacing_mm)
    if renderer == "xray":
        from inference.experiments import xray

        xray.rerender_case(case_dir, truth_dir, seed=plan["seed"], pixel_mm=plan["detector"][2])
    if shaft_mm is not None:
        _crop_shaft(case_dir, truth_dir, shaft_mm)
    return case_dir, truth_dir


def _simulate(plan: dict[str, Any], subject: str, root: pathlib.Path, ct_spacing_mm: float) -> tuple[pathlib.Path,
                                                                                                     pathlib.Path]:
    from inference import geometry
    from inference.data import phantom, simulate

    case_dir, truth_dir = root / f"case_{plan['index']:03d}", root / f"truth_{plan['index']:03d}"
    side = plan["side"]
    extent = np.asarray(simulate.PHANTOM_CT_SHAPE_ZYX) * np.asarray(simulate.PHANTOM_CT_SPACING_MM)
    shape = tuple(int(round(e / ct_spacing_mm)) for e in extent)
    grid = geometry.VolumeGeometry.centered(shape, (ct_spacing_mm,) * 3, phantom.POSE_PIVOT_MM)
    rows, cols, pitch = plan["detector"]
    geometry_file = None
    if any(plan["angles_offset_deg"]) or plan["detector"] != DEFAULT_DETECTOR:
        # Views around the nominal hip position (the phantom's placement adds +-20 mm).
        hip = np.asarray(simulate.HIP_POSITION_MM) * ([-1.0, 1.0, 1.0] if side == "left" else 1.0)
        rng = np.random.default_rng(plan["seed"])
        lateral = 90.0 if side == "right" else -90.0
        angles = (plan["angles_offset_deg"][0], lateral + plan["angles_offset_deg"][1])
        geo = simulate.standard_geometry(hip + rng.uniform(-20.0, 20.0, 3), side, angles_deg=angles, rows=rows,
                                         cols=cols, pixel_mm=pitch)
        geometry_file = simulate.write_geometry_file(root / f"geometry_{plan['index']:03d}.json", geo)
    image_format = "tiff" if plan["image_format"] == "tiff" else "png"
    simulate.simulate_phantom_case(subject, plan["seed"], case_dir, side=side, truth_out=truth_dir,
                                   geometry_file=geometry_file, ct_grid=grid, detector=(rows, cols, pitch),
                                   image_format=image_format)
    _apply_variety(case_dir, plan)
    return case_dir, truth_dir


def _apply_variety(case_dir: pathlib.Path, plan: dict[str, Any]) -> None:
    """Scale float TIFF intensities and each P by the plan's factors (same images, same cameras)."""
    raw = json.loads((case_dir / "case.json").read_text())
    for view, p_scale in zip(raw["views"], plan["p_scale"]):
        view["projection_matrix"] = (np.asarray(view["projection_matrix"]) * p_scale).tolist()
        if plan["image_format"] == "tiff" and plan["intensity_scale"] != 1.0:
            import tifffile

            path = case_dir / view["image"]
            data = tifffile.imread(path).astype(np.float32) * np.float32(plan["intensity_scale"])
            tifffile.imwrite(path, data, photometric="minisblack")
    (case_dir / "case.json").write_text(json.dumps(raw, indent=2))


def _crop_shaft(case_dir: pathlib.Path, truth_dir: pathlib.Path, shaft_mm: float) -> None:
    """Cut every radiograph (and mask) so that only ``shaft_mm`` of femoral shaft below the true lesser
    trochanter is on it, as on a film that ends there; P is shifted when rows are cut from the top."""
    from PIL import Image

    from inference import anatomy
    from inference.io import write_png_atomic

    truth = json.loads((truth_dir / "truth.json").read_text())
    lesser = np.asarray(truth["landmarks_mm"][anatomy.LANDMARK_NAMES.index("lesser_trochanter")], float)
    cut = lesser - [0.0, 0.0, shaft_mm]  # LPS: +z is superior
    raw = json.loads((case_dir / "case.json").read_text())
    for view in raw["views"]:
        matrix = np.asarray(view["projection_matrix"], float)
        v_lesser, v_cut = ((matrix @ np.append(point, 1.0)) for point in (lesser, cut))
        v_lesser, v_cut = v_lesser[1] / v_lesser[2], v_cut[1] / v_cut[2]
        for key in ("image", "mask"):
            if not view.get(key):
                continue
            path = case_dir / view[key]
            if path.suffix.lower() in (".tif", ".tiff"):
                import tifffile

                pixels = tifffile.imread(path)
            else:
                pixels = np.array(Image.open(path))
            rows = pixels.shape[0]
            keep = slice(0, min(rows, max(1, int(math.ceil(v_cut))))) if v_cut > v_lesser \
                else slice(max(0, min(rows - 1, int(math.floor(v_cut)) + 1)), rows)
            if path.suffix.lower() in (".tif", ".tiff"):
                tifffile.imwrite(path, pixels[keep], photometric="minisblack")
            else:
                write_png_atomic(path, pixels[keep])
        top = keep.start or 0
        shift = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, -top], [0.0, 0.0, 1.0]])
        view["projection_matrix"] = (shift @ matrix).tolist()
    (case_dir / "case.json").write_text(json.dumps(raw, indent=2))


def perturb_lateral(case_dir: pathlib.Path, angle_deg: float) -> None:
    """Record the second (lateral) view's P rotated by ``angle_deg`` about the patient's long axis
    through the point where the two central rays meet (the images stay as they were taken).

    ``case.json`` in ``case_dir`` is rewritten: ``P_recorded = P_true @ T`` with ``T`` the rotation
    by ``+angle_deg`` about the world z axis through that point."""
    from inference import geometry

    raw = json.loads((case_dir / "case.json").read_text())
    matrices = [np.asarray(v["projection_matrix"], float) for v in raw["views"]]
    centre = geometry.view_pair_check(matrices[0], matrices[1]).midpoint_mm
    angle = math.radians(angle_deg)
    rotation = np.eye(4)
    rotation[:2, :2] = [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]
    move = np.eye(4)
    move[:3, 3] = centre
    back = np.eye(4)
    back[:3, 3] = -np.asarray(centre)
    raw["views"][1]["projection_matrix"] = (matrices[1] @ move @ rotation @ back).tolist()
    (case_dir / "case.json").write_text(json.dumps(raw, indent=2))


def lateral_perturbed_copy(case_dir: pathlib.Path, work: pathlib.Path, index: int, angle_deg: float) -> pathlib.Path:
    """The case to register with its LAT recorded ``angle_deg`` off: ``case_dir`` itself at 0,
    else a fresh copy ``work/case_NNN_lat<angle>`` (NNN: ``index``) with :func:`perturb_lateral` applied."""
    if not angle_deg:
        return case_dir
    run_dir = work / f"case_{index:03d}_lat{angle_deg:g}"
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.copytree(case_dir, run_dir)
    perturb_lateral(run_dir, angle_deg)
    return run_dir


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------

def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks (NaN when both are empty)."""
    total = int(a.sum()) + int(b.sum())
    return float(2 * (a & b).sum() / total) if total else math.nan


def truth_in_output_fov(out_dir: pathlib.Path, truth_dir: pathlib.Path):
    """(true femur mask, our labels, grid): the truth label map resampled by physical coordinates
    (nearest neighbour) onto the grid of the output's ``femur_labels.nii.gz``."""
    import SimpleITK as sitk

    from inference import io

    reference = sitk.ReadImage(str(out_dir / "femur_labels.nii.gz"))
    truth_image = sitk.ReadImage(str(truth_dir / "labels.nii.gz"))
    resampled = sitk.Resample(truth_image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                              truth_image.GetPixelID())
    labels, grid = io.read_volume(out_dir / "femur_labels.nii.gz")
    return sitk.GetArrayFromImage(resampled) == 1, labels, grid


#: The shaft, for :func:`shaft_metrics`: the femur this far and more below the true lesser
#: trochanter's tip (world z, mm), where the shaft-width shape mode is whole.
SHAFT_BELOW_LT_MM = 10.0


def shaft_metrics(ours: np.ndarray, surface: np.ndarray | None, grid, truth: dict) -> dict[str, float]:
    """``volume_ratio`` (our femur's volume over the true one's, in the output's field of view),
    ``shaft_volume_ratio`` and ``shaft_dice`` (the same and Dice, only for the voxels lying
    :data:`SHAFT_BELOW_LT_MM` or more below the true lesser trochanter): a shaft drawn too thin or
    too thick shows as a ratio away from 1. NaN without a surface truth."""
    nan = {"volume_ratio": math.nan, "shaft_volume_ratio": math.nan, "shaft_dice": math.nan}
    if surface is None or not surface.any():
        return nan
    names = list(truth.get("landmark_names", []))
    row = dict(nan, volume_ratio=float(ours.sum() / surface.sum()))
    if "lesser_trochanter" not in names:
        return row
    lt_z_mm = float(truth["landmarks_mm"][names.index("lesser_trochanter")][2])
    m = grid.index_to_world()[2]  # world z of voxel (i, j, k): m @ (i, j, k, 1)
    nz, ny, nx = ours.shape
    z_mm = (m[0] * np.arange(nx)[None, None, :] + m[1] * np.arange(ny)[None, :, None]
            + m[2] * np.arange(nz)[:, None, None] + m[3])
    shaft = np.broadcast_to(z_mm <= lt_z_mm - SHAFT_BELOW_LT_MM, ours.shape)
    if not surface[shaft].any():
        return row
    row["shaft_volume_ratio"] = float(ours[shaft].sum() / surface[shaft].sum())
    row["shaft_dice"] = dice(ours[shaft], surface[shaft])
    return row


def case_metrics(out_dir: pathlib.Path, truth_dir: pathlib.Path, side: str, assd: bool = False) -> dict[str, float]:
    """An output of ``hipatlas register`` scored against the case's truth.

    Returns ``dice`` (femur, within the output's field of view, against the phantom CT's label map
    resampled), ``dice_surface`` (against the phantom's femur surface sampled on the output grid,
    :func:`inference.data.simulate.true_femur_mask`: the truth a CT label at the output's resolution
    would give), ``truth_label_dice`` (the resampled label map against that surface: the best
    ``dice`` a perfect result could score), ``hip_centre_error_mm``,
    ``head_radius_error_mm`` (phantom truth), :func:`shaft_metrics`, and per measurement of :data:`COMPARED` its error
    (:func:`error_name`: ours - the same method on the true femur in the same field of view, NaN
    when either is missing), ``truth_<key>`` and, with a stated uncertainty, :func:`covered_name`
    (1.0 when within two uncertainties); with ``assd`` also ``assd_mm`` and ``hd95_mm`` (and
    ``assd_surface_mm``, ``hd95_surface_mm`` against the surface truth)."""
    from inference.data import simulate

    truth = json.loads((truth_dir / "truth.json").read_text())
    ours = json.loads((out_dir / "measurements.json").read_text())
    truth_fov, labels, grid = truth_in_output_fov(out_dir, truth_dir)
    try:
        surface = simulate.true_femur_mask(truth_dir, grid)
    except HipAtlasError as error:  # a case made from a subject model that is not a shared one
        log.warning("no surface truth for %s: %s", truth_dir, error)
        surface = None
    row = {
        "dice": dice(labels == 1, truth_fov),
        "dice_surface": math.nan if surface is None else dice(labels == 1, surface),
        "truth_label_dice": math.nan if surface is None else dice(truth_fov, surface),
        **shaft_metrics(labels == 1, surface, grid, truth),
        "hip_centre_error_mm": float(np.linalg.norm(np.asarray(ours["hip_centre_mm"])
                                                    - np.asarray(truth["hip_centre_mm"]))),
        "head_radius_error_mm": float(ours["head_radius_mm"] - truth["head_radius_mm"]),
        **{error_name(m): math.nan for m in COMPARED},
    }
    if assd:
        from inference import evaluate

        spacing = tuple(float(v) for v in grid.spacing_xyz_mm[::-1])
        for suffix, reference in (("", truth_fov), ("_surface", surface)):
            if reference is None:
                row[f"assd{suffix}_mm"] = row[f"hd95{suffix}_mm"] = math.nan
                continue
            distances = np.concatenate(evaluate.surface_distances(labels == 1, reference, spacing))
            row[f"assd{suffix}_mm"] = float(distances.mean()) if distances.size else math.nan
            row[f"hd95{suffix}_mm"] = float(np.percentile(distances, 95)) if distances.size else math.nan
    try:
        truth_measured = measure.measure_femur(truth_fov.astype(np.uint8), grid, side=side)
        for m in COMPARED:
            if ours.get(m.key) is None or truth_measured[m.key] is None:
                continue
            error = float(ours[m.key] - truth_measured[m.key])
            row[error_name(m)] = error
            row[f"truth_{m.key}"] = float(truth_measured[m.key])
            uncertainty = (ours.get("uncertainty") or {}).get(m.key)
            if uncertainty is not None:
                row[covered_name(m)] = float(abs(error) <= 2.0 * uncertainty)
    except HipAtlasError as error:  # the truth femur cut by a misplaced field of view
        log.warning("cannot measure the true femur in the output's field of view: %s", error)
    return row


def register_variant(net: Any, run_dir: pathlib.Path, result_dir: pathlib.Path, variant: str, *,
                     truth_dir: pathlib.Path, side: str, assd: bool = False) -> dict[str, Any]:
    """Register ``run_dir`` into ``result_dir`` with the options of step ``variant`` and score it.

    Parameters
    ----------
    net : keras.Model, path or backend
        What :func:`inference.pipeline.register_case` accepts as ``model`` (self-calibration needs
        TensorFlow: a Keras model or its ``.keras`` file).
    run_dir, result_dir : path
        The case folder and the output folder (overwritten).
    variant : str
        A key of :data:`VARIANTS`.
    truth_dir, side :
        The case's truth folder and femur side (:func:`case_metrics`).

    Returns
    -------
    dict
        ``time_s`` (wall time of the registration), the fields of :func:`case_metrics`,
        ``warnings``, ``mask_agreement_dice`` (per view: the output's silhouette against the mask,
        as report.json has it), and when refinement ran ``refinement_used``, ``refinement_loss`` (before,
        after), ``refinement_time_s`` and ``self_calibration`` (report.json's per-view corrections).

    Raises
    ------
    HipAtlasError
        The registration or its scoring failed.
    """
    from inference import pipeline

    row: dict[str, Any] = {}
    start = time.perf_counter()
    result = pipeline.run_to_completion(pipeline.register_case(
        run_dir, result_dir, model=net, overwrite=True, **VARIANTS[variant]))
    row["time_s"] = time.perf_counter() - start
    row.update(case_metrics(result_dir, truth_dir, side, assd=assd))
    row["warnings"] = result.warnings
    refinement = result.report.get("refinement", {})
    row["mask_agreement_dice"] = [view.get("mask_agreement_dice") for view in result.report.get("views", [])]
    spread = result.report.get("ensemble", {}).get("spread_mm")
    if spread:
        row["ensemble_spread_mm"] = spread["median"]
    if "auto" in refinement:
        row["auto_refine"] = refinement["auto"]["run"]
    if refinement.get("run"):
        row["refinement_used"] = refinement["used"]
        row["refinement_loss"] = [refinement["loss_before"], refinement["loss_after"]]
        row["refinement_time_s"] = refinement["time_s"]
        row["self_calibration"] = refinement.get("self_calibration")
    return row


__all__ = ["VARIANTS", "COMPARED", "DEFAULT_DETECTOR", "error_name", "covered_name", "case_plan", "simulate_case",
           "perturb_lateral", "dice", "truth_in_output_fov", "case_metrics", "register_variant"]
