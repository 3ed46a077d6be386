"""Accuracy of ``hipatlas register`` on held-out simulated cases (issue 5 targets).

Generates N cases of a validation specimen with :func:`inference.data.simulate.simulate_phantom_case`
(default JIA_MRI, left and right alternating; the phantom's pose varies within +-10 deg and its
shape, tissue and radiograph realism with the seed), registers each with the given model exactly
as ``hipatlas register`` does (:func:`inference.pipeline.register_case`), and reports per case and
mean +- sd:

* ``dice``: femur Dice within the atlas field of view (the truth label map resampled by physical
  coordinates onto the output grid, nearest neighbour);
* ``hip_centre_error_mm``: distance between the measured and the true head centre (phantom truth);
* ``head_radius_error_mm``: measured - true head radius (phantom truth);
* ``<measurement>_error_<unit>`` for every scalar measurement of the descriptor table
  :data:`inference.measure.MEASUREMENTS` but the head radius (``femoral_offset_error_mm``,
  ``neck_shaft_angle_error_deg``, ``vertical_offset_error_mm``, ...): measured - truth, where the
  truth is measured by the same method (:func:`inference.measure.measure_femur`) on the true femur
  label within the same field of view, so that only the registration differs; and
  ``<measurement>_covered``: 1 when the error is within two of the stated standard uncertainties;
* ``time_s``: wall time of the registration (model loaded once, first case included);
* with ``--no-masks``: ``proposed_mask_dice`` (mean over the two views) of the proposed masks
  against the true masks, inside the rows the proposal covers (a proposal spans the atlas field of
  view, the true mask the whole visible shaft), and ``proposed_mask_dice_full`` over the image.

``--vary`` adds cheap variety per case: radiograph size (512-1024 px) and pitch (0.25-0.5 mm),
image format and intensity scale (float TIFF scaled by 10^U(-2, 2)), a random scale and sign of
each P (the same camera), and oblique views (each view turned by U(-30, 30) deg).

Steps (issue 13): ``--variants`` registers every case several times, once per step of the
pipeline, so that each step's effect is measured on the same cases:

* ``network``: the network's output on its own grid (as before issue 13);
* ``fullres``: + outputs from the paper-grid atlas warped by the upsampled field;
* ``refine``: + test-time refinement on the radiographs;
* ``selfcal``: + self-calibration of the second view's pose.

``--lat-angle-errors 0,2,5,10`` records the lateral view's matrix rotated by that many degrees
about the patient's long axis through the hip (the radiograph is unchanged): the paper's Fig. 3
experiment. ``--assd`` adds ASSD and HD95 (mm) of the femur against the truth.

Targets (issue 5): mean Dice >= 0.90, hip centre <= 2 mm, head radius <= 1 mm, offset <= 3 mm.

    .venv/bin/python tools/eval_cases.py --model resources/models/<name> --cases 10 --out eval_out
    .venv/bin/python tools/eval_cases.py --untrained --cases 2 --ct-spacing 3 --out /tmp/e  # smoke test

Writes ``OUT/eval_cases.md`` and ``OUT/eval_cases.json`` (and keeps the cases with ``--keep``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import pathlib
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from inference import measure  # noqa: E402
from inference.errors import HipAtlasError  # noqa: E402
from inference.io import write_text_atomic  # noqa: E402

log = logging.getLogger("eval_cases")



def _error_name(m) -> str:
    return f"{m.key[:-len(m.unit) - 1]}_error_{m.unit}"


#: The steps of issue 13, each a set of register_case options.
VARIANTS = {
    "network": {"full_resolution": False, "refine": False},
    "fullres": {"full_resolution": True, "refine": False},
    "refine": {"full_resolution": True, "refine": True, "self_calibrate": False},
    "selfcal": {"full_resolution": True, "refine": True, "self_calibrate": True},
}
#: Measurements compared with the truth measured on the true label (the head radius has its phantom truth).
COMPARED = tuple(m for m in measure.MEASUREMENTS if m.kind == "scalar" and m.key != "head_radius_mm")
ERROR_METRICS = ("head_radius_error_mm", *(_error_name(m) for m in COMPARED))
METRICS = ("dice", "assd_mm", "hd95_mm", "hip_centre_error_mm", *ERROR_METRICS,
           *(f"{m.key[:-len(m.unit) - 1]}_covered" for m in COMPARED),
           "time_s")
PROPOSAL_METRICS = ("proposed_mask_dice", "proposed_mask_dice_full")
TARGETS = {"dice": ">= 0.90 (mean)", "hip_centre_error_mm": "<= 2 mm", "head_radius_error_mm": "<= 1 mm (|error|)",
           "femoral_offset_error_mm": "<= 3 mm (|error|) or covered by the stated uncertainty"}


def _case_plan(index: int, seed: int, vary: bool, sides: list[str],
               view_separation_deg: float | None = None) -> dict[str, Any]:
    """Everything that defines case ``index`` (reproducible from ``seed``)."""
    rng = np.random.default_rng([seed, index])
    plan: dict[str, Any] = {"index": index, "seed": int(seed * 1000 + index), "side": sides[index % len(sides)],
                            "detector": (768, 768, 0.4), "angles_offset_deg": (0.0, 0.0), "image_format": "png",
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


def _simulate(plan: dict[str, Any], subject: str, root: pathlib.Path, ct_spacing_mm: float) -> tuple[pathlib.Path,
                                                                                                     pathlib.Path]:
    from inference import geometry
    from inference.data import simulate
    from inference.data import phantom

    case_dir, truth_dir = root / f"case_{plan['index']:03d}", root / f"truth_{plan['index']:03d}"
    side = plan["side"]
    extent = np.asarray(simulate.PHANTOM_CT_SHAPE_ZYX) * np.asarray(simulate.PHANTOM_CT_SPACING_MM)
    shape = tuple(int(round(e / ct_spacing_mm)) for e in extent)
    grid = geometry.VolumeGeometry.centered(shape, (ct_spacing_mm,) * 3, phantom.POSE_PIVOT_MM)
    rows, cols, pitch = plan["detector"]
    geometry_file = None
    if any(plan["angles_offset_deg"]) or plan["detector"] != (768, 768, 0.4):
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


def _perturb_lateral(case_dir: pathlib.Path, angle_deg: float) -> None:
    """Record the second (lateral) view's P rotated by ``angle_deg`` about the patient's long axis
    through the point where the two central rays meet (the images stay as they were taken)."""
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


def simulate_case(plan: dict[str, Any], subject: str, work: pathlib.Path, ct_spacing_mm: float,
                  shaft_mm: float | None = None) -> tuple[pathlib.Path, pathlib.Path]:
    """The case folder and truth folder of ``plan`` (with only ``shaft_mm`` of shaft showing, if given)."""
    case_dir, truth_dir = _simulate(plan, subject, work, ct_spacing_mm)
    if shaft_mm is not None:
        _crop_shaft(case_dir, truth_dir, shaft_mm)
    return case_dir, truth_dir


@contextlib.contextmanager
def work_folder(out: pathlib.Path, keep: bool, prefix: str) -> Iterator[pathlib.Path]:
    """``OUT/work`` when the work is kept, else a temporary folder removed at the end."""
    work = out / "work" if keep else pathlib.Path(tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    try:
        yield work
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


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


def _without_masks(case_dir: pathlib.Path, dest: pathlib.Path) -> pathlib.Path:
    shutil.copytree(case_dir, dest)
    raw = json.loads((dest / "case.json").read_text())
    for view in raw["views"]:
        mask = view.pop("mask", None)
        if mask:
            (dest / mask).unlink()
    (dest / "case.json").write_text(json.dumps(raw, indent=2))
    return dest


def _dice(a: np.ndarray, b: np.ndarray) -> float:
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


def _metrics(out_dir: pathlib.Path, truth_dir: pathlib.Path, side: str, assd: bool = False) -> dict[str, float]:
    truth = json.loads((truth_dir / "truth.json").read_text())
    ours = json.loads((out_dir / "measurements.json").read_text())
    truth_fov, labels, grid = truth_in_output_fov(out_dir, truth_dir)
    row = {
        "dice": _dice(labels == 1, truth_fov),
        "hip_centre_error_mm": float(np.linalg.norm(np.asarray(ours["hip_centre_mm"])
                                                    - np.asarray(truth["hip_centre_mm"]))),
        "head_radius_error_mm": float(ours["head_radius_mm"] - truth["head_radius_mm"]),
        **{_error_name(m): math.nan for m in COMPARED},
    }
    if assd:
        from inference import evaluate

        spacing = tuple(float(v) for v in grid.spacing_xyz_mm[::-1])
        distances = np.concatenate(evaluate.surface_distances(labels == 1, truth_fov, spacing))
        row["assd_mm"] = float(distances.mean()) if distances.size else math.nan
        row["hd95_mm"] = float(np.percentile(distances, 95)) if distances.size else math.nan
    try:
        truth_measured = measure.measure_femur(truth_fov.astype(np.uint8), grid, side=side)
        for m in COMPARED:
            if ours.get(m.key) is None or truth_measured[m.key] is None:
                continue
            error = float(ours[m.key] - truth_measured[m.key])
            row[_error_name(m)] = error
            row[f"truth_{m.key}"] = float(truth_measured[m.key])
            uncertainty = (ours.get("uncertainty") or {}).get(m.key)
            if uncertainty is not None:
                row[f"{m.key[:-len(m.unit) - 1]}_covered"] = float(abs(error) <= 2.0 * uncertainty)
    except HipAtlasError as error:  # the truth femur cut by a misplaced field of view
        log.warning("cannot measure the true femur in the output's field of view: %s", error)
    return row


def _proposal_dice(out_dir: pathlib.Path, case_dir: pathlib.Path) -> tuple[float, float]:
    from inference import io

    report = json.loads((out_dir / "report.json").read_text())
    case = io.load_case(case_dir)
    inside, full = [], []
    for entry, view in zip(report["views"], case.views):
        proposed = io.load_mask(out_dir / entry["mask"], expected_shape=view.image.shape)
        truth = np.asarray(view.mask, bool)
        full.append(_dice(proposed, truth))
        # the same rows as the proposal (along the image's vertical; the shaft runs off the bottom)
        rows = np.nonzero(proposed.any(axis=1))[0]
        window = np.zeros_like(truth)
        window[rows.min(): rows.max() + 1] = True
        inside.append(_dice(proposed, truth & window))
    return float(np.mean(inside)), float(np.mean(full))


def _load_model(args):
    from inference import registration

    if args.untrained:
        import keras

        from inference import model as model_lib
        from inference.data import atlas as atlas_lib

        keras.utils.set_random_seed(0)
        net = model_lib.build_model(model_lib.preset(args.untrained), atlas_lib.load_atlas(args.untrained))
        return net, f"untrained {args.untrained}"
    net = registration.load_registration_model(args.model)
    return net, str(args.model or "shipped model")


def _provenance(net) -> dict[str, Any]:
    """Commit of the code and sha256 of the model, for the report."""
    import subprocess

    from inference import registration

    repo = pathlib.Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                    capture_output=True, text=True, check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", False
    identity = registration.model_identity(net)
    return {"commit": commit + ("+uncommitted changes" if dirty else ""), "model": identity.get("name"),
            "model_sha256": identity.get("sha256")}


def _summary_table(rows: list[dict[str, Any]], metrics: tuple[str, ...], group_keys: tuple[str, ...]) -> str:
    """One line per group (e.g. angle error x variant): mean +- sd of each metric."""
    from inference import evaluate

    groups: dict[tuple, list] = {}
    for row in rows:
        if "error" not in row:
            groups.setdefault(tuple(row[k] for k in group_keys), []).append(row)
    lines = ["| " + " | ".join(group_keys + metrics) + " |", "|" + "---|" * (len(group_keys) + len(metrics))]
    summary = {}
    for key, members in groups.items():
        stats = evaluate.summarise(members, metrics)
        summary[" / ".join(str(k) for k in key)] = stats
        cells = [f"{stats[m]['mean']:.3f} +- {stats[m]['sd']:.3f}" if stats[m]["n"] > 1 else
                 f"{stats[m]['mean']:.3f}" for m in metrics]
        lines.append("| " + " | ".join([str(k) for k in key] + cells) + " |")
    return "\n".join(lines) + "\n", summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model folder or .keras (default: the shipped model)")
    parser.add_argument("--untrained", nargs="?", const="compact", choices=["compact", "paper"],
                        help="an untrained model of this grid instead (smoke test)")
    parser.add_argument("--out", required=True, help="folder for eval_cases.md / .json")
    parser.add_argument("--name", default="eval_cases", help="report file name (without .md / .json)")
    parser.add_argument("--cases", type=int, default=10, help="number of cases (default 10)")
    parser.add_argument("--start", type=int, default=0, help="index of the first case (to re-run one case)")
    parser.add_argument("--subject", default="JIA_MRI",
                        help="shared bone subject (default JIA_MRI, the validation specimen)")
    parser.add_argument("--sides", default="right,left", help="sides, cycled over the cases")
    parser.add_argument("--seed", type=int, default=2024, help="base seed (case i uses seed*1000+i)")
    parser.add_argument("--vary", action="store_true", help="vary sizes, pitch, format, intensity, P scale, angles")
    parser.add_argument("--no-masks", action="store_true", help="register without masks (proposals) and score them")
    parser.add_argument("--ct-spacing", type=float, default=1.5, help="phantom CT voxel size, mm (3 = quick)")
    parser.add_argument("--variants", default="fullres",
                        help=f"comma-separated steps to compare, of {', '.join(VARIANTS)} (default fullres: "
                             "what register does without refinement)")
    parser.add_argument("--lat-angle-errors", default="0",
                        help="comma-separated errors (deg) of the lateral view's recorded angle, e.g. 0,2,5,10")
    parser.add_argument("--assd", action="store_true", help="also ASSD and HD95 of the femur (mm)")
    parser.add_argument("--view-separation-deg", type=float, default=None, metavar="DEG",
                        help="angle between the two views (90 = orthogonal; e.g. 40 or 140 for pairs far from "
                             "orthogonal); the AP stays at 0 deg")
    parser.add_argument("--shaft-mm", type=float, default=None, metavar="MM",
                        help="cut the radiographs so only MM of shaft below the true lesser trochanter shows "
                             "(short-shaft views)")
    parser.add_argument("--keep", action="store_true", help="keep the cases and outputs under OUT/work")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    if args.cases < 1:
        parser.error(f"--cases must be >= 1, not {args.cases}")
    if args.view_separation_deg is not None and not 10.0 <= args.view_separation_deg <= 170.0:
        parser.error(f"--view-separation-deg must be between 10 and 170, not {args.view_separation_deg:g}")
    if args.view_separation_deg is not None and args.vary:
        parser.error("--view-separation-deg fixes the view angles; it cannot be combined with --vary")
    if args.shaft_mm is not None and not args.shaft_mm > 0:
        parser.error(f"--shaft-mm must be > 0, not {args.shaft_mm:g}")
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if not sides or any(s not in ("right", "left") for s in sides):
        parser.error(f"--sides must list right and/or left, not {args.sides!r}")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants or any(v not in VARIANTS for v in variants):
        parser.error(f"--variants must list some of {', '.join(VARIANTS)}, not {args.variants!r}")
    try:
        angle_errors = [float(a) for a in args.lat_angle_errors.split(",") if a.strip()]
    except ValueError:
        parser.error(f"--lat-angle-errors must be numbers, not {args.lat_angle_errors!r}")

    from inference import evaluate, io, pipeline

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with work_folder(out, args.keep, "eval_cases_") as work:
        net, model_name = _load_model(args)
        provenance = _provenance(net)  # the code that runs, not what HEAD is when it ends
        for index in range(args.start, args.start + args.cases):
            plan = _case_plan(index, args.seed, args.vary, sides, args.view_separation_deg)
            subject = f"{args.subject}:{plan['side']}"
            base: dict[str, Any] = {"subject": subject, "sample_index": index, **{k: plan[k] for k in (
                "seed", "side", "detector", "angles_offset_deg", "image_format", "intensity_scale")}}
            try:
                case_dir, truth_dir = simulate_case(plan, subject, work, args.ct_spacing, args.shaft_mm)
            except HipAtlasError as error:
                log.error("case %d: %s", index, error)
                rows.append({**base, "error": str(error)})
                continue
            for angle_error in angle_errors:
                run_dir = case_dir
                if angle_error:
                    run_dir = work / f"case_{index:03d}_lat{angle_error:g}"
                    shutil.rmtree(run_dir, ignore_errors=True)
                    shutil.copytree(case_dir, run_dir)
                    _perturb_lateral(run_dir, angle_error)
                if args.no_masks:
                    run_dir = _without_masks(run_dir, work / f"nomask_{index:03d}_lat{angle_error:g}")
                for variant in variants:
                    row = {**base, "variant": variant, "lat_angle_error_deg": angle_error}
                    result_dir = work / f"out_{index:03d}_lat{angle_error:g}_{variant}"
                    try:
                        start = time.perf_counter()
                        result = pipeline.run_to_completion(pipeline.register_case(
                            run_dir, result_dir, model=net, overwrite=True, **VARIANTS[variant]))
                        row["time_s"] = time.perf_counter() - start
                        row.update(_metrics(result_dir, truth_dir, plan["side"], assd=args.assd))
                        row["warnings"] = result.warnings
                        refinement = result.report.get("refinement", {})
                        if refinement.get("run"):
                            row["refinement_used"] = refinement["used"]
                            row["refinement_loss"] = [refinement["loss_before"], refinement["loss_after"]]
                            row["refinement_time_s"] = refinement["time_s"]
                            row["self_calibration"] = refinement.get("self_calibration")
                        if args.no_masks:
                            row["proposed_mask_dice"], row["proposed_mask_dice_full"] = _proposal_dice(
                                result_dir, case_dir)
                    except HipAtlasError as error:
                        log.error("case %d (%s, LAT error %g deg): %s", index, variant, angle_error, error)
                        row["error"] = str(error)
                    rows.append(row)
                    log.info("case %d (%d of %d) %s, LAT error %g deg, %s: %s", index, index - args.start + 1,
                             args.cases, subject, angle_error, variant,
                             ", ".join(f"{m} {row[m]:.3g}" for m in METRICS + PROPOSAL_METRICS
                                       if isinstance(row.get(m), float)))

    metrics = tuple(m for m in METRICS if args.assd or m not in ("assd_mm", "hd95_mm")) \
        + (PROPOSAL_METRICS if args.no_masks else ())
    # absolute errors for the summary of signed metrics: the targets are on magnitudes
    for row in rows:
        for key in ERROR_METRICS:
            if isinstance(row.get(key), float):
                row[f"abs_{key}"] = abs(row[key])
    summary_metrics = metrics + tuple(f"abs_{key}" for key in ERROR_METRICS)
    title = f"hipatlas register on {args.cases} simulated {args.subject} cases ({model_name})"
    table, summary = _summary_table(rows, summary_metrics, ("lat_angle_error_deg", "variant"))
    command = "tools/eval_cases.py " + " ".join(argv if argv is not None else sys.argv[1:])
    markdown = (f"# {title}\n\n- command: `{command}`\n- commit: {provenance['commit']}\n"
                f"- model: {provenance['model']} (sha256 {provenance['model_sha256']})\n"
                f"- seed {args.seed}, vary {args.vary}, sides {','.join(sides)}, CT spacing {args.ct_spacing} mm"
                + (f", views {args.view_separation_deg:g} deg apart" if args.view_separation_deg is not None else "")
                + (f", {args.shaft_mm:g} mm of shaft below the lesser trochanter" if args.shaft_mm is not None else "")
                + "\n\n"
                "## Summary: mean +- sd per LAT angle error and step\n\n" + table)
    per_case = [f"| {r['sample_index']} | {r['side']} | {r.get('lat_angle_error_deg')} | {r.get('variant')} | "
                + " | ".join(evaluate._fmt(r.get(m, math.nan)) for m in summary_metrics)
                + f" | {r.get('refinement_used', '')} |" for r in rows if "error" not in r]
    markdown += ("\n## Per case\n\n| case | side | LAT error deg | step | " + " | ".join(summary_metrics)
                 + " | refinement used |\n|" + "---|" * (len(summary_metrics) + 5) + "\n" + "\n".join(per_case) + "\n")
    markdown += "\n## Targets (issue 5)\n\n" + "\n".join(f"- {k}: {v}" for k, v in TARGETS.items()) + "\n"
    failures = [r for r in rows if "error" in r]
    if failures:
        markdown += "\n## Failed cases\n\n" + "\n".join(f"- case {r['sample_index']} ({r.get('variant')}): "
                                                         f"{r['error']}" for r in failures) + "\n"
    io.write_json_atomic(out / f"{args.name}.json", evaluate._json_safe({
        "command": command, **provenance, "model_path": model_name, "subject": args.subject, "cases": args.cases,
        "seed": args.seed, "vary": args.vary, "no_masks": args.no_masks, "ct_spacing_mm": args.ct_spacing,
        "view_separation_deg": args.view_separation_deg, "shaft_mm": args.shaft_mm,
        "variants": variants, "lat_angle_errors_deg": angle_errors, "rows": rows, "summary": summary}))
    write_text_atomic(out / f"{args.name}.md", markdown)
    print(markdown)
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
