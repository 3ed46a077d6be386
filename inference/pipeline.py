"""``hipatlas register``: a case folder in, the reconstructed femur, measurements and overlays out.

:func:`register_case` is a generator: it yields :class:`Progress` between steps, checks its
``cancel`` callable there (raising :class:`~inference.errors.Cancelled`), and returns a
:class:`RegistrationResult` (``StopIteration.value``). :func:`run_to_completion` drives it for
scripts and the CLI; the GUI runs it in a worker thread.

Steps
-----
1. Load and validate the case (:mod:`inference.io`); refuse views under 30 degrees apart and a
   non-empty output folder before any work.
2. Build the case's :class:`~inference.registration.RegistrationFrame` (the two-view check, the
   normalised cameras): a left femur is registered in a mirrored world with flipped images, so that
   the network always sees a right femur through right-handed cameras; the frame carries every
   result back.
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
   (NIfTI with world geometry), surface (STL), measurements, the outline of the projected femur
   per view (``silhouette_<view>.json``, :mod:`inference.silhouettes`), the overlays drawn from it
   and a report.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import logging
import os
import pathlib
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Iterator

import numpy as np

from inference import __version__, geometry, io, views, workers
from inference import silhouettes as silhouettes_lib
from inference.silhouettes import mask_agreement  # noqa: F401  (also for the GUI and tests)
from inference.checksums import sha256_file
from inference.errors import Cancelled, ConfigError, DataError, HipAtlasError, InputFileError, ModelError, OutputError
from inference.registration import GRAPH_MODE_MIN_CASES, RegistrationFrame, atlas_for, placed_grid

log = logging.getLogger(__name__)

#: Below this Dice between a view's femur mask and the projected reconstruction (inside the
#: projection's bounding box: the mask may run past the atlas field of view) the report warns.
#: The NCC between the raw radiograph and the projected femur is also reported, but it is not a
#: reliable alarm: pelvis and soft tissue dominate it (it was negative on a 2.8 mm-accurate result).
LOW_MASK_AGREEMENT_DICE = 0.8
#: The shaft axis triangulated from the masks replaces the reconstruction's only when the two
#: agree within this angle (a larger difference means a mask or the registration went wrong).
MAX_SHAFT_AXIS_DISAGREEMENT_DEG = 20.0
#: Why the steps that fit the reconstruction to the masks did not run on proposed masks (report.json).
UNCONFIRMED = "needs a confirmed mask in every view"
#: Why the head anchor did not run after a successful outline fit (report.json).
OUTLINE_FIT_ANCHORED = "the outline fit brought the head onto the masks"
#: The shaft fit (inference.shaft_fit) warns past this mean move of the shaft (mm) or change of
#: its width (fraction) in a view: the masks or the calibration may be off.
SHAFT_FIT_WARN_SHIFT_MM = 3.0
SHAFT_FIT_WARN_WIDTH = 0.12
#: Standard uncertainty (mm) of the lesser trochanter's height when the masks' outlines give it:
#: their depth against the true label map's trochanter had an RMS error of 1.5 mm (-1.4 to
#: +2.8 mm) on held-out simulated cases (seeds 11 and 12, 8 cases; docs/measurements.md).
LT_FROM_MASKS_SD_MM = 2.0
#: ... and when only the reconstruction gives it: it keeps about the atlas's trochanter height,
#: RMS error 5.8 mm on the same cases (up to 9.6 mm too high).
LT_FROM_RECONSTRUCTION_SD_MM = 6.0


@dataclass(frozen=True)
class Progress:
    """One step of long work: ``fraction`` in [0, 1] and a message for a progress bar."""

    fraction: float
    message: str


@dataclass(frozen=True)
class OutputArrays:
    """The volumes, surface and overlays a registration wrote, as they were written: a caller
    that shows them (the workstation) need not read and decompress the files again."""

    labels: np.ndarray          # (z, y, x) uint8, femur_labels.nii.gz
    grid: "geometry.VolumeGeometry"
    volume_hu: np.ndarray       # (z, y, x) float32, warped_atlas.nii.gz
    surface: Any                # inference.mesh.Mesh, femur_surface.stl
    overlays: dict[str, np.ndarray]  # view name -> (rows, cols, 3) uint8, overlay_<view>.png


@dataclass
class RegistrationResult:
    out_dir: pathlib.Path
    measurements: dict[str, Any]
    warnings: list[str]
    files: dict[str, pathlib.Path]
    report: dict[str, Any]
    landmarks_mm: dict[str, list[float]] = field(default_factory=dict)
    arrays: OutputArrays | None = None


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
# The pipeline: register_case is a sequence of the named steps below
# --------------------------------------------------------------------------------------------

def _check(cancel: Callable[[], bool] | None) -> None:
    if cancel is not None and cancel():
        raise Cancelled("registration cancelled")


@dataclass
class _Job:
    """One case on its way through :func:`register_case`: what the steps share.

    ``masks`` are the femur masks in the case's pixels (bool, None where a view has none yet);
    ``mask_sources`` says where each came from ("case", "provided", "proposed").
    """

    case: Any
    frame: RegistrationFrame
    masks: list[np.ndarray | None]
    mask_sources: list[str | None]
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    tensorflow_import: Any = None  # the background import thread of a refinement to come
    shaft_fit: bool = True  # fit the shaft's cross-sections to the masks (inference.shaft_fit)
    shaft_fit_entry: dict[str, Any] | None = None  # what the last fit did, for report.json
    head_anchor: bool = True  # move the reconstructed head onto the masks' (inference.head_anchor)
    head_anchor_entry: dict[str, Any] | None = None  # what it did, for report.json
    outline_fit: bool = True  # fit the reconstruction's outlines to the masks (inference.outline_fit)
    outline_fit_entry: dict[str, Any] | None = None  # what it did, for report.json

    @property
    def case_json(self) -> pathlib.Path:
        return self.case.case_dir / io.CASE_JSON

    @property
    def registration_masks(self) -> list[np.ndarray]:
        """The masks in the registration frame."""
        return [self.frame.image_in(m) for m in self.masks]

    @property
    def masks_confirmed(self) -> bool:
        """Whether every view has a mask that is the user's, not a proposed one (what the steps
        that fit the reconstruction to the masks need)."""
        return all(m is not None for m in self.masks) and not any(s == "proposed" for s in self.mask_sources)


@dataclass
class _Warped:
    """The atlas warped to the patient (registration frame): the output volumes and landmarks."""

    labels: np.ndarray
    volume_hu: np.ndarray
    grid: "geometry.VolumeGeometry"
    landmarks_mm: dict[str, list[float]]
    resolution: dict[str, Any]
    femur_soft: np.ndarray | None = None  # the warped soft femur indicator (full resolution only)
    surface: Any = None  # the femur surface of exactly these labels, when a step already made it

    @property
    def soft_femur(self) -> np.ndarray:
        """The soft femur indicator, or the label map's femur (float32) where there is none."""
        return self.femur_soft if self.femur_soft is not None else (self.labels == 1).astype(np.float32)


