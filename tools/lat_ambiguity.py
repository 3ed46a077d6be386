"""How much Dice a view's recorded angle error costs *any* method that trusts the calibration (issue 13).

Question. Issue 13 asks that a lateral (LAT) view whose recorded angle is 5 deg off cost at most
0.02 Dice. Suppose the recorded LAT matrix is ``P_lat_rec = P_lat @ T``, ``T`` the rotation by
``+angle`` about world z through the point where the two central rays meet (exactly what
:func:`inference.experiments.simcases.perturb_lateral` records). Then there is a *different*
femur that, seen through the recorded (wrong) matrices, throws exactly the shadows the true femur
throws through the true ones: a method that trusts the matrices and reproduces the radiographs
can only find that femur. How far it lies from the truth is the floor of the LAT-error cost for
any method that does not override the calibration with an anatomical prior.

The consistent femur. For a point ``Y`` of the reconstructed (recorded) world, its AP pixel is
``P_ap Y`` and its recorded-LAT pixel ``P_lat_rec Y = P_lat (T Y)``. With the true matrices, the
AP ray through that pixel is the line from the AP source through ``Y``, and the true LAT ray is
the line from the LAT source through ``T Y``; their point of closest approach ``X`` (the
triangulation) is the true point that produced both pixels, and ``consistent(Y) = truth(X)``. The
rays' distance at closest approach (the triangulation residual) says how exactly such an ``X``
exists: were the epipolar geometry changed by ``T``, the rays would miss each other by
millimetres; here they miss by tenths of a millimetre. ``--views ap`` measures the same for an AP
angle error (the AP recorded as ``P_ap @ T``), for contrast.

``truth(X)`` is the phantom's femur signed distance (< 0 inside) evaluated at ``X`` itself, with
the code :func:`inference.data.simulate.true_femur_mask` uses, at points instead of voxel
centres (:func:`inference.data.simulate.true_femur_inside`). Each case checks that at 0 deg this reproduces
``true_femur_mask`` voxel for voxel.

Reported per case and perturbed view (``lat``, ``ap``) and angle:

* ``dice_floor``, ``assd_floor_mm``: the consistent femur against the true one on the scoring grid
  (the cost's floor; :func:`inference.evaluate.surface_distances` for the ASSD);
* ``sil_<view>_true``: the true femur projected with the true matrices against the case's mask
  (:func:`inference.silhouettes.mask_agreement`, silhouette = path length >= the overlays' 0.5 mm);
  ``sil_<view>_consistent``: the consistent femur projected with the *recorded* matrices against
  the same mask; ``sil_<view>_truth_recorded``: the true femur projected with the recorded
  matrices (what the truth would score under the wrong calibration); ``sil_<view>_pair``: Dice of
  the true and the consistent silhouettes;
* ``ray_gap_mean_mm``, ``ray_gap_max_mm``: the triangulation residual over both femurs' voxels,
  and ``reprojection_max_px``: the largest reprojection error of :func:`inference.geometry.triangulate`
  on up to 20,000 of them (which also checks the closed form, ``triangulate_diff_max_mm``);
* ``hip_centre_shift_mm``: how far the true head centre moves (the point that the recorded
  matrices triangulate from its two true projections); ``displacement_mean_mm`` /
  ``displacement_max_mm``: ``|X - Y|`` over the consistent femur.

Scoring grid: axis-aligned, 0.664 x 0.664 x 1 mm (the registration output's spacing), spanning the
true femur's voxels (the phantom CT label) that project inside both radiographs, grown by 10 mm on
every side but the bottom (the shaft is cut where the films end). With ``--register`` each LAT case
(0 deg and every ``--angles``) is also registered as ``hipatlas register`` does (variant
``ensemble-auto``, the held-out shipped model unless ``--model``), and on the output's own grid
(where the eval scores) it reports ``reg_dice_truth`` (= the eval's ``dice_surface``),
``reg_dice_consistent`` (our output against the consistent femur) and ``reg_dice_floor`` (the
consistent femur against the truth on that grid).

Cases are those of ``tools/eval_cases.py --cases N --seed S`` (orthogonal views, JIA_MRI, sides
right,left alternating, phantom CT 1.5 mm), made under ``--work`` (git-ignored ``work/``).

    .venv/bin/python tools/lat_ambiguity.py --cases 8 --seed 2024 --angles 2,5,10 --register \\
        --out docs/results/lat-ambiguity

Writes ``OUT/lat_ambiguity.md`` and ``OUT/<--json>`` (command, commit, per-case rows, summary).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import pathlib
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

log = logging.getLogger("lat_ambiguity")

REPO = pathlib.Path(__file__).resolve().parents[1]
#: The registration output grid's spacing (x, y, z), mm: where the eval scores.
SCORING_SPACING_XYZ_MM = (0.664, 0.664, 1.0)
#: How far the scoring grid reaches beyond the visible true femur (not below: the films end there), mm.
BOX_MARGIN_MM = 10.0
#: Femur voxels of the triangulation check (geometry.triangulate is slower than the closed form).
TRIANGULATE_CHECK_POINTS = 20_000
VIEW_NAMES = ("AP", "LAT")
#: The perturbed view's index in the pair.
VIEW_INDEX = {"ap": 0, "lat": 1}
#: Per-row metrics, in table order.
FLOOR_METRICS = ("dice_floor", "assd_floor_mm", "sil_AP_true", "sil_AP_consistent", "sil_AP_truth_recorded",
                 "sil_AP_pair", "sil_LAT_true", "sil_LAT_consistent", "sil_LAT_truth_recorded", "sil_LAT_pair",
                 "ray_gap_mean_mm", "ray_gap_max_mm", "reprojection_max_px", "hip_centre_shift_mm",
                 "displacement_mean_mm", "displacement_max_mm")
REGISTER_METRICS = ("reg_dice_truth", "reg_dice_consistent", "reg_dice_floor", "reg_assd_truth_mm",
                    "reg_assd_consistent_mm")


# --------------------------------------------------------------------------------------------
# Geometry of the ambiguity
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ViewPair:
    """True matrices of the AP and LAT views and the point their central rays meet (mm)."""

    P_ap: np.ndarray
    P_lat: np.ndarray
    centre_mm: np.ndarray

    @classmethod
    def from_matrices(cls, P_ap: np.ndarray, P_lat: np.ndarray) -> ViewPair:
        from inference import geometry

        return cls(P_ap, P_lat, np.asarray(geometry.view_pair_check(P_ap, P_lat).midpoint_mm, float))

    def matrices(self) -> tuple[np.ndarray, np.ndarray]:
        return self.P_ap, self.P_lat

    def recorded(self, perturbed_view: str, angle_deg: float) -> tuple[np.ndarray, np.ndarray]:
        """(P_ap, P_lat) as recorded when ``perturbed_view`` ("ap" / "lat") is ``angle_deg`` off."""
        from inference.angle_sensitivity import rotation_about_z

        transform = rotation_about_z(angle_deg, self.centre_mm)
        if perturbed_view == "lat":
            return self.P_ap, self.P_lat @ transform
        return self.P_ap @ transform, self.P_lat

    def true_points(self, recorded_points_mm: np.ndarray, perturbed_view: str,
                    angle_deg: float) -> tuple[np.ndarray, np.ndarray]:
        """The true points ``X`` (N, 3) whose true projections are the recorded projections of
        ``recorded_points_mm`` (``Y``), and the two true rays' distance there (N,), mm
        (:func:`inference.angle_sensitivity.true_points`)."""
        from inference import angle_sensitivity

        return angle_sensitivity.true_points(self.matrices(), recorded_points_mm, VIEW_INDEX[perturbed_view],
                                             angle_deg, self.centre_mm)

    def recorded_point(self, true_point_mm: np.ndarray, perturbed_view: str, angle_deg: float) -> np.ndarray:
        """Where the recorded matrices triangulate the two true projections of ``true_point_mm`` (3,)
        (:func:`inference.angle_sensitivity.recorded_point`)."""
        from inference import angle_sensitivity

        return angle_sensitivity.recorded_point(self.matrices(), true_point_mm, VIEW_INDEX[perturbed_view],
                                                angle_deg, self.centre_mm)


# --------------------------------------------------------------------------------------------
# The true femur at arbitrary points
# --------------------------------------------------------------------------------------------

class FemurTruth:
    """The phantom femur of a simulated case, inside/outside at any world point
    (:func:`inference.data.simulate.true_femur_inside`, the field ``true_femur_mask`` samples at
    voxel centres); :meth:`check` compares the two on a grid so that a change cannot go unnoticed."""

    def __init__(self, truth_dir: pathlib.Path):
        from inference.data import simulate

        self.truth_dir = truth_dir
        self.model, _, _ = simulate.truth_phantom(truth_dir)  # loaded once per case
        self.hip_centre_mm = np.asarray(json.loads((truth_dir / "truth.json").read_text())["hip_centre_mm"], float)

    def inside(self, points_mm: np.ndarray, grid) -> np.ndarray:
        """(N,) bool: inside the true femur at world points (N, 3), the shape lattice on ``grid``."""
        from inference.data import simulate

        return simulate.true_femur_inside(self.truth_dir, points_mm, grid, model=self.model)

    def check(self, grid, truth_mask: np.ndarray) -> None:
        """Raise DataError unless :meth:`inside` at ``grid``'s voxel centres is ``truth_mask``."""
        from inference.errors import DataError

        mismatched = int((self.inside(voxel_centres(grid), grid).reshape(grid.shape_zyx) != truth_mask).sum())
        if mismatched:
            raise DataError(f"{self.truth_dir}: the femur sampled at points differs from true_femur_mask "
                            f"at {mismatched} voxels (inference.data.phantom changed?)")


