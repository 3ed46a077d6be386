"""Synthetic data for the workstation tests: a femur with known measurements, a case, and a small
registration function with the contract of :func:`inference.pipeline.register_case`.

The synthetic femur is an analytic shape (head sphere, neck and shaft cylinders); the synthetic
registration writes real output files (NIfTI, STL, overlays, JSON) so the GUI reads them exactly
as it reads the real pipeline's outputs. Radiographs are splats of the femur's voxels through each
view's projection matrix: plain numpy, no TensorFlow.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import time

import numpy as np

from inference import geometry, io

# ---------------------------------------------------------------------------- synthetic femur
@dataclasses.dataclass(frozen=True)
class SyntheticFemur:
    """A right femur made of a head sphere, a neck cylinder and a shaft cylinder (world LPS mm)."""

    head_centre_mm: tuple = (35.0, 0.0, 20.0)
    head_radius_mm: float = 12.0
    neck_shaft_angle_deg: float = 130.0
    neck_radius_mm: float = 8.0
    shaft_radius_mm: float = 10.0
    lesser_trochanter_z_mm: float = -30.0
    spacing_mm: float = 2.0

    @property
    def neck_direction(self) -> np.ndarray:
        # CCD angle between the neck (towards the head) and the shaft pointing distally (-z).
        inner = math.radians(180.0 - self.neck_shaft_angle_deg)
        return np.array([math.sin(inner), 0.0, math.cos(inner)])

    @property
    def femoral_offset_mm(self) -> float:
        return float(np.hypot(self.head_centre_mm[0], self.head_centre_mm[1]))

    @property
    def neck_base_mm(self) -> np.ndarray:
        head = np.asarray(self.head_centre_mm)
        return head - self.femoral_offset_mm / self.neck_direction[0] * self.neck_direction

    def grid(self) -> geometry.VolumeGeometry:
        s = self.spacing_mm
        return geometry.VolumeGeometry(shape_zyx=(52, 24, 42), spacing_xyz_mm=(s, s, s), origin_mm=(-22.0, -23.0, -70.0))

    def labels(self) -> np.ndarray:
        grid = self.grid()
        k, j, i = np.meshgrid(*[np.arange(n) for n in grid.shape_zyx], indexing="ij")
        ijk1 = np.stack([i, j, k, np.ones_like(i)], axis=-1).reshape(-1, 4).astype(np.float64)
        xyz = (grid.index_to_world() @ ijk1.T).T[:, :3]
        head = np.asarray(self.head_centre_mm)
        inside = np.linalg.norm(xyz - head, axis=1) <= self.head_radius_mm
        base, direction = self.neck_base_mm, self.neck_direction
        t = (xyz - base) @ direction
        radial = np.linalg.norm(xyz - base - t[:, None] * direction, axis=1)
        inside |= (t >= 0) & (t <= np.linalg.norm(head - base)) & (radial <= self.neck_radius_mm)
        inside |= (np.hypot(xyz[:, 0], xyz[:, 1]) <= self.shaft_radius_mm) & (xyz[:, 2] <= base[2] + 4) & (xyz[:, 2] >= -66)
        return inside.reshape(grid.shape_zyx).astype(np.uint8)

    def landmarks(self) -> dict[str, list[float]]:
        head = np.asarray(self.head_centre_mm)
        return {
            "head_centre": head.tolist(),
            "neck_point": (head - 25.0 * self.neck_direction).tolist(),
            "shaft_point_proximal": [0.0, 0.0, -10.0],
            "shaft_point_distal": [0.0, 0.0, -60.0],
            "lesser_trochanter": [8.0, 5.0, self.lesser_trochanter_z_mm],
            "greater_trochanter": [-8.0, 0.0, 6.0],
        }

    def measurements(self) -> dict:
        head = list(map(float, self.head_centre_mm))
        return {
            "side": "right",
            "hip_centre_mm": head,
            "head_radius_mm": self.head_radius_mm,
            "femoral_offset_mm": self.femoral_offset_mm,
            "neck_shaft_angle_deg": self.neck_shaft_angle_deg,
            "vertical_offset_mm": head[2] - self.lesser_trochanter_z_mm,
            "shaft_axis": {"point_mm": [0.0, 0.0, -30.0], "direction": [0.0, 0.0, 1.0]},
            "neck_axis": {"point_mm": head, "direction": self.neck_direction.tolist()},
        }


FEMUR = SyntheticFemur()
DETECTOR = (96, 112)  # rows, cols


def view_projections() -> list[np.ndarray]:
    """AP and lateral C-arm views centred on the synthetic femur (90 degrees apart)."""
    return [geometry.projection_matrix(geometry.CArmView(
        sdd_mm=1000.0, sid_mm=600.0, lao_deg=lao, cranial_deg=0.0, rows=DETECTOR[0], cols=DETECTOR[1],
        pixel_mm=2.5, isocentre_mm=(10.0, 0.0, -20.0))) for lao in (0.0, 90.0)]


def splat(labels: np.ndarray, grid: geometry.VolumeGeometry, P: np.ndarray, shape) -> np.ndarray:
    """Thickness-like image: count of femur voxels projecting into each pixel (a stand-in DRR)."""
    k, j, i = np.nonzero(labels)
    ijk1 = np.stack([i, j, k, np.ones_like(i)], axis=0).astype(np.float64)
    xyz = (grid.index_to_world() @ ijk1)[:3].T
    uv = geometry.project_points(P, xyz)
    u = np.round(uv[:, 0]).astype(int)
    v = np.round(uv[:, 1]).astype(int)
    keep = (u >= 0) & (u < shape[1]) & (v >= 0) & (v < shape[0])
    image = np.zeros(shape, dtype=np.float64)
    np.add.at(image, (v[keep], u[keep]), 1.0)
    from scipy import ndimage

    return ndimage.gaussian_filter(image, 1.0)


def write_synthetic_case(folder, *, with_masks: bool = True, side: str = "right") -> str:
    labels, grid = FEMUR.labels(), FEMUR.grid()
    rng = np.random.default_rng(7)
    views = []
    for name, P in zip(("AP", "LAT"), view_projections()):
        thickness = splat(labels, grid, P, DETECTOR)
        image = 200.0 + 60.0 * thickness + rng.normal(0.0, 2.0, DETECTOR)
        views.append({"name": name, "image": image, "P": P,
                      "mask": (thickness > 0.3) if with_masks else None})
    io.write_case(folder, side, views)
    return str(folder)


def synthetic_register(case_dir, out_dir, *, model=None, overwrite=False, masks=None, cancel=None,
                       steps: int = 4, step_seconds: float = 0.0):
    """A small registration with the contract of ``inference.pipeline.register_case``.

    Yields Progress, honours ``cancel`` between steps (raising Cancelled), writes the standard
    outputs atomically and returns a RegistrationResult whose measurements are the synthetic
    femur's known values.
    """
    from inference import pipeline, silhouettes, surface
    from inference.errors import Cancelled

    def check():
        if cancel is not None and cancel():
            raise Cancelled("registration cancelled")

    yield pipeline.Progress(0.05, "Loading case")
    case = io.load_case(case_dir)
    if masks is not None:
        assert len(masks) == len(case.views)
    labels, grid = FEMUR.labels(), FEMUR.grid()
    for step in range(steps):
        check()
        if step_seconds:
            time.sleep(step_seconds)
        yield pipeline.Progress(0.1 + 0.6 * (step + 1) / steps, f"Registering atlas ({step + 1}/{steps})")
    check()
    mesh = surface.label_surface(labels, grid, label=1)
    volume = np.where(labels > 0, 900.0, -100.0).astype(np.float32)
    yield pipeline.Progress(0.8, "Writing outputs")
    check()
    files = {}
    with io.atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        files["femur_labels"] = io.write_volume(tmp / "femur_labels.nii.gz", labels, grid, dtype=np.uint8)
        files["warped_atlas"] = io.write_volume(tmp / "warped_atlas.nii.gz", volume, grid, dtype=np.float32)
        files["femur_surface"] = surface.write_surface_stl(tmp / "femur_surface.stl", mesh)
        files["measurements"] = io.write_json_atomic(tmp / "measurements.json", FEMUR.measurements())
        for view in case.views:
            # the outline as the pipeline writes it: polylines, and the overlay drawn from them
            outline = silhouettes.Silhouette(view.name, tuple(view.image.shape), silhouettes.outline_polylines(
                splat(labels, grid, view.P, view.image.shape), 0.3))
            files[f"silhouette_{view.name}"] = silhouettes.write_silhouette(
                tmp / silhouettes.file_name(view.name), outline)
            files[f"overlay_{view.name}"] = io.write_png_atomic(
                tmp / f"overlay_{view.name}.png", silhouettes.draw_overlay(view.image.pixels, outline.polylines))
        report = {"software": {"name": "hipatlas"},
                  "model": {"name": "synthetic-test-model", "sha256": "0" * 64, "path": None if model is None else str(model)},
                  "views": [{"name": v.name, "similarity_ncc": 0.9} for v in case.views]}
        files["report"] = io.write_json_atomic(tmp / "report.json", report)
    yield pipeline.Progress(1.0, "Done")
    final = pathlib.Path(out_dir)
    return pipeline.RegistrationResult(
        out_dir=final, measurements=FEMUR.measurements(), warnings=["synthetic registration (test)"],
        files={k: final / v.name for k, v in files.items()}, report=report, landmarks_mm=FEMUR.landmarks())



def synthetic_masks(case) -> list[np.ndarray]:
    """The true femur silhouettes of a synthetic case's views."""
    labels, grid = FEMUR.labels(), FEMUR.grid()
    return [splat(labels, grid, view.P, view.image.shape) > 0.3 for view in case.views]