@dataclass
class _Outputs:
    """The reconstruction in the case's world: label map, warped intensities, their grid, surface."""

    labels: np.ndarray
    volume_hu: np.ndarray
    grid: "geometry.VolumeGeometry"
    mesh: Any


@dataclass
class _Measured:
    """The measurements (case world) and where their hip centre and shaft axis came from."""

    measurements: dict[str, Any]
    hip_centre_source: str
    shaft_axis_source: str
    head_radius_from_masks_mm: float | None
    mesh: Any  # the femur surface in the registration frame (inference.mesh.Mesh)
    lesser_trochanter_source: str = "reconstruction"


@dataclass
class _Overlays:
    """Per view: the outline of the projected reconstruction, the overlay picture and agreements."""

    silhouettes: dict[str, silhouettes_lib.Silhouette]
    pictures: dict[str, np.ndarray]
    similarity_ncc: dict[str, float | None]
    mask_agreement_dice: dict[str, float | None]
    # for the registration's warnings and timings (the overlays may be drawn on another thread)
    warnings: list[str] = field(default_factory=list)
    time_s: float = 0.0


def register_case(case_dir: str | os.PathLike, out_dir: str | os.PathLike, *, model: Any = None,
                  overwrite: bool = False, masks: list[np.ndarray | None] | None = None,
                  cancel: Callable[[], bool] | None = None, graph_mode: bool = False,
                  backend: str | None = None, full_resolution: bool = True,
                  refine: Any = None,
                  self_calibrate: bool | None = None,
                  ensemble: bool | None = None,
                  shaft_fit: bool = True, head_anchor: bool = True,
                  outline_fit: bool = True) -> Iterator[Progress]:
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
    refine : bool, "auto", RefineSettings or None
        Test-time refinement of the network's result on the radiographs (:mod:`inference.refine`);
        None = its default (:func:`inference.refine.default_refine`: auto unless
        ``$HIPATLAS_REFINE`` says otherwise); settings = on with them; ``"auto"`` (or settings with ``auto=True``) =
        only where the network's femur outline disagrees with a mask
        (:data:`inference.refine.AUTO_REFINE_BELOW`), and only where TensorFlow is installed
        (report.json's ``refinement.auto`` says what was decided and why).
    self_calibrate : bool or None
        With the refinement, also estimate each view's pose (None: the settings' choice).
    ensemble : bool or None
        Run the network on the atlas grid placed at a few whole-voxel offsets and average the
        fields (:mod:`inference.ensemble`: four extra network passes); None =
        :func:`inference.ensemble.default_ensemble` (``$HIPATLAS_ENSEMBLE``; unset: on for one
        model, off when several are averaged).
    shaft_fit : bool
        Fit the reconstruction's shaft (each cross-section's centre and width below the lesser
        trochanter) to the masks (:mod:`inference.shaft_fit`); report.json's ``shaft_fit`` says
        what it did.
    outline_fit : bool
        Then fit the reconstruction's outlines in both views to the masks by a smooth move
        (:mod:`inference.outline_fit`); report.json's ``outline_fit`` says what it did.
    head_anchor : bool
        Where the outline fit is off or made no fit: move the reconstruction's femoral head onto
        the head the masks show (:mod:`inference.head_anchor`); report.json's ``head_anchor``
        says what it did, or why not.

    Views without a mask get a proposed one (:mod:`inference.mask_proposal`), written to
    ``OUT_DIR/proposed_mask_<view>.png`` and marked unconfirmed in report.json.

    Raises
    ------
    HipAtlasError
        Bad input (the message names the file and the problem); nothing is written then.
    """
    from inference import ensemble as ensemble_lib
    from inference import refine as refine_lib

    started = time.perf_counter()
    refine = refine_lib.default_refine() if refine is None else refine
    if isinstance(refine, str):
        if refine != "auto":
            raise ConfigError(f"refine must be True, False, 'auto' or settings, not {refine!r}")
        refine = refine_lib.RefineSettings(auto=True)
    auto = isinstance(refine, refine_lib.RefineSettings) and refine.auto
    if refine and not auto:
        refine_lib.require_tensorflow()  # before anything is read or written
    if full_resolution:
        from inference import fullres

        fullres.prefetch_fine_atlas()  # beside the case's loading and the model's
    yield Progress(0.02, "Loading case")
    job = _load_job(case_dir, out_dir, overwrite, masks)
    job.shaft_fit = bool(shaft_fit)
    job.head_anchor = bool(head_anchor)
    job.outline_fit = bool(outline_fit)
    _check(cancel)
    head = _locate_head(job) if all(m is not None for m in job.masks) else None

    yield Progress(0.08, "Loading model")
    net, atlas = _load_network(job, model, backend, graph_mode)
    ensemble = ensemble_lib.default_ensemble(len(getattr(net, "members", [net]))) if ensemble is None else bool(ensemble)
    _check(cancel)
    proposal = None
    if head is None:
        yield Progress(0.12, "Proposing femur masks")
        proposal = _propose_missing_masks(job, net, atlas, cancel)
        head = _locate_head(job)
        _check(cancel)

    yield Progress(0.15, "Preparing views")
    grid, network = _network_views(job, atlas, head, net.config.detector_hw)
    _check(cancel)

    yield Progress(0.3, "Registering atlas")
    psi, labels, ensemble_entry = yield from _run_network(job, net, atlas, network, grid, ensemble, cancel,
                                                          preload_tensorflow=bool(refine and not auto))
    _check(cancel)

    refinement = None
    if refine and not auto:
        yield Progress(0.45, "Refining on the radiographs")
        refinement = yield from _refine(job, atlas, psi, grid, net.config.detector_hw, head, refine,
                                        self_calibrate, cancel)
        psi, labels = _refined(job, atlas, refinement, psi, labels)

    warped, measured, outputs, overlays = yield from _outputs(job, net, atlas, psi, labels, grid,
                                                              full_resolution, cancel, 0.55)
    decision = None
    if auto:
        decision = refine_lib.auto_refine_decision(_network_agreement(job, overlays))
        note = refine_lib.auto_refine_warning(decision)
        if note:
            job.warnings.append(note)
        if decision["run"]:
            yield Progress(0.78, "Refining on the radiographs (the outlines disagree with the masks)")
            refinement = yield from _refine(job, atlas, psi, grid, net.config.detector_hw, head, refine,
                                            self_calibrate, cancel, progress=(0.78, 0.06))
            if refinement.used:
                psi, labels = _refined(job, atlas, refinement, psi, labels)
                warped, measured, outputs, overlays = yield from _outputs(
                    job, net, atlas, psi, labels, grid, full_resolution, cancel, 0.85)

    yield Progress(0.9, "Writing outputs")
    report = _report(job, net, atlas, warped, measured, overlays, head, refinement, proposal)
    report["ensemble"] = ensemble_entry
    report["angle_sensitivity"] = _angle_sensitivity(job, outputs, measured)
    if decision is not None:
        report["refinement"]["auto"] = decision
    files = _write_outputs(job, out_dir, overwrite, outputs, measured, overlays, report, started)
    yield Progress(1.0, "Done")
    return RegistrationResult(out_dir=pathlib.Path(out_dir), measurements=measured.measurements,
                              warnings=job.warnings, files=files, report=report,
                              landmarks_mm=job.frame.points_out(warped.landmarks_mm),
                              arrays=OutputArrays(np.asarray(outputs.labels, np.uint8), outputs.grid,
                                                  np.asarray(outputs.volume_hu, np.float32), outputs.mesh,
                                                  overlays.pictures))


def _load_job(case_dir, out_dir, overwrite: bool, masks: list[np.ndarray | None] | None) -> _Job:
    """Refuse a used output folder, load the case (masks replaced by ``masks`` where given), build
    its registration frame (the two-view check) and refuse empty masks."""
    _refuse_existing_output(out_dir, overwrite)
    case = io.load_case(case_dir)
    mask_sources = ["case" if v.mask is not None else None for v in case.views]
    if masks is not None:
        case = _with_masks(case, masks)
        mask_sources = ["provided" if m is not None else s for m, s in zip(masks, mask_sources)]
    frame = RegistrationFrame.of_case(case)
    job = _Job(case, frame, [None if v.mask is None else np.asarray(v.mask) > 0 for v in case.views], mask_sources)
    frame.check_view_angle(job.case_json, job.warnings)
    for view, mask, source in zip(case.views, job.masks, mask_sources):
        if mask is not None and not mask.any():
            where = view.mask_path if source == "case" else "the edited mask"
            raise DataError(f"{where}: the femur mask of view '{view.name}' is empty")
    return job


def _locate_head(job: _Job):
    """The femoral head triangulated from the two masks (registration frame); with masks given this
    runs before the model is loaded, so bad masks or calibrations fail in a second."""
    return _locate_checked(job.case, job.frame.projections, job.registration_masks, job.frame.start_mm)


def _load_network(job: _Job, model: Any, backend: str | None, graph_mode: bool):
    """The network (a backend) and its atlas."""
    t0 = time.perf_counter()
    if model is None:
        # The shipped model and atlas must match their recorded checksums (a damaged install
        # would otherwise give plausible but wrong results).
        from inference.resources import verify_resources

        verify_resources()
    from inference import backends

    net = backends.load_backend(model, backend, graph=graph_mode)
    atlas = atlas_for(net)
    job.timings["load_model_s"] = time.perf_counter() - t0
    return net, atlas


def _propose_missing_masks(job: _Job, net, atlas, cancel):
    """Masks for the views without one, proposed from the atlas (marked unconfirmed)."""
    from inference import mask_proposal

    t0 = time.perf_counter()
    frame = job.frame
    proposal = mask_proposal.propose(frame.images_in(job.case), frame.projections, net, atlas, frame.start_mm,
                                     cancel=cancel)
    for index, view in enumerate(job.case.views):
        if job.masks[index] is None:
            job.masks[index] = frame.image_out(proposal.masks[index])
            job.mask_sources[index] = "proposed"
            job.warnings.append(f"view '{view.name}': no femur mask was given; the mask was proposed "
                                "automatically and is not confirmed: check proposed_mask_"
                                f"{io.safe_name(view.name)}.png")
    job.timings["mask_proposal_s"] = time.perf_counter() - t0
    return proposal


def _network_views(job: _Job, atlas, head, detector_hw):
    """The atlas grid placed on the head, and each view and mask on the network detector around it."""
    for view, mask in zip(job.case.views, job.masks):
        border = _touches_border(mask)
        if border:
            job.warnings.append(f"view '{view.name}': the femur mask touches the image border ({border})")
    grid = placed_grid(atlas.geometry, atlas.landmarks["head_centre"], head.centre_mm)
    network = _views_on(job, job.frame.images_in(job.case), grid, detector_hw)
    for view, net_view in zip(job.case.views, network.views):
        if net_view.covered_fraction() < 0.6:
            job.warnings.append(f"view '{view.name}': the femur region extends beyond the radiograph (the femur "
                                "beyond its border is extrapolated)")
    return grid, network


def _views_on(job: _Job, images, grid, detector_hw):
    """The case's views and registration masks resampled onto the network detector around ``grid``."""
    return views.network_inputs(images, job.registration_masks, job.frame.projections, grid, detector_hw)