def voxel_centres(grid) -> np.ndarray:
    """World positions (N, 3) of a grid's voxel centres, in array (z, y, x) order."""
    nz, ny, nx = grid.shape_zyx
    kk, jj, ii = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    ijk = np.stack([ii.ravel(), jj.ravel(), kk.ravel()], axis=1).astype(np.float64)
    index_to_world = grid.index_to_world()
    return ijk @ index_to_world[:3, :3].T + index_to_world[:3, 3]


def axis_offsets(grid, femur: np.ndarray, centre_mm: np.ndarray) -> dict[str, float]:
    """Mean |x - centre x| and |y - centre y| over a femur's voxels (mm): its distance from the
    rotation axis along the directions that a LAT error (x) and an AP error (y) turn into moves."""
    points = voxel_centres(grid)[femur.ravel()]
    return {"femur_axis_offset_x_mean_mm": float(np.abs(points[:, 0] - centre_mm[0]).mean()),
            "femur_axis_offset_y_mean_mm": float(np.abs(points[:, 1] - centre_mm[1]).mean())}


def scoring_grid(labels_path: pathlib.Path, pair: ViewPair, shapes_hw: list[tuple[int, int]]):
    """Axis-aligned grid of :data:`SCORING_SPACING_XYZ_MM` around the true femur's voxels (phantom CT
    label 1) that project inside both radiographs, :data:`BOX_MARGIN_MM` larger but at the bottom."""
    from inference import geometry, io

    labels, label_grid = io.read_volume(labels_path)
    k, j, i = np.nonzero(labels == 1)
    index_to_world = label_grid.index_to_world()
    points = np.stack([i, j, k], axis=1).astype(np.float64) @ index_to_world[:3, :3].T + index_to_world[:3, 3]
    visible = np.ones(len(points), bool)
    for P, (rows, cols) in zip(pair.matrices(), shapes_hw):
        uv = geometry.project_points(P, points)
        visible &= (uv[:, 0] >= 0) & (uv[:, 0] <= cols - 1) & (uv[:, 1] >= 0) & (uv[:, 1] <= rows - 1)
    low, high = points[visible].min(axis=0) - BOX_MARGIN_MM, points[visible].max(axis=0) + BOX_MARGIN_MM
    low[2] += BOX_MARGIN_MM  # +z is superior: the bottom stays where the films cut the shaft
    spacing = np.asarray(SCORING_SPACING_XYZ_MM)
    shape_xyz = np.ceil((high - low) / spacing).astype(int) + 1
    return geometry.VolumeGeometry(tuple(int(n) for n in shape_xyz[::-1]), tuple(spacing), tuple(low))


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------

