"""``hipatlas register``: a case folder in, the reconstructed femur, measurements and overlays out.

:func:`register_case` is a generator: it yields :class:`Progress` between steps, checks its
``cancel`` callable there (raising :class:`~inference.errors.Cancelled`), and returns a
:class:`RegistrationResult` (``StopIteration.value``). :func:`run_to_completion` drives it for
scripts and the CLI; the GUI runs it in a worker thread.

Steps
-----
1. Load and validate the case (:mod:`inference.io`); refuse views under 30 degrees apart and a
   non-empty output folder before any work.
2. A left femur is registered in a mirrored world (``P @ diag(-1, 1, 1, 1)``) so that the network
   always sees a right femur; results are mirrored back at the end.
3. Locate the femoral head by triangulating the two masks (:mod:`inference.localize`) and place the
   atlas grid there (the world origin is wherever the calibration put it). With masks, this runs
   before the model is loaded, so bad masks or calibrations (a femur cut off at the top of an
   image, masks of different femurs) fail in a second with a message naming the file.
   A view without a mask gets a proposed one first (:mod:`inference.mask_proposal`), written to
   ``proposed_mask_<view>.png`` and marked unconfirmed in the report.
4. Crop and resample each view onto the network detector around the grid (:mod:`inference.views`),
   mask it; the model normalises intensities itself.
5. Run the network; warp the atlas intensities, labels and landmarks to the patient.
6. Write the outputs atomically (:func:`inference.io.atomic_output_dir`): label map and warped atlas
   (NIfTI with world geometry), surface (STL), measurements, overlays and a report.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import pathlib
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Iterator

import numpy as np

from inference import __version__, geometry, io, views
from inference.checksums import sha256_file
from inference.errors import Cancelled, DataError, InputFileError, ModelError, OutputError

log = logging.getLogger(__name__)

#: Views closer than this are refused: depth along the viewing direction is then unknowable.
MIN_VIEW_ANGLE_DEG = 30.0
#: Below this Dice between a view's femur mask and the projected reconstruction (inside the
#: projection's bounding box: the mask may run past the atlas field of view) the report warns.
#: The NCC between the raw radiograph and the projected femur is also reported, but it is not a
#: reliable alarm: pelvis and soft tissue dominate it (it was negative on a 2.8 mm-accurate result).
LOW_MASK_AGREEMENT_DICE = 0.8
#: The shaft axis triangulated from the masks replaces the reconstruction's only when the two
#: agree within this angle (a larger difference means a mask or the registration went wrong).
MAX_SHAFT_AXIS_DISAGREEMENT_DEG = 20.0



@dataclass(frozen=True)
class Progress:
    """One step of long work: ``fraction`` in [0, 1] and a message for a progress bar."""

    fraction: float
    message: str


@dataclass
class RegistrationResult:
    out_dir: pathlib.Path
    measurements: dict[str, Any]
    warnings: list[str]
    files: dict[str, pathlib.Path]
    report: dict[str, Any]
    landmarks_mm: dict[str, list[float]] = field(default_factory=dict)


def run_to_completion(generator: Generator[Progress, None, Any],
                      on_progress: Callable[[Progress], None] | None = None) -> Any:
    """Drive a progress generator to its end and return its result."""
    while True:
        try:
            progress = next(generator)
        except StopIteration as stop:
            return stop.value
        if on_progress is not None:
            on_progress(progress)


# --------------------------------------------------------------------------------------------
# Model and atlas
# --------------------------------------------------------------------------------------------

def default_model_path() -> pathlib.Path:
    """The shipped model: ``resources/models/DEFAULT`` names its folder, else the only folder."""
    from inference.resources import models_dir

    models = models_dir()
    pointer = models / "DEFAULT"
    if pointer.is_file():
        folder = models / pointer.read_text().strip()
    else:
        folders = sorted(p for p in models.glob("*") if (p / "model_card.json").is_file())
        if not folders:
            raise ModelError(f"no trained model is installed in {models}; choose a model file "
                             "(--model on the command line, Settings in the window)")
        folder = folders[0]
    return model_file_in(folder)


def model_file_in(path: str | os.PathLike) -> pathlib.Path:
    path = pathlib.Path(path)
    if path.is_dir():
        candidates = sorted(path.glob("*.keras"))
        if len(candidates) != 1:
            raise ModelError(f"{path}: expected one .keras model file, found {len(candidates)}")
        return candidates[0]
    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    return path


_MODEL_CACHE: dict[tuple[str, float], Any] = {}


def load_registration_model(model: Any = None):
    """A loaded Keras model: ``model`` may be a model object, a path, or None (shipped model).

    Loaded models are cached by path and modification time: the GUI registers many cases.
    """
    if model is not None and not isinstance(model, (str, os.PathLike)):
        return model
    from inference import model as model_lib

    path = model_file_in(model) if model is not None else default_model_path()
    key = (str(path.resolve()), path.stat().st_mtime)
    if key not in _MODEL_CACHE:
        card = model_lib.card_path_for(path)
        _MODEL_CACHE.clear()
        _MODEL_CACHE[key] = model_lib.load_model(path, card=card if card.is_file() else None)
    return _MODEL_CACHE[key]


_GRAPH_FUNCTIONS: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()
#: From this many cases on, :func:`register_cohort` runs the network as a traced graph: its first
#: call costs more (measured on the idle 2-core machine, compact model: 3.8 s against 2.2 s for
#: the first eager call), then each forward pass takes 0.11 s instead of 0.43 s eagerly
#: (benchmarks/bench_model.py), so it pays from about 5 cases on.
GRAPH_MODE_MIN_CASES = 8


def network_function(net, graph: bool = False) -> Callable[[dict], Any]:
    """The forward pass of ``net`` (``training=False``): eager, or a traced ``tf.function``.

    Eager is the fastest way through one case (no whole-model tracing); the traced graph is
    ~4x faster per call afterwards (grappler fuses the many small ops), which pays from about
    five cases on. The traced function is cached per model.
    """
    if not graph:
        return lambda inputs: net(inputs, training=False)
    function = _GRAPH_FUNCTIONS.get(net)
    if function is None:
        import tensorflow as tf

        def forward(inputs):
            return net(inputs, training=False)

        function = _GRAPH_FUNCTIONS[net] = tf.function(forward, reduce_retracing=True)
    return function


def model_identity(model) -> dict[str, Any]:
    """Model id and sha256 for the report (from the model card when the model came from a file)."""
    info = getattr(model, "_hipatlas_card", None) or {}
    return {"name": info.get("name", getattr(model, "name", "unknown")),
            "sha256": info.get("sha256"), "path": info.get("path")}


# --------------------------------------------------------------------------------------------
# Geometry helpers
# --------------------------------------------------------------------------------------------

MIRROR_X = np.diag([-1.0, 1.0, 1.0, 1.0])


def placed_grid(atlas_geometry: "geometry.VolumeGeometry", atlas_head_mm: np.ndarray,
                head_world_mm: np.ndarray) -> "geometry.VolumeGeometry":
    """The atlas grid translated so that the atlas's head centre sits on the located head."""
    shift = np.asarray(head_world_mm, float) - np.asarray(atlas_head_mm, float)
    return dataclasses.replace(atlas_geometry, origin_mm=tuple(np.asarray(atlas_geometry.origin_mm) + shift))