def _forward(net, network, grid) -> dict:
    """One network pass on views prepared for ``grid``."""
    from inference.model_config import case_inputs

    return net.run(case_inputs(network.images, network.masks, network.projections, grid.index_to_world()))


def _run_network(job: _Job, net, atlas, network, grid, ensemble: bool, cancel, preload_tensorflow: bool = False):
    """The network's pull-back field ``psi`` and warped labels (refused when the femur is empty);
    with ``ensemble``, the mean field of the shift ensemble (:mod:`inference.ensemble`), one
    progress step per pass. Returns (psi, labels, report.json's ``ensemble`` entry).

    ``preload_tensorflow`` (a refinement will follow): when the network runs without TensorFlow,
    TensorFlow's import starts in a background thread after the first pass, by when this thread
    has imported all it needs, so that the two never import at the same time
    (:func:`inference.refine.preload_tensorflow`; :func:`_refine` waits for it)."""
    from inference import ensemble as ensemble_lib

    t0 = time.perf_counter()
    outputs = _forward(net, network, grid)
    if preload_tensorflow and "tensorflow" not in sys.modules:
        from inference import refine as refine_lib

        job.tensorflow_import = refine_lib.preload_tensorflow()
    psi = outputs["psi"][0]
    labels = outputs["warped_labels"][0, ..., 0].round().astype(np.uint8)
    entry = ensemble_lib.report_entry(None, ())
    if ensemble:
        shifts = ensemble_lib.DEFAULT_SHIFTS_ZYX
        images = job.frame.images_in(job.case)

        def shifted_pass(shift):
            moved = ensemble_lib.shifted_grid(grid, shift)
            out = _forward(net, _views_on(job, images, moved, net.config.detector_hw), moved)
            return ensemble_lib.field_on_reference(out["psi"][0], shift)

        at_once = max(1, min(int(getattr(net, "concurrent_runs", 1)), os.cpu_count() or 1))
        shifted = yield from _relayed(
            ensemble_lib.run_passes(shifted_pass, shifts, at_once, lambda: _check(cancel)),
            lambda done: Progress(0.3 + 0.15 * (done + 1) / (len(shifts) + 1),
                                  f"Registering atlas (pass {done + 1} of {len(shifts) + 1})"))
        fields = [psi, *shifted]
        combined = ensemble_lib.combine(fields, grid.spacing_xyz_mm[::-1])
        psi = combined.psi
        labels = ensemble_lib.warped_labels(atlas.labels, psi)
        entry = ensemble_lib.report_entry(combined, shifts, labels == 1)
    if hasattr(net, "members"):
        entry["models"] = len(net.members)  # each pass ran every model (inference.backends.EnsembleBackend)
    job.timings["network_s"] = time.perf_counter() - t0
    if not (labels == 1).any():
        raise DataError(f"{job.case_json}: the registration produced an empty femur; check the masks and calibration")
    return psi, labels, entry