def silhouette(femur: np.ndarray, grid, P: np.ndarray, shape_hw: tuple[int, int]) -> np.ndarray:
    """Bool silhouette of a femur mask at the overlays' path-length level (``outline_fit.OUTLINE_MM``)."""
    from inference.mask_proposal import project_label
    from inference.outline_fit import OUTLINE_MM

    return project_label(femur.astype(np.uint8), grid, P, shape_hw, label=1) >= OUTLINE_MM


def assd_mm(a: np.ndarray, b: np.ndarray, grid) -> float:
    from inference import evaluate

    distances = np.concatenate(evaluate.surface_distances(a, b, tuple(grid.spacing_xyz_mm[::-1])))
    return float(distances.mean()) if distances.size else math.nan


def consistent_femur(truth: FemurTruth, grid, pair: ViewPair, perturbed_view: str,
                     angle_deg: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(consistent femur (Z, Y, X) bool, true points X (N, 3), ray gaps (N,) mm, voxel centres Y (N, 3))."""
    recorded_points = voxel_centres(grid)
    true_points, gap_mm = pair.true_points(recorded_points, perturbed_view, angle_deg)
    femur = truth.inside(true_points, grid).reshape(grid.shape_zyx)
    return femur, true_points, gap_mm, recorded_points


def floor_row(truth: FemurTruth, grid, truth_mask: np.ndarray, pair: ViewPair, perturbed_view: str,
              angle_deg: float, shapes_hw: list[tuple[int, int]], masks: list[np.ndarray]) -> dict[str, Any]:
    """The metrics of one case, perturbed view and angle (see the module docstring)."""
    from inference import geometry
    from inference.experiments.simcases import dice
    from inference.silhouettes import mask_agreement

    femur, true_points, gap_mm, recorded_points = consistent_femur(truth, grid, pair, perturbed_view, angle_deg)
    either = (femur | truth_mask).ravel()
    in_femur = femur.ravel()
    displacement_mm = np.linalg.norm(true_points[in_femur] - recorded_points[in_femur], axis=1)
    row: dict[str, Any] = {
        "dice_floor": dice(femur, truth_mask), "assd_floor_mm": assd_mm(femur, truth_mask, grid),
        "ray_gap_mean_mm": float(gap_mm[either].mean()), "ray_gap_max_mm": float(gap_mm[either].max()),
        "displacement_mean_mm": float(displacement_mm.mean()), "displacement_max_mm": float(displacement_mm.max()),
        "consistent_voxels": int(femur.sum()), "true_voxels": int(truth_mask.sum()),
    }
    # the closed form against geometry.triangulate (pixel-space Gauss-Newton), on a sample of femur voxels
    rng = np.random.default_rng(0)
    sample = rng.choice(np.flatnonzero(either), min(TRIANGULATE_CHECK_POINTS, int(either.sum())), replace=False)
    recorded = pair.recorded(perturbed_view, angle_deg)
    uv = [geometry.project_points(P, recorded_points[sample]) for P in recorded]
    triangulated, residual_px = geometry.triangulate(pair.P_ap, uv[0], pair.P_lat, uv[1], return_residuals_px=True)
    row["reprojection_max_px"] = float(np.linalg.norm(residual_px, axis=-1).max())
    row["triangulate_diff_max_mm"] = float(np.linalg.norm(triangulated - true_points[sample], axis=1).max())
    recorded_hip = pair.recorded_point(truth.hip_centre_mm, perturbed_view, angle_deg)
    row["hip_centre_shift_mm"] = float(np.linalg.norm(recorded_hip - truth.hip_centre_mm))
    row["hip_centre_shift_xyz_mm"] = [float(v) for v in recorded_hip - truth.hip_centre_mm]
    for name, P_true, P_recorded, shape_hw, mask in zip(VIEW_NAMES, pair.matrices(), recorded, shapes_hw, masks):
        true_silhouette = silhouette(truth_mask, grid, P_true, shape_hw)
        consistent_silhouette = silhouette(femur, grid, P_recorded, shape_hw)
        row[f"sil_{name}_true"] = mask_agreement(true_silhouette, mask)
        row[f"sil_{name}_consistent"] = mask_agreement(consistent_silhouette, mask)
        row[f"sil_{name}_truth_recorded"] = mask_agreement(silhouette(truth_mask, grid, P_recorded, shape_hw), mask)
        row[f"sil_{name}_pair"] = dice(true_silhouette, consistent_silhouette)
    return row


def register_row(net: Any, run_dir: pathlib.Path, result_dir: pathlib.Path, truth: FemurTruth, pair: ViewPair,
                 angle_deg: float, side: str) -> dict[str, Any]:
    """Register a (LAT-perturbed) case as ``hipatlas register`` does and score its femur against
    the truth and against the consistent femur, on the output's own grid."""
    from inference import io
    from inference.data import simulate
    from inference.experiments.simcases import dice, register_variant

    scored = register_variant(net, run_dir, result_dir, "ensemble-auto", truth_dir=truth.truth_dir, side=side)
    labels, grid = io.read_volume(result_dir / "femur_labels.nii.gz")
    ours = labels == 1
    truth_mask = simulate.true_femur_mask(truth.truth_dir, grid)
    femur, *_ = consistent_femur(truth, grid, pair, "lat", angle_deg)
    row = {"reg_dice_truth": dice(ours, truth_mask), "reg_dice_consistent": dice(ours, femur),
           "reg_dice_floor": dice(femur, truth_mask), "reg_assd_truth_mm": assd_mm(ours, truth_mask, grid),
           "reg_assd_consistent_mm": assd_mm(ours, femur, grid), "reg_time_s": scored["time_s"],
           "reg_eval_dice_surface": scored["dice_surface"], "reg_grid_shape_zyx": list(grid.shape_zyx),
           "reg_mask_agreement": scored.get("mask_agreement_dice")}
    if not math.isclose(row["reg_dice_truth"], scored["dice_surface"], abs_tol=1e-9):
        log.warning("%s: our Dice against the truth %.4f differs from the eval's dice_surface %.4f",
                    run_dir.name, row["reg_dice_truth"], scored["dice_surface"])
    return row


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------

def run_case(index: int, args: argparse.Namespace, work: pathlib.Path, angles_deg: list[float],
             net: Any) -> list[dict[str, Any]]:
    """All rows of case ``index``: one per perturbed view and angle, and with ``net`` the registrations."""
    from inference import io
    from inference.data import simulate
    from inference.experiments.simcases import case_plan, lateral_perturbed_copy, simulate_case

    start = time.perf_counter()
    plan = case_plan(index, args.seed, False, args.sides)
    subject = f"{args.subject}:{plan['side']}"
    case_dir, truth_dir = simulate_case(plan, subject, work, args.ct_spacing)
    case = io.load_case(case_dir)
    pair = ViewPair.from_matrices(*(np.asarray(view.P, float) for view in case.views))
    shapes_hw = [tuple(view.image.shape[:2]) for view in case.views]
    masks = [np.asarray(view.mask, bool) for view in case.views]
    grid = scoring_grid(truth_dir / "labels.nii.gz", pair, shapes_hw)
    truth = FemurTruth(truth_dir)
    truth_mask = simulate.true_femur_mask(truth_dir, grid)
    truth.check(grid, truth_mask)
    base = {"sample_index": index, "seed": plan["seed"], "side": plan["side"], "subject": subject,
            "scoring_grid": {"shape_zyx": list(grid.shape_zyx), "spacing_xyz_mm": list(grid.spacing_xyz_mm),
                             "origin_mm": list(grid.origin_mm)},
            "rotation_centre_mm": [float(v) for v in pair.centre_mm],
            "hip_centre_to_rotation_axis_mm": float(np.linalg.norm((truth.hip_centre_mm - pair.centre_mm)[:2])),
            # to first order a LAT error moves a point along y by angle * (x - centre x), an AP error
            # along x by angle * (y - centre y): how far the femur lies from the axis sets the cost
            **axis_offsets(grid, truth_mask, pair.centre_mm)}
    log.info("case %d (%s): simulated, scoring grid %s, %.0f s", index, plan["side"], grid.shape_zyx,
             time.perf_counter() - start)
    rows = []
    for view in args.views:
        for angle in angles_deg:
            row = {**base, "perturbed_view": view, "angle_deg": angle,
                   **floor_row(truth, grid, truth_mask, pair, view, angle, shapes_hw, masks)}
            log.info("case %d, %s %g deg: Dice floor %.4f, ASSD %.3f mm, ray gap max %.3f mm, hip moves %.2f mm",
                     index, view, angle, row["dice_floor"], row["assd_floor_mm"], row["ray_gap_max_mm"],
                     row["hip_centre_shift_mm"])
            rows.append(row)
    if net is not None:
        for angle in [0.0, *(a for a in angles_deg if a)]:
            run_dir = lateral_perturbed_copy(case_dir, work, index, angle)
            if angle:
                recorded = np.asarray(io.load_case(run_dir).views[1].P, float)
                if not np.allclose(recorded, pair.recorded("lat", angle)[1], rtol=1e-9, atol=1e-9):
                    raise RuntimeError(f"{run_dir}: perturb_lateral recorded another matrix than P_lat @ T")
            row = {**base, "perturbed_view": "lat", "angle_deg": angle, "registered": True,
                   **register_row(net, run_dir, work / f"out_{index:03d}_lat{angle:g}", truth, pair, angle,
                                  plan["side"])}
            log.info("case %d, registered at LAT %g deg: Dice vs truth %.4f, vs consistent %.4f, floor %.4f",
                     index, angle, row["reg_dice_truth"], row["reg_dice_consistent"], row["reg_dice_floor"])
            rows.append(row)
    log.info("case %d done in %.0f s", index, time.perf_counter() - start)
    return rows


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def git_commit() -> str:
    """The checkout's commit (:func:`inference.provenance.git_commit`), with ``+uncommitted changes``
    when tracked code differs from it."""
    from inference.provenance import git_commit as checkout

    state = checkout(REPO)
    if state["commit"] is None:
        return "unknown"
    return state["commit"] + ("+uncommitted changes" if state["dirty"] else "")


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Mean, sd, min, max of every metric per ``<view> <angle> deg`` (and ``registered``)."""
    from inference import evaluate

    groups: dict[str, list] = {}
    for row in rows:
        key = f"{row['perturbed_view']} {row['angle_deg']:g} deg" + (" registered" if row.get("registered") else "")
        groups.setdefault(key, []).append(row)
    summary = {}
    for key, members in groups.items():
        metrics = REGISTER_METRICS if members[0].get("registered") else FLOOR_METRICS
        stats = evaluate.summarise(members, metrics)
        for name in metrics:
            values = [r[name] for r in members if isinstance(r.get(name), float) and math.isfinite(r[name])]
            stats[name]["min"] = min(values) if values else math.nan
            stats[name]["max"] = max(values) if values else math.nan
        summary[key] = stats
    return summary


def _cell(stats: dict[str, Any], digits: int = 3) -> str:
    if not stats["n"]:
        return "nan"
    return f"{stats['mean']:.{digits}f}" + (f" +- {stats['sd']:.{digits}f}" if stats["n"] > 1 else "")


def to_markdown(rows: list[dict[str, Any]], summary: dict[str, dict[str, Any]], command: str, commit: str,
                commit_at_end: str, args: argparse.Namespace, elapsed_s: float) -> str:
    from inference import evaluate

    short = {"dice_floor": "Dice floor", "assd_floor_mm": "ASSD mm", "sil_AP_true": "sil AP true",
             "sil_AP_consistent": "sil AP consistent", "sil_LAT_true": "sil LAT true",
             "sil_LAT_consistent": "sil LAT consistent", "sil_AP_truth_recorded": "sil AP truth, recorded P",
             "sil_LAT_truth_recorded": "sil LAT truth, recorded P", "ray_gap_max_mm": "ray gap max mm",
             "sil_AP_pair": "sil AP true vs consistent", "sil_LAT_pair": "sil LAT true vs consistent",
             "hip_centre_shift_mm": "hip centre moves mm", "displacement_mean_mm": "femur moves mean mm",
             "displacement_max_mm": "femur moves max mm"}
    lines = [f"# The consistent femur: what a recorded view-angle error costs any calibration-trusting method\n",
             f"- command: `{command}`", f"- commit: {commit}"
             + ("" if commit_at_end == commit else f" at the start, {commit_at_end} at the end"),
             f"- {args.cases} cases from index {args.start}, seed {args.seed}, {args.subject}, sides "
             f"{','.join(args.sides)}, phantom CT {args.ct_spacing} mm, orthogonal views",
             f"- scoring grid: axis-aligned {' x '.join(f'{s:g}' for s in SCORING_SPACING_XYZ_MM)} mm around the "
             f"true femur visible in both views, {BOX_MARGIN_MM:g} mm margin except at the bottom",
             f"- wall time {elapsed_s:.0f} s\n", "## Summary: mean +- sd over the cases\n"]
    floor_keys = [k for k in summary if not k.endswith("registered")]
    columns = [m for m in FLOOR_METRICS if m in short]
    lines.append("| perturbed view, angle | " + " | ".join(short[m] for m in columns) + " |")
    lines.append("|---|" + "---|" * len(columns))
    for key in floor_keys:
        lines.append(f"| {key} | " + " | ".join(_cell(summary[key][m]) for m in columns) + " |")
    lines.append("\nDice floor range (min - max over cases): " + "; ".join(
        f"{k}: {summary[k]['dice_floor']['min']:.3f} - {summary[k]['dice_floor']['max']:.3f}" for k in floor_keys))
    lines.append("\nRay gap mean mm: " + "; ".join(f"{k}: {_cell(summary[k]['ray_gap_mean_mm'], 4)}"
                                                     for k in floor_keys))
    lines.append("\nLargest reprojection error of the true points, px: " + "; ".join(
        f"{k}: {summary[k]['reprojection_max_px']['max']:.3f}" for k in floor_keys))
    registered = [k for k in summary if k.endswith("registered")]
    if registered:
        lines += ["\n## `hipatlas register` (ensemble-auto) on the output's own grid\n",
                  "| LAT error | " + " | ".join(REGISTER_METRICS) + " |", "|---|" + "---|" * len(REGISTER_METRICS)]
        lines += [f"| {k} | " + " | ".join(_cell(summary[k][m]) for m in REGISTER_METRICS) + " |" for k in registered]
    per_case_metrics = ("dice_floor", "assd_floor_mm", "sil_AP_consistent", "sil_LAT_consistent", "ray_gap_max_mm",
                        "hip_centre_shift_mm", "displacement_mean_mm", "displacement_max_mm")
    lines += ["\n## Per case\n", "| case | side | view | angle deg | hip centre to axis mm | femur to axis, x / y mm | "
              + " | ".join(per_case_metrics) + " |", "|" + "---|" * (6 + len(per_case_metrics))]
    for row in rows:
        if not row.get("registered"):
            lines.append(f"| {row['sample_index']} | {row['side']} | {row['perturbed_view']} | {row['angle_deg']:g} | "
                         f"{row['hip_centre_to_rotation_axis_mm']:.1f} | {row['femur_axis_offset_x_mean_mm']:.1f} / "
                         f"{row['femur_axis_offset_y_mean_mm']:.1f} | "
                         + " | ".join(evaluate._fmt(row[m]) for m in per_case_metrics) + " |")
    if registered:
        lines += ["\n## Per case, registered\n", "| case | side | LAT angle deg | " + " | ".join(REGISTER_METRICS)
                  + " |", "|" + "---|" * (3 + len(REGISTER_METRICS))]
        lines += [f"| {r['sample_index']} | {r['side']} | {r['angle_deg']:g} | "
                  + " | ".join(evaluate._fmt(r[m]) for m in REGISTER_METRICS) + " |"
                  for r in rows if r.get("registered")]
    return "\n".join(lines) + "\n"


def _numbers(text: str, what: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be comma-separated numbers, not {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=8, help="number of cases (default 8)")
    parser.add_argument("--start", type=int, default=0, help="index of the first case")
    parser.add_argument("--seed", type=int, default=2024, help="base seed, as tools/eval_cases.py (default 2024)")
    parser.add_argument("--angles", type=lambda s: _numbers(s, "--angles"), default=[2.0, 5.0, 10.0],
                        help="comma-separated recorded angle errors, deg (default 2,5,10)")
    parser.add_argument("--views", default="lat,ap",
                        help="perturbed views, comma-separated, of lat, ap (default lat,ap; ap is the contrast)")
    parser.add_argument("--subject", default="JIA_MRI", help="shared bone subject (default JIA_MRI)")
    parser.add_argument("--sides", default="right,left", help="sides, cycled over the cases")
    parser.add_argument("--ct-spacing", type=float, default=1.5, help="phantom CT voxel size, mm (default 1.5)")
    parser.add_argument("--register", action="store_true",
                        help="also register each case at LAT 0 deg and each angle and score the output "
                             "against the truth and the consistent femur on its own grid")
    parser.add_argument("--model", help="model for --register (default: the shipped model held out from --subject)")
    parser.add_argument("--out", required=True, help="folder for the markdown and JSON reports")
    parser.add_argument("--json", default="lat_ambiguity.json", help="JSON report's file name in --out")
    parser.add_argument("--markdown", default="lat_ambiguity.md", help="markdown report's file name in --out")
    parser.add_argument("--work", default=str(REPO / "work" / "lat_ambiguity"),
                        help="folder for the generated cases (default work/lat_ambiguity, git-ignored); replaced")
    parser.add_argument("-v", "--verbose", action="store_true", help="log per case and angle")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO if args.verbose else logging.WARNING)
    if args.cases < 1:
        parser.error(f"--cases must be >= 1, not {args.cases}")
    args.sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if not args.sides or any(s not in ("right", "left") for s in args.sides):
        parser.error(f"--sides must list right and/or left, not {','.join(args.sides)!r}")
    args.views = [v.strip() for v in args.views.split(",") if v.strip()]
    if not args.views or any(v not in ("lat", "ap") for v in args.views):
        parser.error(f"--views must list lat and/or ap, not {','.join(args.views)!r}")
    angles = [0.0, *(a for a in args.angles if a)]  # 0 deg: the identity check, Dice 1 by construction

    from inference import evaluate, io

    command = "tools/lat_ambiguity.py " + " ".join(argv if argv is not None else sys.argv[1:])
    commit = git_commit()  # the code that runs, not what HEAD is when it ends
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = pathlib.Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    net, model_name = None, None
    if args.register:
        from inference import backends
        from inference.data.bones import specimen_of
        from inference.resources import held_out_model_file

        model = pathlib.Path(args.model) if args.model else held_out_model_file(specimen_of(args.subject))
        net, model_name = backends.load_backend(model, "auto"), str(model)
    start = time.perf_counter()
    rows = []
    for index in range(args.start, args.start + args.cases):
        rows += run_case(index, args, work, angles, net)
    elapsed_s = time.perf_counter() - start
    summary = summarise(rows)
    commit_at_end = git_commit()
    if commit_at_end != commit:
        log.warning("the code changed during the run: %s at the start, %s at the end", commit, commit_at_end)
    markdown = to_markdown(rows, summary, command, commit, commit_at_end, args, elapsed_s)
    io.write_json_atomic(out / args.json, evaluate._json_safe({
        "command": command, "commit": commit, "commit_at_end": commit_at_end, "cases": args.cases,
        "start": args.start, "seed": args.seed,
        "subject": args.subject, "sides": args.sides, "ct_spacing_mm": args.ct_spacing, "angles_deg": angles,
        "views": args.views, "scoring_spacing_xyz_mm": SCORING_SPACING_XYZ_MM, "box_margin_mm": BOX_MARGIN_MM,
        "register_model": model_name, "elapsed_s": elapsed_s, "rows": rows, "summary": summary}))
    io.write_text_atomic(out / args.markdown, markdown)
    print(f"wrote {out / args.markdown} and {out / args.json} ({elapsed_s:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