def mirrored_volume(array_zyx: np.ndarray, grid: "geometry.VolumeGeometry"):
    """Array and geometry of a volume seen in the world mirrored in x (x -> -x).

    Keeps an identity-like direction: flip the array along x and move the origin, rather than
    storing a direction matrix with a negative determinant that some viewers mishandle.
    """
    direction = np.array(grid.direction)
    if not np.allclose(direction, np.eye(3)):
        raise DataError("mirroring expects an axis-aligned grid")
    nx = grid.shape_zyx[2]
    origin = np.array(grid.origin_mm)
    new_origin = origin.copy()
    new_origin[0] = -(origin[0] + (nx - 1) * grid.spacing_xyz_mm[0])
    return np.ascontiguousarray(array_zyx[:, :, ::-1]), dataclasses.replace(grid, origin_mm=tuple(new_origin))


# --------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------

def _check(cancel: Callable[[], bool] | None) -> None:
    if cancel is not None and cancel():
        raise Cancelled("registration cancelled")


_ATLAS_CACHE: dict[str, Any] = {}


def atlas_for(net) -> Any:
    """The atlas of a registration model's grid (loaded once per process: the GUI registers many cases)."""
    from inference.backends import as_backend
    from inference.data import atlas as atlas_lib

    grid_name = as_backend(net).config.grid
    if grid_name not in _ATLAS_CACHE:
        _ATLAS_CACHE[grid_name] = atlas_lib.load_atlas(grid_name)
    return _ATLAS_CACHE[grid_name]


def registration_frame(case) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """Images, projection matrices and a start point in the registration world of a case.

    The registration world is the case's world, mirrored in x for a left femur (so that the
    network always sees a right femur). Mirroring the world alone would leave the cameras
    mirrored too (P @ diag(-1,1,1,1) has a left-handed pixel frame), and the network's encoders,
    trained on right-handed views, would see mirror images of what they learned; so the images
    are also flipped left-right (:func:`to_registration_image`) with P updated exactly
    (``flip_horizontal``), which gives right-handed cameras looking at a right femur. Every P is
    normalised so that w > 0 in front of its source; the start point is the closest approach of
    the two central rays (mirrored too).
    """
    pair = geometry.view_pair_check(case.views[0].projection, case.views[1].projection)
    world = [geometry.normalise_projection(v.projection, front_point_mm=pair.midpoint_mm) for v in case.views]
    start = np.asarray(pair.midpoint_mm, float)
    images = [np.asarray(v.image.pixels, np.float32) for v in case.views]
    if case.side == "left":
        world = [geometry.flip_horizontal(p @ MIRROR_X, image.shape[1]) for p, image in zip(world, images)]
        images = [to_registration_image(image, True) for image in images]
        start = start * [-1.0, 1.0, 1.0]
    return images, world, start


def to_registration_image(image: np.ndarray, mirror: bool) -> np.ndarray:
    """An image (or mask) of the case in the registration frame and back (its own inverse)."""
    return np.ascontiguousarray(image[:, ::-1]) if mirror else image