def _refined(job: _Job, atlas, refinement, psi, labels):
    """(psi, labels) after the refinement: its field and the atlas labels warped by it, with the
    job's cameras corrected by its pose estimates, when it was used; else those given."""
    from inference import refine as refine_lib

    if not refinement.used:
        return psi, labels
    job.frame = job.frame.with_pose_corrections(refinement.pose_corrections)
    return refinement.psi, refine_lib.warped_labels(atlas.labels, refinement.psi)


def _outputs(job: _Job, net, atlas, psi, labels, grid, full_resolution: bool, cancel, start: float):
    """Warp, measure and project the outlines (progress from ``start``, in steps of at most 0.1)."""
    step = min(0.1, (0.9 - start) / 2)
    yield Progress(start, "Warping atlas")
    warped = _warp_atlas(job, net, atlas, psi, labels, grid, full_resolution)
    _check(cancel)
    if job.shaft_fit:
        warped = _fit_shaft(job, warped)
        _check(cancel)
    if job.outline_fit:
        warped = _fit_outline(job, warped)
        _check(cancel)
    if job.head_anchor and (job.outline_fit_entry or {}).get("used"):
        # the outline fit brought the head's outlines onto the masks too: anchoring it on the masks'
        # sphere as well changed Dice by +0.0005 and cost 0.5 s (session 19, docs/results/outline-fit)
        job.head_anchor_entry = {"used": False, "reason": OUTLINE_FIT_ANCHORED}
    elif job.head_anchor:
        warped = _anchor_head(job, warped)
        _check(cancel)

    yield Progress(start + step, "Measuring and drawing the overlays")
    # The overlays need only the label map: they are drawn while the surface is measured (0.1 s
    # of NumPy beside 0.5 s of mostly Python; inference.workers). Their warnings follow the
    # measurement's, as when the two ran one after the other.
    labels_out, grid_out = job.frame.volume_out(warped.labels, warped.grid)
    measured, overlays = workers.both(lambda: _measure(job, warped),
                                      lambda: _project_outlines(job, labels_out, grid_out))
    job.warnings.extend(overlays.warnings)
    job.timings["overlay_s"] = overlays.time_s
    outputs = _in_case_world(job, warped, measured, labels_out, grid_out)
    _check(cancel)
    return warped, measured, outputs, overlays