def synthetic_propose(case_dir, *, model=None, cancel=None, steps: int = 3, step_seconds: float = 0.1):
    """A mask proposer with the contract of ``app.session.propose_case_masks``: the true masks."""
    from inference import pipeline
    from inference.errors import Cancelled

    case = io.load_case(case_dir)
    for step in range(steps):
        if cancel is not None and cancel():
            raise Cancelled("mask proposal cancelled")
        time.sleep(step_seconds)
        yield pipeline.Progress((step + 1) / (steps + 1), "Proposing femur masks from the atlas")
    return synthetic_masks(case)


def failing_register(case_dir, out_dir, **kwargs):
    """Runs one step, then fails as the pipeline does for a bad case (a two-line message)."""
    from inference.errors import DataError

    yield from synthetic_register(case_dir, out_dir, steps=1, **{**kwargs, "cancel": None})
    raise DataError("the registration produced an empty femur; check the masks and calibration\n"
                    "(internal detail that stays in the log)")


def crashing_register(case_dir, out_dir, **kwargs):
    """Dies like a process hit by a segmentation fault in native code, after one progress step."""
    import os
    import signal

    from inference import pipeline

    yield pipeline.Progress(0.1, "Loading case")
    os.kill(os.getpid(), signal.SIGSEGV)
    yield pipeline.Progress(0.2, "never reached")