def register_case(case_dir: str | os.PathLike, out_dir: str | os.PathLike, *, model: Any = None,
                  overwrite: bool = False, masks: list[np.ndarray | None] | None = None,
                  cancel: Callable[[], bool] | None = None, graph_mode: bool = False,
                  backend: str | None = None, full_resolution: bool = True,
                  refine: Any = None,
                  self_calibrate: bool | None = None) -> Iterator[Progress]:
    """Register the atlas to a case and write the outputs (a generator; see module docstring).

    Parameters
    ----------
    case_dir : path
        Case folder (hipatlas-case/1).
    out_dir : path
        Output folder; must not exist or be empty unless ``overwrite``.
    model : path, keras.Model or None
        The registration model; None uses the shipped model.
    masks : list of two arrays or None
        Masks that replace those of the case (e.g. edited in the GUI), in view order; a None entry
        keeps the case's mask of that view.
    cancel : callable returning True to stop, checked between steps.
    graph_mode : bool
        Run the network as a traced graph (:func:`network_function`): slower for one case,
        faster for each further case with the same model.
    backend : {"auto", "tf", "onnx"} or None
        Who runs the network (:func:`inference.backends.load_backend`; None = the setting).
    full_resolution : bool
        Write the labels, warped atlas, surface and measurements from the paper-grid atlas
        warped by the upsampled field (:mod:`inference.fullres`); False keeps the network's grid.
    refine : bool, RefineSettings or None
        Test-time refinement of the network's result on the radiographs (:mod:`inference.refine`);
        None = its default; settings = on with them.
    self_calibrate : bool or None
        With the refinement, also estimate each view's pose (None: the settings' choice).

    Views without a mask get a proposed one (:mod:`inference.mask_proposal`), written to
    ``OUT_DIR/proposed_mask_<view>.png`` and marked unconfirmed in report.json.

    Raises
    ------
    HipAtlasError
        Bad input (the message names the file and the problem); nothing is written then.
    """
    timings: dict[str, float] = {}
    started = time.perf_counter()
    warnings: list[str] = []

    yield Progress(0.02, "Loading case")
    _refuse_existing_output(out_dir, overwrite)
    case = io.load_case(case_dir)
    case_json = case.case_dir / io.CASE_JSON
    mask_sources = ["case" if v.mask is not None else None for v in case.views]
    if masks is not None:
        case = _with_masks(case, masks)
        mask_sources = ["provided" if m is not None else s for m, s in zip(masks, mask_sources)]
    _check(cancel)

    pair = geometry.view_pair_check(case.views[0].projection, case.views[1].projection)
    if pair.angle_deg < MIN_VIEW_ANGLE_DEG:
        raise DataError(f"{case_json}: the two views are only {pair.angle_deg:.1f} deg "
                        f"apart; at least {MIN_VIEW_ANGLE_DEG:.0f} deg (ideally 90) is needed")
    if pair.angle_deg < 60.0:
        warnings.append(f"views are {pair.angle_deg:.0f} deg apart; accuracy is best near 90 deg")
    images, projections, start_mm = registration_frame(case)
    mirror = case.side == "left"
    world_projections = [geometry.normalise_projection(v.projection, front_point_mm=pair.midpoint_mm)
                         for v in case.views]

    full_masks: list[np.ndarray | None] = [None if v.mask is None else np.asarray(v.mask) > 0 for v in case.views]
    for view, mask, source in zip(case.views, full_masks, mask_sources):
        if mask is not None and not mask.any():
            where = view.mask_path if source == "case" else "the edited mask"
            raise DataError(f"{where}: the femur mask of view '{view.name}' is empty")
    head = None
    if all(m is not None for m in full_masks):
        # Locate the femur before loading the model: bad masks or calibrations fail in a second.
        registration_masks = [to_registration_image(m, mirror) for m in full_masks]
        head = _locate_checked(case, projections, registration_masks, start_mm)

    yield Progress(0.08, "Loading model")
    t0 = time.perf_counter()
    if model is None:
        # The shipped model and atlas must match their recorded checksums (a damaged install
        # would otherwise give plausible but wrong results).
        from inference.resources import verify_resources

        verify_resources()
    from inference import backends
    from inference.model_config import case_inputs

    net = backends.load_backend(model, backend, graph=graph_mode)
    config = net.config
    atlas = atlas_for(net)
    timings["load_model_s"] = time.perf_counter() - t0
    _check(cancel)

    proposal = None
    if head is None:
        yield Progress(0.12, "Proposing femur masks")
        from inference import mask_proposal

        t0 = time.perf_counter()
        proposal = mask_proposal.propose(images, projections, net, atlas, start_mm, cancel=cancel)
        for index, view in enumerate(case.views):
            if full_masks[index] is None:
                full_masks[index] = to_registration_image(proposal.masks[index], mirror)
                mask_sources[index] = "proposed"
                warnings.append(f"view '{view.name}': no femur mask was given; the mask was proposed "
                                "automatically and is not confirmed: check proposed_mask_"
                                f"{io.safe_name(view.name)}.png")
        timings["mask_proposal_s"] = time.perf_counter() - t0
        registration_masks = [to_registration_image(m, mirror) for m in full_masks]
        head = _locate_checked(case, projections, registration_masks, start_mm)
        _check(cancel)

    yield Progress(0.15, "Preparing views")
    for view, mask in zip(case.views, full_masks):
        border = _touches_border(mask)
        if border:
            warnings.append(f"view '{view.name}': the femur mask touches the image border ({border})")
    grid = placed_grid(atlas.geometry, atlas.landmarks["head_centre"], head.centre_mm)

    network = views.network_inputs(images, registration_masks, projections, grid, config.detector_hw)
    for view, net_view in zip(case.views, network.views):
        if net_view.covered_fraction() < 0.6:
            warnings.append(f"view '{view.name}': the femur region extends beyond the radiograph (the femur "
                            "beyond its border is extrapolated)")
    _check(cancel)

    yield Progress(0.3, "Registering atlas")
    t0 = time.perf_counter()
    outputs = net.run(case_inputs(network.images, network.masks, network.projections, grid.index_to_world()))
    labels = outputs["warped_labels"][0, ..., 0].round().astype(np.uint8)
    psi = outputs["psi"][0]
    timings["network_s"] = time.perf_counter() - t0
    if not (labels == 1).any():
        raise DataError(f"{case_json}: the registration produced an empty femur; check the masks and calibration")
    _check(cancel)

    from inference import refine as refine_lib

    refinement = None
    if refine_lib.DEFAULT_REFINE if refine is None else refine:
        yield Progress(0.45, "Refining on the radiographs")
        settings = refine if isinstance(refine, refine_lib.RefineSettings) else refine_lib.RefineSettings()
        if self_calibrate is not None:
            settings = dataclasses.replace(settings, self_calibrate=self_calibrate)
        refinement = yield from _scaled_progress(refine_lib.refine_registration(
            atlas, psi, grid, images, registration_masks, projections, config.detector_hw, head.centre_mm,
            settings, cancel), 0.45, 0.1)
        timings["refine_s"] = refinement.time_s
        if refinement.used:
            psi = refinement.psi
            labels = refine_lib.warped_labels(atlas.labels, psi)
            projections, world_projections = refine_lib.corrected_projections(
                refinement, projections, world_projections, mirror)

    yield Progress(0.55, "Warping atlas")
    t0 = time.perf_counter()
    from inference import fullres

    fine_atlas = fullres.fine_atlas_for(atlas) if full_resolution else None
    if fine_atlas is not None:
        # Outputs from the finer atlas warped by the upsampled field (inference.fullres).
        fine = fullres.warp_fine(fine_atlas, psi, grid, atlas.geometry)
        labels, warped_hu, coarse_grid, grid = fine.labels, fine.volume_hu, grid, fine.grid
    else:
        # Warp HU + 1000 so that the zero padding outside the atlas grid reads as air, not water.
        warped_hu = net.warp_volume(np.asarray(atlas.volume, np.float32) + 1000.0, psi) - 1000.0
        coarse_grid = grid
    output_resolution = {"grid": fine_atlas.grid if fine_atlas is not None else config.grid,
                         "spacing_xyz_mm": [float(s) for s in grid.spacing_xyz_mm]}
    landmarks = {name: invert_displacement_at(np.asarray(point, float), psi, atlas.geometry, coarse_grid)
                 for name, point in atlas.landmarks.items() if np.size(point) == 3}
    timings["warp_s"] = time.perf_counter() - t0
    _check(cancel)

    yield Progress(0.65, "Measuring")
    t0 = time.perf_counter()
    from inference import anatomy, localize, measure, surface

    femur = anatomy.femur_landmarks_from_labels(labels, grid, "right")
    # The hip centre from the head's outlines in the masks: a radiograph's edge of the head is
    # sharper than the reconstructed surface (the network works at 1.3-2 mm voxels). The radius
    # stays the reconstruction's: an outline is the head's widest extent, and masks drawn or
    # rendered from voxel labels run a fraction of a voxel outside the bone (measured on our
    # simulated cases: +0.6 to +0.9 mm), a bias the centre does not see but the radius does.
    sphere = localize.fit_head_sphere_to_masks(projections, registration_masks, femur.head_centre_mm,
                                               femur.head_radius_mm)
    head_source = "reconstruction" if sphere is None else "masks"
    # The shaft axis from the masks: they usually show more shaft than the atlas grid holds, and
    # their edges are sharper than a reconstruction near the grid's border.
    shaft = localize.shaft_axis_from_masks(projections, registration_masks, _below_lesser_trochanter(femur),
                                           -femur.shaft_direction)
    shaft_source = "reconstruction"
    if shaft is not None:
        disagreement_deg = float(np.degrees(np.arccos(np.clip(shaft.direction @ -femur.shaft_direction, -1, 1))))
        if disagreement_deg <= MAX_SHAFT_AXIS_DISAGREEMENT_DEG:
            shaft_source = "masks"
        else:
            warnings.append(f"the shaft axis seen in the masks and the reconstruction's differ by "
                            f"{disagreement_deg:.0f} deg; the reconstruction's is used: check the shaft")
    marks = measure.measurement_landmarks_from_femur(
        femur, _shaft_stretch(shaft) if shaft_source == "masks" else None,
        None if sphere is None else (sphere.centre_mm, femur.head_radius_mm),
        _landmark_uncertainty(femur, sphere, projections, grid))
    out_labels, out_grid = (mirrored_volume(labels, grid) if mirror else (labels, grid))
    out_hu = mirrored_volume(warped_hu, grid)[0] if mirror else warped_hu
    if mirror:
        marks = dataclasses.replace(marks, points_mm={k: v * [-1.0, 1.0, 1.0] for k, v in marks.points_mm.items()})
        landmarks = {k: [-v[0], v[1], v[2]] for k, v in landmarks.items()}
    measurements = measure.measurements_from_measurement_landmarks(dataclasses.replace(marks, side=case.side))
    warnings.extend(measure.caveat_lines(measurements))
    timings["measure_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    mesh = surface.label_surface(out_labels, out_grid, label=1)
    timings["surface_s"] = time.perf_counter() - t0
    _check(cancel)

    yield Progress(0.75, "Writing overlays")
    t0 = time.perf_counter()
    overlays, similarities, agreements = {}, {}, {}
    for view, projection, mask in zip(case.views, world_projections, full_masks):
        rgb, ncc, silhouette = overlay_image(view.image.pixels, projection, out_labels, out_grid,
                                             return_silhouette=True)
        overlays[view.name] = rgb
        similarities[view.name] = ncc
        agreements[view.name] = agreement = mask_agreement(silhouette, mask)
        if agreement is not None and agreement < LOW_MASK_AGREEMENT_DICE:
            warnings.append(f"view '{view.name}': the reconstruction's projection agrees poorly with the "
                            f"femur mask (Dice {agreement:.2f}); check the result carefully")
    timings["overlay_s"] = time.perf_counter() - t0

    yield Progress(0.9, "Writing outputs")
    report = {
        "software": {"name": "hipatlas", "version": __version__},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "case_dir": str(case.case_dir),
        "case_json_sha256": sha256_file(case_json),
        "side": case.side,
        "model": net.identity(),
        "atlas": {"grid": config.grid, "files_sha256": dict(atlas.provenance.get("files", {}))},
        "output_resolution": output_resolution,
        "views": [{
            "name": v.name,
            "image": str(v.image_path.name),
            "image_sha256": v.image.sha256,
            "image_size_px": [int(s) for s in v.image.shape],
            "mask": (f"proposed_mask_{io.safe_name(v.name)}.png" if src == "proposed"
                     else str(v.mask_path.name) if src == "case" and v.mask_path else None),
            "mask_sha256": sha256_file(v.mask_path) if src == "case" and v.mask_path else None,
            "mask_source": src,
            "mask_confirmed": src != "proposed",
            "calibration": (dataclasses.asdict(v.calibration) if dataclasses.is_dataclass(v.calibration)
                            else str(v.calibration)),
            "similarity_ncc": similarities[v.name],
            "mask_agreement_dice": agreements[v.name],
        } for v, src in zip(case.views, mask_sources)],
        "view_angle_deg": float(pair.angle_deg),
        "shaft_axis_source": shaft_source,
        "hip_centre_source": head_source,
        "head_radius_from_masks_mm": None if sphere is None else float(sphere.radius_mm),
        "femoral_head_located_mm": [float(x) for x in (head.centre_mm * [-1, 1, 1] if mirror else head.centre_mm)],
        "timings_s": timings,
        "warnings": warnings,
    }
    report["refinement"] = refine_lib.report_entry(refinement, [v.name for v in case.views], mirror, warnings)
    if proposal is not None:
        pose_head = proposal.pose.head_mm * ([-1.0, 1.0, 1.0] if mirror else 1.0)
        report["mask_proposal"] = {"atlas_head_mm": [float(x) for x in pose_head],
                                   "atlas_scale": float(proposal.pose.scale),
                                   "timings_s": proposal.timings_s}
    with io.atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        files = {
            "femur_labels": io.write_volume(tmp / "femur_labels.nii.gz", out_labels, out_grid, dtype=np.uint8),
            "warped_atlas": io.write_volume(tmp / "warped_atlas.nii.gz", out_hu.astype(np.float32), out_grid,
                                            dtype=np.float32),
            "femur_surface": surface.write_surface_stl(tmp / "femur_surface.stl", mesh),
            "measurements": io.write_json_atomic(tmp / "measurements.json", measurements),
        }
        for name, rgb in overlays.items():
            files[f"overlay_{name}"] = io.write_png_atomic(tmp / f"overlay_{io.safe_name(name)}.png", rgb)
        for view, mask, src in zip(case.views, full_masks, mask_sources):
            if src == "proposed":
                files[f"proposed_mask_{view.name}"] = io.write_png_atomic(
                    tmp / f"proposed_mask_{io.safe_name(view.name)}.png", mask.astype(np.uint8) * 255)
        timings["total_s"] = time.perf_counter() - started
        files["report"] = io.write_json_atomic(tmp / "report.json", report)
    final = pathlib.Path(out_dir)
    files = {k: final / pathlib.Path(v).name for k, v in files.items()}
    yield Progress(1.0, "Done")
    return RegistrationResult(out_dir=final, measurements=measurements, warnings=warnings, files=files,
                              report=report, landmarks_mm={k: list(map(float, v)) for k, v in landmarks.items()})


@dataclass
class CohortResult:
    """What :func:`register_cohort` did: one row per case (``status`` "ok" or "failed")."""

    out_root: pathlib.Path
    rows: list[dict[str, Any]]
    summary_csv: pathlib.Path

    @property
    def failures(self) -> list[dict[str, Any]]:
        return [row for row in self.rows if row["status"] != "ok"]


def _cohort_columns() -> tuple[str, ...]:
    from inference.measure import MEASUREMENTS

    scalars = tuple(m.key for m in MEASUREMENTS if m.kind == "scalar")
    return ("case", "status", "out_dir", "side", "hip_centre_x_mm", "hip_centre_y_mm", "hip_centre_z_mm",
            *scalars, *(f"{k}_uncertainty" for k in scalars), "warnings", "time_s", "error")


#: Columns of ``cohort.csv`` (measurements in world mm / degrees, as measurements.json, from the
#: descriptor table :data:`inference.measure.MEASUREMENTS`, then their standard uncertainties).
COHORT_COLUMNS = _cohort_columns()


def cohort_output_names(case_dirs: list[str | os.PathLike]) -> list[str]:
    """One output folder name per case: the case folder's name (refused if two cases share it)."""
    names = [pathlib.Path(c).resolve().name for c in case_dirs]
    seen: dict[str, str] = {}
    for case, name in zip(case_dirs, names):
        if name in seen:
            raise DataError(f"cases {seen[name]} and {case} have the same folder name '{name}'; "
                            "their outputs would collide")
        seen[name] = str(case)
    return names


def register_cohort(case_dirs: list[str | os.PathLike], out_root: str | os.PathLike, *, model: Any = None,
                    overwrite: bool = False, cancel: Callable[[], bool] | None = None,
                    backend: str | None = None) -> Iterator[Progress]:
    """Register several cases with one loaded model (a generator, like :func:`register_case`).

    Each case goes to ``out_root/<case folder name>``; a case with bad input is recorded as
    failed (its message in ``cohort.csv``) and the others go on. ``out_root/cohort.csv`` holds one
    row per case. Loading TensorFlow and the model, and compiling the network, happen once.
    """
    import csv
    import io as text_io

    case_dirs = list(case_dirs)
    if not case_dirs:
        raise DataError("no case folders were given")
    names = cohort_output_names(case_dirs)
    root = pathlib.Path(out_root)
    yield Progress(0.0, "Loading model")
    if model is None:
        from inference.resources import verify_resources

        verify_resources()
    from inference import backends

    net = backends.load_backend(model, backend, graph=len(case_dirs) >= GRAPH_MODE_MIN_CASES)
    rows = []
    for index, (case, name) in enumerate(zip(case_dirs, names)):
        _check(cancel)
        base, width = index / len(case_dirs), 1.0 / len(case_dirs)
        yield Progress(base, f"Case {index + 1}/{len(case_dirs)}: {name}")
        started = time.perf_counter()
        row = {"case": str(case), "out_dir": str(root / name)}
        try:
            steps = register_case(case, root / name, model=net, overwrite=overwrite, cancel=cancel,
                                  graph_mode=len(case_dirs) >= GRAPH_MODE_MIN_CASES)
            while True:
                try:
                    step = next(steps)
                except StopIteration as stop:
                    result = stop.value
                    break
                yield Progress(base + width * step.fraction, f"{name}: {step.message}")
        except Cancelled:
            raise
        except (DataError, InputFileError, ModelError, OutputError) as error:
            log.warning("case %s failed: %s", case, error)
            row.update(status="failed", error=str(error))
        else:
            m = result.measurements
            centre = m.get("hip_centre_mm") or [None] * 3
            row.update(status="ok", side=m.get("side"), hip_centre_x_mm=centre[0], hip_centre_y_mm=centre[1],
                       hip_centre_z_mm=centre[2], warnings=len(result.warnings))
            uncertainty = m.get("uncertainty") or {}
            for column in COHORT_COLUMNS:
                if column in m and column not in row:
                    row[column] = m[column]
                elif column.endswith("_uncertainty"):
                    row[column] = uncertainty.get(column[:-len("_uncertainty")])
        row["time_s"] = round(time.perf_counter() - started, 3)
        rows.append(row)
    buffer = text_io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COHORT_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in COHORT_COLUMNS})
    summary = io.write_text_atomic(root / "cohort.csv", buffer.getvalue())
    yield Progress(1.0, "Done")
    return CohortResult(root, rows, summary)