def _refine(job: _Job, atlas, psi, grid, detector_hw, head, refine, self_calibrate, cancel,
            progress: tuple[float, float] = (0.45, 0.1)):
    """Test-time refinement on the radiographs (:mod:`inference.refine`), a progress sub-step."""
    from inference import refine as refine_lib

    if job.tensorflow_import is not None:
        job.tensorflow_import.join()  # one importer at a time (see _run_network)
        job.tensorflow_import = None
    settings = refine if isinstance(refine, refine_lib.RefineSettings) else refine_lib.RefineSettings()
    if self_calibrate is not None:
        settings = dataclasses.replace(settings, self_calibrate=self_calibrate)
    refinement = yield from _scaled_progress(refine_lib.refine_registration(
        atlas, psi, grid, job.frame.images_in(job.case), job.registration_masks, list(job.frame.projections),
        detector_hw, head.centre_mm, settings, cancel), *progress)
    job.timings["refine_s"] = refinement.time_s
    return refinement


def _warp_atlas(job: _Job, net, atlas, psi, labels, grid, full_resolution: bool) -> _Warped:
    """The atlas labels, intensities and landmarks warped to the patient (registration frame)."""
    from inference import fullres

    t0 = time.perf_counter()
    fine_atlas = fullres.fine_atlas_for(atlas) if full_resolution else None
    if fine_atlas is not None:
        # Outputs from the finer atlas warped by the upsampled field (inference.fullres).
        fine = fullres.warp_fine(fine_atlas, psi, grid, atlas.geometry)
        labels, warped_hu, out_grid, femur_soft = fine.labels, fine.volume_hu, fine.grid, fine.femur_soft
    else:
        femur_soft = None
        # Warp HU + 1000 so that the zero padding outside the atlas grid reads as air, not water.
        warped_hu = net.warp_volume(np.asarray(atlas.volume, np.float32) + 1000.0, psi) - 1000.0
        out_grid = grid
    resolution = {"grid": fine_atlas.grid if fine_atlas is not None else net.config.grid,
                  "spacing_xyz_mm": [float(s) for s in out_grid.spacing_xyz_mm]}
    landmarks = {name: invert_displacement_at(np.asarray(point, float), psi, atlas.geometry, grid)
                 for name, point in atlas.landmarks.items() if np.size(point) == 3}
    job.timings["warp_s"] = time.perf_counter() - t0
    return _Warped(labels, warped_hu, out_grid, landmarks, resolution, femur_soft)


def _fit_shaft(job: _Job, warped: _Warped) -> _Warped:
    """The warped atlas with its shaft's cross-sections fitted to the masks (:mod:`inference.shaft_fit`)."""
    from inference import shaft_fit

    t0 = time.perf_counter()
    marks = warped.landmarks_mm
    needed = ("shaft_point_distal", "shaft_point_proximal", "lesser_trochanter")
    masks = job.registration_masks
    if not job.masks_confirmed:
        fit, reason = None, UNCONFIRMED
    elif not all(name in marks for name in needed):
        fit, reason = None, "the atlas has no shaft landmarks"
    else:
        distal, proximal = (np.asarray(marks[name], float) for name in needed[:2])
        fit, reason = shaft_fit.fit_shaft(warped.labels, warped.grid, list(job.frame.projections), masks, proximal,
                                          proximal - distal, marks["lesser_trochanter"],
                                          [v.name for v in job.case.views])
    if fit is None:
        job.shaft_fit_entry = {"used": False, "reason": reason}
        job.timings["shaft_fit_s"] = time.perf_counter() - t0
        return warped
    moved = _resampled(warped, lambda soft, hu: shaft_fit.apply_shaft_fit(fit, warped.grid, soft, hu))
    entry = job.shaft_fit_entry = fit.report_entry()
    factors = entry["mean_width_factor"]
    if entry["mean_shift_mm"] > SHAFT_FIT_WARN_SHIFT_MM or any(abs(f - 1) > SHAFT_FIT_WARN_WIDTH
                                                                for f in factors.values()):
        job.warnings.append(
            f"the reconstructed shaft differed from the masks (moved {entry['mean_shift_mm']:.1f} mm, width "
            + ", ".join(f"{name} x{f:.2f}" for name, f in factors.items())
            + ") and was fitted to them: check that the masks follow the femur's outline")
    job.timings["shaft_fit_s"] = time.perf_counter() - t0
    return moved


def _resampled(warped: _Warped, move: Callable[[np.ndarray, np.ndarray], list[np.ndarray]]) -> _Warped:
    """``warped`` after ``move`` (the shaft fit's, the head anchor's or the outline fit's resampling)
    of its soft femur indicator (the label map's femur where there is none) and its HU; the femur
    label is the moved indicator's 0.5 level again, other labels stay."""
    soft, volume_hu = move(warped.soft_femur, warped.volume_hu)
    labels = np.array(warped.labels, copy=True)
    femur = soft >= 0.5
    labels[(labels == 1) & ~femur] = 0
    labels[femur & (labels != 2)] = 1
    return dataclasses.replace(warped, labels=labels, surface=None,
                               volume_hu=volume_hu.astype(warped.volume_hu.dtype, copy=False),
                               femur_soft=soft if warped.femur_soft is not None else None)