def busy_register(case_dir, out_dir, **kwargs):
    """The synthetic registration with real CPU work (marching cubes) between its steps."""
    from inference import surface

    cancel = kwargs.get("cancel") or (lambda: False)
    result = yield from synthetic_register(case_dir, out_dir, steps=12, step_seconds=0.05, **kwargs)
    for _ in range(6):
        surface.label_surface(FEMUR.labels(), FEMUR.grid())
        if cancel():
            break
    return result


#: Processes the GUI's drawing waits on (the private Xvfb of the ``x_display`` fixture): their
#: threads' waits for a CPU are contention, not blocking, in :class:`Heartbeat`.
DISPLAY_SERVER_PIDS: list[int] = []


def _schedstat(path: str) -> tuple[float, float]:
    """``(time on a CPU, time runnable but waiting for one)`` of one thread, seconds (Linux
    ``/proc/.../task/<tid>/schedstat``, fields 1 and 2); ``(0, 0)`` where it cannot be read."""
    try:
        with open(path) as handle:
            fields = handle.read().split()
        return int(fields[0]) * 1e-9, int(fields[1]) * 1e-9
    except (OSError, IndexError, ValueError):
        return 0.0, 0.0


class Heartbeat:
    """A 10 ms QTimer on the GUI thread that records when it fired, and what the scheduler did.

    :meth:`longest_block` is the longest stretch between two consecutive ticks that the GUI
    thread spent *running* (a slot) or *asleep while this process worked*: a worker thread that
    holds the GIL, Mesa's llvmpipe threads drawing for it, the X server (:data:`DISPLAY_SERVER_PIDS`)
    drawing for it. Per stretch: ``run + min(sleep - contention, others' run)``, where
    ``contention`` is the time those other threads (and the GUI thread itself) were runnable but
    waiting for a CPU: the test machines are shared and oversubscribed, which nothing in this
    process causes or can prevent. So contention never hides time the GUI thread itself ran, a
    worker that holds the GIL while it runs counts in full (the negative control,
    ``test_heartbeat_counts_a_worker_that_holds_the_gil``), and a sleep while nothing of this
    process ran (another process's disk or memory traffic) does not count. From Linux
    ``schedstat``; where it cannot be read every gap counts in full (plain wall-clock gaps).
    """

    def __init__(self, interval_ms: int = 10):
        import threading

        from PySide6.QtCore import QTimer

        self._tid = threading.get_native_id()  # this = the GUI thread
        self.ticks: list[tuple] = []
        self.timer = QTimer()
        self.timer.setInterval(interval_ms)
        self.timer.timeout.connect(lambda: self.ticks.append(self.now()))

    def now(self) -> tuple[float, float, float, float, dict[str, tuple[float, float]]]:
        """``(wall time, GUI thread's run time, its run-queue wait, the process's CPU time (all
        its threads, those that have ended included), {other thread: (run time, run-queue
        wait)})`` in seconds; the other threads are this process's and the X server's. Callable
        from any thread."""
        import glob

        wall = time.perf_counter()
        mine = f"/proc/self/task/{self._tid}/schedstat"
        run, waited = _schedstat(mine)
        paths = glob.glob("/proc/self/task/*/schedstat")
        for pid in DISPLAY_SERVER_PIDS:
            paths += glob.glob(f"/proc/{pid}/task/*/schedstat")
        others = {path: _schedstat(path) for path in paths if path != mine} if os.path.exists(mine) else {}
        return wall, run, waited, time.process_time(), others

    def start(self) -> None:
        # Garbage the test's own set-up left (windows built on this thread, between two ticks of
        # app.workers.GuiThreadGarbageCollector: up to 0.16 s of collection seen in a GUI-suite
        # run) is collected now, not charged to the work measured.
        import gc

        gc.collect()
        self.timer.start()

    def stop(self) -> None:
        self.timer.stop()

    def longest_block(self, start: tuple, end: tuple) -> tuple[float, float, int]:
        """``(longest block, longest wall-clock gap, ticks)`` between two :meth:`now` marks, seconds."""
        points = [start] + [t for t in self.ticks if start[0] < t[0] < end[0]] + [end]
        blocks, gaps = [], []
        for (wall0, run0, wait0, cpu0, others0), (wall1, run1, wait1, cpu1, others1) in zip(points, points[1:]):
            run, gap = run1 - run0, wall1 - wall0
            sleep = gap - run - (wait1 - wait0)
            if not others1:  # schedstat unreadable: the wall-clock gap
                blocks.append(gap)
            else:
                before = {path: others0.get(path, (0.0, 0.0)) for path in others1}
                server = [path for path in others1 if not path.startswith("/proc/self/")]
                # this process's other threads (ended ones too: the process CPU time) and the X server
                others_run = max(0.0, (cpu1 - cpu0) - run) + sum(others1[p][0] - before[p][0] for p in server)
                contention = sum(max(0.0, w - before[path][1]) for path, (_, w) in others1.items())
                blocks.append(run + min(max(0.0, sleep - contention), others_run))
            gaps.append(gap)
        return max(blocks), max(gaps), len(points) - 2