def _shaft_stretch(shaft) -> tuple[np.ndarray, np.ndarray]:
    """(proximal, distal) ends of the shaft stretch the masks' axis rests on: its start point and
    the shortest length of shaft the two views showed."""
    point, distal_direction = np.asarray(shaft.point_mm, float), np.asarray(shaft.direction, float)
    return point, point + min(shaft.length_mm) * distal_direction


def _landmark_uncertainty(femur, sphere, projections, grid) -> dict[str, float]:
    """Standard uncertainties (mm) of the measurement landmarks of a registration (docs/measurements.md).

    Head centre from the masks: half a detector pixel at the hip combined with half the distance
    between the masks' and the reconstruction's head centres (their disagreement); from the
    reconstruction: half a voxel. Radius and neck point: half a voxel (RMS spacing); lesser
    trochanter: one voxel; shaft ends: :data:`inference.measure.SHAFT_POINT_SD_MM`.
    """
    from inference import localize

    voxel_mm = float(np.sqrt(np.mean(np.square(grid.spacing_xyz_mm))))
    head_sd = 0.5 * voxel_mm
    if sphere is not None:
        pixel_mm = max(localize.mm_per_pixel(P, np.asarray(sphere.centre_mm, float)) for P in projections)
        disagreement_mm = float(np.linalg.norm(np.asarray(sphere.centre_mm) - np.asarray(femur.head_centre_mm)))
        head_sd = float(np.hypot(0.5 * pixel_mm, 0.5 * disagreement_mm))
    return {"head_centre": head_sd, "head_radius": 0.5 * voxel_mm, "neck_point": 0.5 * voxel_mm,
            "lesser_trochanter": voxel_mm}