def _anchor_head(job: _Job, warped: _Warped) -> _Warped:
    """The warped atlas with its femoral head moved onto the masks' (:mod:`inference.head_anchor`)."""
    from inference import head_anchor, surface

    t0 = time.perf_counter()
    mesh = None
    if not job.masks_confirmed:
        shift, reason = None, UNCONFIRMED
    else:
        mesh = surface.label_surface(warped.labels, warped.grid, label=1, soft=warped.femur_soft)
        try:
            shift, reason = head_anchor.head_shift(mesh, list(job.frame.projections), job.registration_masks)
        except HipAtlasError as error:
            shift, reason = None, str(error)
    job.timings["head_anchor_s"] = time.perf_counter() - t0
    if shift is None:
        job.head_anchor_entry = {"used": False, "reason": reason}
        return warped if mesh is None else dataclasses.replace(warped, surface=mesh)  # _measure's surface
    moved = _resampled(warped, lambda soft, hu: head_anchor.apply_head_shift(shift, warped.grid, soft, hu))
    job.head_anchor_entry = shift.report_entry()
    job.timings["head_anchor_s"] = time.perf_counter() - t0
    return moved


def _fit_outline(job: _Job, warped: _Warped) -> _Warped:
    """The warped atlas with its outlines fitted to the masks (:mod:`inference.outline_fit`)."""
    from inference import outline_fit

    t0 = time.perf_counter()
    if not job.masks_confirmed:
        fit, reason = None, UNCONFIRMED
    else:
        fit, reason = outline_fit.fit_outline(warped.soft_femur, warped.grid, list(job.frame.projections),
                                              job.registration_masks, [v.name for v in job.case.views])
    if fit is None:
        job.outline_fit_entry = {"used": False, "reason": str(reason)}
        if getattr(reason, "check_masks", False):
            job.warnings.append(str(reason))
        job.timings["outline_fit_s"] = time.perf_counter() - t0
        return warped
    moved = _resampled(warped, lambda soft, hu: outline_fit.apply_outline_fit(fit, warped.grid, soft, hu))
    job.outline_fit_entry = fit.report_entry()
    if fit.max_move_mm > outline_fit.WARN_MOVE_MM:
        job.warnings.append(f"the reconstruction's outline differed from the masks by up to {fit.max_move_mm:.1f} mm "
                            "and was fitted to them: check that the masks follow the femur's outline")
    job.timings["outline_fit_s"] = time.perf_counter() - t0
    return moved


def _network_agreement(job: _Job, overlays: _Overlays) -> dict[str, float | None]:
    """Per view, how well the reconstruction's outline agreed with the mask before the outline
    fit drew it onto the mask (what the automatic refinement decides on), else the overlays'."""
    entry = job.outline_fit_entry or {}
    if job.outline_fit and entry.get("used"):
        return dict(entry["mask_agreement_before"])
    return overlays.mask_agreement_dice


def _measure(job: _Job, warped: _Warped) -> _Measured:
    """Landmarks of the warped femur, hip centre and shaft axis from the masks where they agree,
    and the measurements in the case's world (:mod:`inference.measure`)."""
    from inference import anatomy, localize, measure, surface

    t0 = time.perf_counter()
    projections, masks = job.frame.projections, job.registration_masks
    # One surface serves the landmarks and the output (femur_landmarks_from_labels would extract
    # the same one again: 0.2 s); a left femur's is mirrored back with the label map.
    t_surface = time.perf_counter()
    mesh = warped.surface if warped.surface is not None else surface.label_surface(
        warped.labels, warped.grid, label=1, soft=warped.femur_soft)
    job.timings["surface_s"] = time.perf_counter() - t_surface
    femur = anatomy.femur_landmarks(mesh, "right")
    # The hip centre from the head's outlines in the masks: a radiograph's edge of the head is
    # sharper than the reconstructed surface (the network works at 1.3-2 mm voxels). The radius
    # stays the reconstruction's: an outline is the head's widest extent, and masks drawn or
    # rendered from voxel labels run a fraction of a voxel outside the bone (measured on our
    # simulated cases: +0.6 to +0.9 mm), a bias the centre does not see but the radius does.
    sphere = localize.fit_head_sphere_to_masks(projections, masks, femur.head_centre_mm, femur.head_radius_mm)
    # The shaft axis from the masks: they usually show more shaft than the atlas grid holds, and
    # their edges are sharper than a reconstruction near the grid's border.
    shaft = localize.shaft_axis_from_masks(projections, masks, _below_lesser_trochanter(femur),
                                           -femur.shaft_direction)
    shaft_source = "reconstruction"
    if shaft is not None:
        disagreement_deg = float(np.degrees(np.arccos(np.clip(shaft.direction @ -femur.shaft_direction, -1, 1))))
        if disagreement_deg <= MAX_SHAFT_AXIS_DISAGREEMENT_DEG:
            shaft_source = "masks"
        else:
            job.warnings.append(f"the shaft axis seen in the masks and the reconstruction's differ by "
                                f"{disagreement_deg:.0f} deg; the reconstruction's is used: check the shaft")
    marks = measure.measurement_landmarks_from_femur(
        femur, _shaft_stretch(shaft) if shaft_source == "masks" else None,
        None if sphere is None else (sphere.centre_mm, femur.head_radius_mm),
        _landmark_uncertainty(femur, sphere, projections, warped.grid))
    marks, lt_source = _lesser_trochanter_from_masks(marks, projections, masks)
    measurements = measure.measurements_from_measurement_landmarks(job.frame.measurement_landmarks_out(marks))
    job.warnings.extend(measure.caveat_lines(measurements))
    job.timings["measure_s"] = time.perf_counter() - t0 - job.timings["surface_s"]
    return _Measured(measurements, "reconstruction" if sphere is None else "masks", shaft_source,
                     None if sphere is None else float(sphere.radius_mm), mesh, lt_source)