def confirm_all(window) -> None:
    for index in range(len(window.session.views)):
        window.set_mask_confirmed(index, True)


def register(qtbot, window, timeout_ms: int = 60_000) -> str:
    """Start the registration and wait for its end; returns the outcome."""
    with qtbot.waitSignal(window.registration_finished, timeout=timeout_ms) as blocker:
        assert window.start_registration()
    return blocker.args[0]


def write_dicom(path, pixels: np.ndarray, *, primary_deg: float, patient_name: str = "Doe^Jane",
                patient_id: str = "PID-12345") -> pathlib.Path:
    """A DX radiograph with the geometry tags that define its camera (and patient identifiers)."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19600101"
    data = np.clip(pixels, 0, 65535).astype(np.uint16)
    ds.Rows, ds.Columns = data.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.ImagerPixelSpacing = [2.5, 2.5]
    ds.DistanceSourceToDetector = 1000.0
    ds.DistanceSourceToPatient = 600.0
    ds.PositionerPrimaryAngle = primary_deg
    ds.PositionerSecondaryAngle = 0.0
    ds.PixelData = data.tobytes()
    pydicom.dcmwrite(str(path), ds, enforce_file_format=True)
    return pathlib.Path(path)


_UNTRAINED = {}


def untrained_compact_register(case_dir, out_dir, **kwargs):
    """The real pipeline with an untrained compact network (built once per process, here: in the
    registration child process, so TensorFlow never loads into the test's GUI process)."""
    from inference import pipeline

    if "net" not in _UNTRAINED:
        from inference import model as model_lib
        from inference.data import atlas as atlas_lib

        config = model_lib.preset("compact")
        _UNTRAINED["net"] = model_lib.build_model(config, atlas_lib.load_atlas(config.grid))
    return (yield from pipeline.register_case(case_dir, out_dir, **{**kwargs, "model": _UNTRAINED["net"]}))


def untrained_compact_propose(case_dir, *, model=None, cancel=None):
    """``app.session.propose_case_masks`` with an untrained compact network (see above)."""
    from app.session import propose_case_masks

    if "net" not in _UNTRAINED:
        from inference import model as model_lib
        from inference.data import atlas as atlas_lib

        config = model_lib.preset("compact")
        _UNTRAINED["net"] = model_lib.build_model(config, atlas_lib.load_atlas(config.grid))
    return (yield from propose_case_masks(case_dir, model=_UNTRAINED["net"], cancel=cancel))


#: Where the warped atlas's own lesser trochanter lands in :func:`pipeline_like_register`: 2.4 mm
#: from the one the measurements were computed from, as in a real registration (the warped atlas
#: landmark and the tip found on the reconstructed label map differ).
ATLAS_LESSER_TROCHANTER_MM = [8.0, 5.0, FEMUR.lesser_trochanter_z_mm + 2.4]


def pipeline_like_register(case_dir, out_dir, **kwargs):
    """:func:`synthetic_register` whose measurements.json is written as the pipeline writes it
    (:mod:`inference.measure`, with its landmarks and uncertainties) while the result's
    ``landmarks_mm`` are the warped atlas's, whose lesser trochanter differs from the measured one."""
    from inference import measure

    result = yield from synthetic_register(case_dir, out_dir, **kwargs)
    marks = FEMUR.landmarks()
    measured = measure.measurements_from_measurement_landmarks(measure.MeasurementLandmarks(
        "right", {k: v for k, v in marks.items() if k in measure.LANDMARK_NAMES}, FEMUR.head_radius_mm))
    io.write_json_atomic(pathlib.Path(out_dir) / "measurements.json", measured)
    atlas = dict(marks, lesser_trochanter=list(ATLAS_LESSER_TROCHANTER_MM))
    return dataclasses.replace(result, measurements=measured, landmarks_mm=atlas)


# ---------------------------------------------------------------------------- a registration with a "model"
_LOADED_MODELS: list[int] = []  # in the registration process: one entry per model load


def model_loading_register(case_dir, out_dir, *, model=None, overwrite=False, masks=None, cancel=None,
                           load_seconds: float = 2.0):
    """:func:`synthetic_register` after "loading a model" (``load_seconds``) once per process, the
    way :func:`inference.registration.load_registration_model` caches the real one. The result's report
    says which process ran it and how often that process loaded the model."""
    import os

    from inference.pipeline import Progress

    if not _LOADED_MODELS:
        yield Progress(0.01, "Loading model")
        time.sleep(load_seconds)
        _LOADED_MODELS.append(os.getpid())
    result = yield from synthetic_register(case_dir, out_dir, model=model, overwrite=overwrite, masks=masks,
                                           cancel=cancel)
    result.report["process"] = {"pid": os.getpid(), "model_loads": len(_LOADED_MODELS)}
    return result