def _below_lesser_trochanter(femur, margin_mm: float = 12.0) -> np.ndarray:
    """A point on the reconstruction's shaft axis ``margin_mm`` below the lesser trochanter (or at
    the start of its shaft window, whichever is higher): where the masks' shaft sections begin."""
    direction = np.asarray(femur.shaft_direction, float)  # proximal
    point = np.asarray(femur.shaft_point_mm, float)
    head = np.asarray(femur.head_centre_mm, float)
    foot = point + ((head - point) @ direction) * direction
    depth = float((head - np.asarray(femur.shaft_point_proximal_mm, float)) @ direction)
    if femur.lesser_trochanter_mm is not None:
        depth = min(depth, float((head - np.asarray(femur.lesser_trochanter_mm, float)) @ direction) + margin_mm)
    return foot - depth * direction


def _scaled_progress(steps, start: float, width: float):
    """Forward a sub-step's (fraction, message) as :class:`Progress` in [start, start + width];
    returns the sub-step's result."""
    while True:
        try:
            fraction, message = next(steps)
        except StopIteration as stop:
            return stop.value
        yield Progress(start + width * fraction, message)


def _refuse_existing_output(out_dir: str | os.PathLike, overwrite: bool) -> None:
    """Refuse a non-empty output folder before any work (atomic_output_dir checks again at the end)."""
    final = pathlib.Path(out_dir)
    if final.exists() and not final.is_dir():
        raise OutputError(f"{final}: exists and is not a folder; choose another output folder")
    if final.is_dir() and not overwrite and any(final.iterdir()):
        raise OutputError(f"{final}: the output folder already exists and is not empty; choose a new "
                          "folder or pass --overwrite")