def _in_case_world(job: _Job, warped: _Warped, measured: _Measured, labels: np.ndarray, grid) -> _Outputs:
    """The warped atlas and the femur surface carried out of the registration frame (``labels``
    and ``grid``: the label map's, carried out already)."""
    volume_hu = job.frame.volume_out(warped.volume_hu, warped.grid)[0]
    mesh = measured.mesh.mirrored_x() if job.frame.mirror else measured.mesh
    return _Outputs(labels, volume_hu, grid, mesh)


def _project_outlines(job: _Job, labels: np.ndarray, grid) -> _Overlays:
    """Each view's outline of the reconstruction (``labels`` on ``grid``, case world; and pixels),
    the overlay drawn from it, and how well the projection agrees with the radiograph and the mask."""
    t0 = time.perf_counter()
    from inference.mask_proposal import label_points

    overlays = _Overlays({}, {}, {}, {})
    femur_points = label_points(labels, grid)  # splatted into each view
    for view, projection, mask in zip(job.case.views, job.frame.world_projections, job.masks):
        projected = silhouettes_lib.project_silhouette(labels, grid, projection,
                                                       view.image.pixels.shape, points=femur_points)
        overlays.silhouettes[view.name] = projected.silhouette(view.name)
        overlays.pictures[view.name] = silhouettes_lib.draw_overlay(view.image.pixels, projected.polylines)
        overlays.similarity_ncc[view.name] = silhouettes_lib.similarity_ncc(view.image.pixels, projected)
        overlays.mask_agreement_dice[view.name] = agreement = mask_agreement(projected.mask, mask)
        if agreement is not None and agreement < LOW_MASK_AGREEMENT_DICE:
            overlays.warnings.append(f"view '{view.name}': the reconstruction's projection agrees poorly with "
                                     f"the femur mask (Dice {agreement:.2f}); check the result carefully")
    overlays.time_s = time.perf_counter() - t0
    return overlays


def _report(job: _Job, net, atlas, warped: _Warped, measured: _Measured, overlays: _Overlays, head,
            refinement, proposal) -> dict[str, Any]:
    """report.json: software, model, atlas, inputs with checksums, sources, timings, warnings."""
    from inference import refine as refine_lib

    case, frame = job.case, job.frame
    report = {
        "software": {"name": "hipatlas", "version": __version__},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "case_dir": str(case.case_dir),
        "case_json_sha256": sha256_file(job.case_json),
        "side": case.side,
        "model": net.identity(),
        "atlas": {"grid": net.config.grid, "files_sha256": dict(atlas.provenance.get("files", {}))},
        "output_resolution": warped.resolution,
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
            "similarity_ncc": overlays.similarity_ncc[v.name],
            "mask_agreement_dice": overlays.mask_agreement_dice[v.name],
        } for v, src in zip(case.views, job.mask_sources)],
        "view_angle_deg": frame.view_angle_deg,
        "shaft_axis_source": measured.shaft_axis_source,
        "hip_centre_source": measured.hip_centre_source,
        "lesser_trochanter_source": measured.lesser_trochanter_source,
        "head_radius_from_masks_mm": measured.head_radius_from_masks_mm,
        "femoral_head_located_mm": [float(x) for x in frame.point_out(head.centre_mm)],
        "timings_s": job.timings,
        "warnings": job.warnings,
    }
    report["shaft_fit"] = job.shaft_fit_entry if job.shaft_fit else {"used": False, "reason": "switched off"}
    report["head_anchor"] = job.head_anchor_entry if job.head_anchor else {"used": False, "reason": "switched off"}
    report["outline_fit"] = job.outline_fit_entry if job.outline_fit else {"used": False, "reason": "switched off"}
    report["refinement"] = refine_lib.report_entry(refinement, [v.name for v in case.views], frame, job.warnings)
    if proposal is not None:
        report["mask_proposal"] = {"atlas_head_mm": [float(x) for x in frame.point_out(proposal.pose.head_mm)],
                                   "atlas_scale": float(proposal.pose.scale),
                                   "timings_s": proposal.timings_s}
    return report


def _angle_sensitivity(job: _Job, outputs: _Outputs, measured: _Measured) -> dict[str, Any]:
    """Per view, how far the hip centre and the femur would move (mm per degree) if that view's
    recorded angle about the patient's long axis were off: an error the radiographs cannot show
    (:mod:`inference.angle_sensitivity`). Figures that cannot be computed are None."""
    from inference import angle_sensitivity

    names = [v.name for v in job.case.views]
    hip = measured.measurements.get("hip_centre_mm")
    try:
        with np.errstate(all="ignore"):
            entry = angle_sensitivity.sensitivity(list(job.frame.world_projections), outputs.mesh.vertices, hip,
                                                  names)
    except (HipAtlasError, ValueError, np.linalg.LinAlgError) as error:  # a statement, never a failed registration
        log.warning("no angle sensitivity: %s", error)
        return {"not_computed": str(error)}
    for name in names:
        entry[name] = {k: (v if v is None or np.isfinite(v) else None) for k, v in entry[name].items()}
    return entry


def _write_outputs(job: _Job, out_dir, overwrite: bool, outputs: _Outputs, measured: _Measured,
                   overlays: _Overlays, report: dict[str, Any], started: float) -> dict[str, pathlib.Path]:
    """Every output file (docs/case-format.md), written into a temporary folder moved into place."""
    from inference import surface

    with io.atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        writers = {  # name: a call that writes the file and returns its path
            "femur_labels": lambda: io.write_volume(tmp / "femur_labels.nii.gz", outputs.labels, outputs.grid,
                                                    dtype=np.uint8),
            "warped_atlas": lambda: io.write_volume(tmp / "warped_atlas.nii.gz", outputs.volume_hu.astype(np.float32),
                                                    outputs.grid, dtype=np.float32),
            "femur_surface": lambda: surface.write_surface_stl(tmp / "femur_surface.stl", outputs.mesh),
            "measurements": lambda: io.write_json_atomic(tmp / "measurements.json", measured.measurements),
        }
        for name, rgb in overlays.pictures.items():
            writers[f"overlay_{name}"] = functools.partial(
                io.write_png_atomic, tmp / f"overlay_{io.safe_name(name)}.png", rgb, compress_level=3)
        for name, outline in overlays.silhouettes.items():
            writers[f"silhouette_{name}"] = functools.partial(
                silhouettes_lib.write_silhouette, tmp / silhouettes_lib.file_name(io.safe_name(name)), outline)
        for view, mask, src in zip(job.case.views, job.masks, job.mask_sources):
            if src == "proposed":
                writers[f"proposed_mask_{view.name}"] = functools.partial(
                    io.write_png_atomic, tmp / f"proposed_mask_{io.safe_name(view.name)}.png",
                    mask.astype(np.uint8) * 255)
        # Side by side (inference.workers): compressing the warped atlas, the largest file, runs
        # beside the rest (SimpleITK and zlib release the GIL). Each writes its own file.
        files = dict(zip(writers, workers.thread_map(lambda write: write(), writers.values())))
        job.timings["total_s"] = time.perf_counter() - started
        files["report"] = io.write_json_atomic(tmp / "report.json", report)
    final = pathlib.Path(out_dir)
    return {k: final / pathlib.Path(v).name for k, v in files.items()}

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
                    backend: str | None = None, ensemble: bool | None = None, shaft_fit: bool = True,
                    head_anchor: bool = True, outline_fit: bool = True) -> Iterator[Progress]:
    """Register several cases with one loaded model (a generator, like :func:`register_case`;
    ``ensemble``, ``shaft_fit``, ``head_anchor`` and ``outline_fit`` as there).

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
                                  graph_mode=len(case_dirs) >= GRAPH_MODE_MIN_CASES, ensemble=ensemble,
                                  shaft_fit=shaft_fit, head_anchor=head_anchor, outline_fit=outline_fit)
            result = yield from _relayed(steps, lambda step: Progress(base + width * step.fraction,
                                                                      f"{name}: {step.message}"))
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
    trochanter: :data:`LT_FROM_RECONSTRUCTION_SD_MM` (:data:`LT_FROM_MASKS_SD_MM` once the masks
    give its height, :func:`_lesser_trochanter_from_masks`); shaft ends:
    :data:`inference.measure.SHAFT_POINT_SD_MM`.
    """
    from inference import localize

    voxel_mm = float(np.sqrt(np.mean(np.square(grid.spacing_xyz_mm))))
    head_sd = 0.5 * voxel_mm
    if sphere is not None:
        pixel_mm = max(localize.mm_per_pixel(P, np.asarray(sphere.centre_mm, float)) for P in projections)
        disagreement_mm = float(np.linalg.norm(np.asarray(sphere.centre_mm) - np.asarray(femur.head_centre_mm)))
        head_sd = float(np.hypot(0.5 * pixel_mm, 0.5 * disagreement_mm))
    return {"head_centre": head_sd, "head_radius": 0.5 * voxel_mm, "neck_point": 0.5 * voxel_mm,
            "lesser_trochanter": max(voxel_mm, LT_FROM_RECONSTRUCTION_SD_MM)}


def _lesser_trochanter_from_masks(marks, projections, masks):
    """The measurement landmarks with the lesser trochanter moved along the shaft axis to the depth
    below the head centre that the masks' outlines show (:func:`inference.localize.
    lesser_trochanter_depth_from_masks`), and where its height came from ("masks" or
    "reconstruction" when no outline shows it).

    The reconstruction keeps about the atlas's trochanter height: on held-out simulated cases its
    trochanter lay up to 10 mm too high (vertical offset errors down to -9.9 mm), the outlines'
    within 2.8 mm (docs/measurements.md, docs/results/vertical_offset_study_*.md). Its position
    across the axis (which does not enter the vertical offset) stays the reconstruction's.
    """
    from inference import localize, measure

    axes = measure.FemurAxes.of(marks)
    if axes.lesser_trochanter_mm is None:
        return marks, "reconstruction"
    depth = localize.lesser_trochanter_depth_from_masks(
        projections, masks, axes.head_centre_mm, axes.head_radius_mm, axes.shaft_point_mm, axes.shaft_direction,
        axes.lesser_trochanter_mm)
    if depth is None:
        return marks, "reconstruction"
    lt = axes.lesser_trochanter_mm
    moved = lt + (float((axes.head_centre_mm - lt) @ axes.shaft_direction) - depth) * axes.shaft_direction
    sd = {**marks.sd_mm, "lesser_trochanter": LT_FROM_MASKS_SD_MM}
    return dataclasses.replace(marks.moved("lesser_trochanter", moved), sd_mm=sd), "masks"


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


def _relayed(steps, to_progress: Callable[[Any], Progress]):
    """Yield ``to_progress(item)`` for each item a sub-step's generator yields; return its result."""
    while True:
        try:
            item = next(steps)
        except StopIteration as stop:
            return stop.value
        yield to_progress(item)


def _scaled_progress(steps, start: float, width: float):
    """Forward a sub-step's (fraction, message) as :class:`Progress` in [start, start + width];
    returns the sub-step's result."""
    return (yield from _relayed(steps, lambda step: Progress(start + width * step[0], step[1])))


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