def _mask_name(view) -> pathlib.Path | str:
    return view.mask_path if view.mask_path is not None else f"mask of view '{view.name}'"


def _locate_checked(case, projections, masks, start_mm):
    """Locate the femoral head; refuse masks whose femur is cut off, naming the files."""
    from inference.localize import locate_femoral_head

    case_json = case.case_dir / io.CASE_JSON
    for view, projection, mask in zip(case.views, projections, masks):
        if _head_cut_off(mask, projection, start_mm):
            raise DataError(f"{_mask_name(view)}: the femur runs off the top of radiograph "
                            f"{view.image_path.name} (view '{view.name}'): the femoral head is outside the "
                            "field of view; the hip must be fully visible in both views")
    try:
        head = locate_femoral_head(projections, masks, [v.name for v in case.views])
    except DataError as error:
        raise DataError(f"{case_json}: {error}") from None
    # The head must project inside both radiographs (not beside them, e.g. with the wrong P).
    for view, projection in zip(case.views, projections):
        u, v = geometry.project_points(projection, head.centre_mm[None])[0]
        rows, cols = view.image.shape
        if not (0 <= u <= cols - 1 and 0 <= v <= rows - 1):
            raise DataError(f"{view.image_path}: the femoral head located from the masks projects outside "
                            f"this radiograph (view '{view.name}', pixel {u:.0f}, {v:.0f}); check the "
                            f"projection matrices in {case_json}")
    return head


def _head_cut_off(mask: np.ndarray, projection: np.ndarray, point_mm: np.ndarray) -> bool:
    """True if the mask's most superior part lies on the image border: the head is cut off.

    The femoral head is the femur's top end in both AP and lateral views; a mask whose top
    (along the patient's superior direction as P projects it near ``point_mm``) touches the
    border continues beyond the image, so the head is not (fully) visible. The shaft leaving the
    image at the bottom is normal.
    """
    from inference.localize import _superior_direction

    vv, uu = np.nonzero(mask)
    if vv.size == 0:
        return False
    rows, cols = mask.shape
    up = _superior_direction(projection, np.asarray(point_mm, float))
    height = uu * up[0] + vv * up[1]
    top = height >= height.max() - 2.0  # the topmost 2 pixels of the mask
    on_border = (uu[top] == 0) | (uu[top] == cols - 1) | (vv[top] == 0) | (vv[top] == rows - 1)
    return bool(on_border.any())


def invert_displacement_at(atlas_point_mm: np.ndarray, psi: np.ndarray,
                           atlas_grid: "geometry.VolumeGeometry", grid: "geometry.VolumeGeometry",
                           iterations: int = 30) -> list[float]:
    """The patient point that the warp sends to ``atlas_point_mm`` (world mm of the placed grid).

    The warp pulls back: patient voxel ``x`` takes the atlas value at ``x + psi(x)`` (voxel units,
    (z, y, x) order, shared voxel layout of the two grids). We solve ``x + psi(x) = a`` by the
    fixed-point iteration ``x <- a - psi(x)``, which converges because psi is a diffeomorphism with
    small gradients (|grad psi| < 1).
    """
    from scipy import ndimage

    a_ijk = (atlas_grid.world_to_index() @ np.append(atlas_point_mm, 1.0))[:3]
    a_zyx = a_ijk[::-1]
    x = a_zyx.copy()
    upper = np.array(psi.shape[:3]) - 1
    for _ in range(iterations):
        clamped = np.clip(x, 0, upper)
        u = np.array([ndimage.map_coordinates(psi[..., c], clamped[:, None], order=1, mode="nearest")[0]
                      for c in range(3)])
        x_new = a_zyx - u
        if np.max(np.abs(x_new - x)) < 1e-3:
            x = x_new
            break
        x = x_new
    world = grid.index_to_world() @ np.append(x[::-1], 1.0)
    return [float(v) for v in world[:3]]


def _with_masks(case, masks):
    if len(masks) != len(case.views):
        raise DataError(f"{len(masks)} masks given for {len(case.views)} views")
    new_views = []
    for view, mask in zip(case.views, masks):
        if mask is not None:
            mask = np.asarray(mask)
            if mask.shape != view.image.pixels.shape:
                raise InputFileError(f"mask for view '{view.name}' is {mask.shape[0]}x{mask.shape[1]} "
                                     f"but the image is {view.image.pixels.shape[0]}x{view.image.pixels.shape[1]}")
            view = dataclasses.replace(view, mask=mask)
        new_views.append(view)
    return dataclasses.replace(case, views=new_views)


def _touches_border(mask: np.ndarray) -> str:
    sides = {"top": mask[0].any(), "bottom": mask[-1].any(), "left": mask[:, 0].any(), "right": mask[:, -1].any()}
    return ", ".join(k for k, v in sides.items() if v)


def mask_agreement(silhouette: np.ndarray, mask: np.ndarray | None) -> float | None:
    """Dice between the projected reconstruction and the femur mask, inside the projection's
    bounding box (the mask usually shows more shaft than the atlas field of view holds)."""
    if mask is None or not silhouette.any():
        return None
    vv, uu = np.nonzero(silhouette)
    box = (slice(vv.min(), vv.max() + 1), slice(uu.min(), uu.max() + 1))
    a, b = silhouette[box], np.asarray(mask, bool)[box]
    total = a.sum() + b.sum()
    return float(2.0 * (a & b).sum() / total) if total else None


def overlay_image(pixels: np.ndarray, projection: np.ndarray, labels: np.ndarray,
                  grid: "geometry.VolumeGeometry", max_side: int = 768, return_silhouette: bool = False):
    """The radiograph in grey with the contour of the projected femur in colour.

    The silhouette is the femur label's path length (> 0.5 mm) from
    :func:`inference.mask_proposal.project_label`: voxel centres splatted onto a detector of about
    the voxel size, then upsampled. It is numpy only; ray marching with
    :func:`inference.drr.render_path_length` gave the same outline but cost ~3 s per new image size
    in TensorFlow tracing, most of a command-line run. ``max_side`` is kept for compatibility
    (the render size follows the voxel size). Returns (RGB uint8 array, NCC between the radiograph
    and the projected femur thickness inside the silhouette's bounding box, or None).
    """
    from scipy import ndimage
    from inference.mask_proposal import project_label

    pixels = np.asarray(pixels, np.float32)
    rows, cols = pixels.shape
    thickness_full = project_label(labels, grid, projection, (rows, cols), label=1)
    silhouette = thickness_full > 0.5
    width = max(1, int(round(max(rows, cols) / 600)))
    edge = silhouette & ~ndimage.binary_erosion(silhouette, iterations=width)

    lo, hi = np.percentile(pixels, [0.5, 99.5])
    grey = np.clip((pixels - lo) / max(hi - lo, 1e-6), 0, 1)
    rgb = np.repeat((grey * 255).astype(np.uint8)[..., None], 3, axis=2)
    rgb[edge] = (255, 64, 32)

    ncc = None
    if silhouette.any():
        vv, uu = np.nonzero(silhouette)
        box = (slice(vv.min(), vv.max() + 1), slice(uu.min(), uu.max() + 1))
        a, b = pixels[box].ravel(), thickness_full[box].ravel()
        if a.std() > 0 and b.std() > 0:
            ncc = float(np.corrcoef(a, b)[0, 1])
    return (rgb, ncc, silhouette) if return_silhouette else (rgb, ncc)
