"""``hipatlas --self-test``: is this installation intact and does it reconstruct a femur?

The self-test is what an installer, an IT department or a support call runs after installing:

1. :func:`inference.resources.verify_resources` (model, atlas and demo case against their
   checksums);
2. a headless registration of the shipped demo case into a temporary folder through
   :func:`inference.pipeline.register_case`, the same code path as ``hipatlas register``;
3. checks of the result: every output file is there, the femur label is not empty, the head
   radius and neck-shaft angle are anatomically plausible, and the hip centre lies within
   :data:`HIP_CENTRE_TOLERANCE_MM` of the demo case's ground truth (or, where the demo ships none,
   of the head located by triangulating the two masks).

It prints one summary line and exits 0 (passed) or 1 (failed). It works the same in a
development checkout and in an installed bundle.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np

from inference import __version__
from inference.errors import Cancelled, HipAtlasError

log = logging.getLogger(__name__)

#: Plausible ranges for an adult femur: wide enough for any patient, narrow enough to catch a
#: registration that collapsed or exploded.
HEAD_RADIUS_RANGE_MM = (15.0, 35.0)
NECK_SHAFT_ANGLE_RANGE_DEG = (100.0, 160.0)
#: The demo reconstruction's hip centre must lie this close to the reference position.
HIP_CENTRE_TOLERANCE_MM = 30.0
#: Files of the demo case folder that may hold its ground truth, in order of preference.
TRUTH_FILES = ("truth.json", "ground_truth.json", "truth/truth.json", "truth/measurements.json",
               "measurements_truth.json")
#: Outputs every registration writes (case-format.md), besides one overlay and one outline per view.
EXPECTED_OUTPUTS = ("femur_labels.nii.gz", "warped_atlas.nii.gz", "femur_surface.stl",
                    "measurements.json", "report.json")

EXIT_PASSED = 0
EXIT_FAILED = 1


@dataclass(frozen=True)
class Check:
    """One check of the self-test: a short name, whether it passed, and what was seen."""

    name: str
    passed: bool
    detail: str


@dataclass
class SelfTestResult:
    checks: list[Check] = field(default_factory=list)
    elapsed_s: float = 0.0
    measurements: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    def summary(self) -> str:
        """One line for a terminal or a log file."""
        if self.passed:
            details = "; ".join(c.detail for c in self.checks)
            return f"hipatlas {__version__} self-test PASSED in {self.elapsed_s:.1f} s: {details}"
        failed = "; ".join(f"{c.name}: {c.detail}" for c in self.checks if not c.passed)
        return f"hipatlas {__version__} self-test FAILED after {self.elapsed_s:.1f} s: {failed}"


# --------------------------------------------------------------------------------------------
# Ground truth of the demo case
# --------------------------------------------------------------------------------------------

def _point(value: Any) -> np.ndarray | None:
    try:
        point = np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        return None
    return point if point.shape == (3,) and np.all(np.isfinite(point)) else None


def hip_centre_in(obj: Any) -> np.ndarray | None:
    """The hip centre in a truth JSON object: ``hip_centre_mm``, ``head_centre_mm`` or
    ``landmarks_mm.head_centre``, at the top level or under ``measurements`` / ``truth``."""
    if not isinstance(obj, dict):
        return None
    for key in ("hip_centre_mm", "head_centre_mm"):
        if key in obj and _point(obj[key]) is not None:
            return _point(obj[key])
    landmarks = obj.get("landmarks_mm")
    if isinstance(landmarks, dict) and _point(landmarks.get("head_centre")) is not None:
        return _point(landmarks["head_centre"])
    for key in ("measurements", "truth", "ground_truth"):
        found = hip_centre_in(obj.get(key))
        if found is not None:
            return found
    return None


def demo_truth_hip_centre(case_dir: str | pathlib.Path) -> tuple[np.ndarray | None, str]:
    """The demo case's true hip centre (world mm) and where it came from; (None, "") if unknown.

    Looks in :data:`TRUTH_FILES`, then in a ``truth`` entry of case.json (unknown keys are allowed
    by the case format).
    """
    case_dir = pathlib.Path(case_dir)
    for name in (*TRUTH_FILES, "case.json"):
        path = case_dir / name
        if not path.is_file():
            continue
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            log.warning("cannot read %s for the demo's ground truth", path)
            continue
        if name == "case.json":
            obj = obj.get("truth") if isinstance(obj, dict) else None
        centre = hip_centre_in(obj)
        if centre is not None:
            return centre, name
    return None, ""


# --------------------------------------------------------------------------------------------
# Checks of a registration result
# --------------------------------------------------------------------------------------------

def _in_range(name: str, value: Any, bounds: tuple[float, float], unit: str) -> Check:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return Check(name, False, f"missing or not a number ({value!r})")
    low, high = bounds
    ok = bool(np.isfinite(number) and low <= number <= high)
    text = f"{name} {number:.1f} {unit}"
    return Check(name, ok, text if ok else f"{text} outside the plausible {low:g}-{high:g} {unit}")


def check_outputs(out_dir: str | pathlib.Path, measurements: dict[str, Any], *,
                  view_names: Iterable[str] = (), reference_mm: np.ndarray | None = None,
                  reference_name: str = "reference") -> list[Check]:
    """Check a registration's output folder and measurements (see module docstring).

    Parameters
    ----------
    out_dir : path
        Output folder of :func:`inference.pipeline.register_case`.
    measurements : dict
        Its measurements (as in measurements.json).
    view_names : names of the case's views (one ``overlay_<view>.png`` and one
        ``silhouette_<view>.json`` each; names are made safe the same way as the pipeline does, so
        only the count is checked)
    reference_mm : (3,) array or None
        Where the hip centre should be (world mm); None skips that check.
    """
    out_dir = pathlib.Path(out_dir)
    checks = []
    missing = [n for n in EXPECTED_OUTPUTS if not (out_dir / n).is_file() or (out_dir / n).stat().st_size == 0]
    overlays = sorted(out_dir.glob("overlay_*.png"))
    outlines = sorted(out_dir.glob("silhouette_*.json"))
    n_views = len(list(view_names))
    if n_views and len(overlays) < n_views:
        missing.append(f"{n_views - len(overlays)} overlay_<view>.png")
    if n_views and len(outlines) < n_views:
        missing.append(f"{n_views - len(outlines)} silhouette_<view>.json")
    checks.append(Check("outputs", not missing,
                        f"{len(EXPECTED_OUTPUTS) + len(overlays) + len(outlines)} outputs written" if not missing
                        else "missing or empty: " + ", ".join(missing)))

    labels_path = out_dir / "femur_labels.nii.gz"
    if labels_path.is_file():
        from inference import io

        try:
            labels, grid = io.read_volume(labels_path)
        except HipAtlasError as error:
            checks.append(Check("femur label", False, f"cannot read {labels_path.name}: {error}"))
        else:
            voxels = int(np.count_nonzero(np.asarray(labels) == 1))
            volume_ml = voxels * float(np.prod(grid.spacing_xyz_mm)) / 1000.0
            checks.append(Check("femur label", voxels > 0,
                                f"femur label {voxels} voxels ({volume_ml:.0f} ml)" if voxels
                                else f"{labels_path.name} holds no femur voxel"))

    checks.append(_in_range("head radius", measurements.get("head_radius_mm"), HEAD_RADIUS_RANGE_MM, "mm"))
    checks.append(_in_range("neck-shaft angle", measurements.get("neck_shaft_angle_deg"),
                            NECK_SHAFT_ANGLE_RANGE_DEG, "deg"))
    if reference_mm is not None:
        centre = _point(measurements.get("hip_centre_mm"))
        if centre is None:
            checks.append(Check("hip centre", False, "measurements have no hip_centre_mm"))
        else:
            distance = float(np.linalg.norm(centre - np.asarray(reference_mm, float)))
            ok = distance <= HIP_CENTRE_TOLERANCE_MM
            checks.append(Check("hip centre", ok,
                                f"hip centre {distance:.1f} mm from the {reference_name}" + (
                                    "" if ok else f" (more than {HIP_CENTRE_TOLERANCE_MM:g} mm)")))
    return checks


# --------------------------------------------------------------------------------------------
# The self-test
# --------------------------------------------------------------------------------------------

def run_self_test(out_dir: str | pathlib.Path | None = None, *,
                  on_progress: Callable[[Any], None] | None = None,
                  cancel: Callable[[], bool] | None = None, raise_unexpected: bool = False,
                  backend: str | None = None) -> SelfTestResult:
    """Verify the installation and register the demo case (see module docstring).

    Expected failures (a damaged resource, a registration error) become failed checks, not
    exceptions, so that the caller always gets a result to print.

    Parameters
    ----------
    out_dir : path, optional
        Where to keep the demo's outputs (must not exist or be empty); default: a temporary
        folder, deleted afterwards.
    on_progress : callable(Progress), optional
    cancel : callable returning True to stop (raises :class:`~inference.errors.Cancelled`)
    raise_unexpected : bool
        Let exceptions other than :class:`~inference.errors.HipAtlasError` propagate (``--debug``)
        instead of reporting them as a failed check.
    backend : {"auto", "tf", "onnx"} or None
        Who runs the network (:func:`inference.backends.load_backend`); the check says which ran.
    """
    from inference import resources

    started = time.perf_counter()
    result = SelfTestResult()

    problems = resources.verify_resources(demo=True, strict=False)
    if problems:
        detail = problems[0].message + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
        result.checks.append(Check("resources", False, detail))
        result.elapsed_s = time.perf_counter() - started
        return result
    result.checks.append(Check("resources", True, "resources verified"))

    case_dir = resources.demo_dir()
    with tempfile.TemporaryDirectory(prefix="hipatlas-selftest-") as tmp:
        target = pathlib.Path(out_dir) if out_dir is not None else pathlib.Path(tmp) / "demo"
        try:
            from inference import pipeline

            # The verified model, passed explicitly: HIPATLAS_RESOURCES_DIR may point elsewhere than
            # the pipeline's default.
            model_file = resources.default_model_file()
            registration_started = time.perf_counter()
            registration = pipeline.run_to_completion(
                pipeline.register_case(case_dir, target, model=model_file, cancel=cancel, backend=backend),
                on_progress=on_progress)
        except Cancelled:
            raise
        except HipAtlasError as error:
            result.checks.append(Check("registration", False, " ".join(str(error).split())))
            result.elapsed_s = time.perf_counter() - started
            return result
        except Exception as error:  # a self-test reports every failure, expected or not
            if raise_unexpected:
                raise
            log.debug("self-test registration failed", exc_info=True)
            result.checks.append(Check("registration", False, f"unexpected {type(error).__name__}: "
                                       + " ".join(str(error).split()) + " (run with --debug for the traceback)"))
            result.elapsed_s = time.perf_counter() - started
            return result
        register_s = time.perf_counter() - registration_started
        ran = ((registration.report or {}).get("model") or {}).get("backend", "?")
        result.checks.append(Check("registration", True, f"demo registered in {register_s:.1f} s ({ran})"))
        result.measurements = dict(registration.measurements)

        reference, source = demo_truth_hip_centre(case_dir)
        reference_name = f"ground truth ({source})"
        if reference is None:
            reference = _point((registration.report or {}).get("femoral_head_located_mm"))
            reference_name = "head located from the masks"
        view_names = [v.get("name", "") for v in (registration.report or {}).get("views", [])]
        result.checks += check_outputs(registration.out_dir, registration.measurements, view_names=view_names,
                                       reference_mm=reference, reference_name=reference_name)
        if reference is None:
            result.checks.append(Check("hip centre", False, "no reference position to compare the hip centre with"))
    result.elapsed_s = time.perf_counter() - started
    return result


# --------------------------------------------------------------------------------------------
# Command line: `hipatlas self-test` and `hipatlas --self-test`
# --------------------------------------------------------------------------------------------

def add_parser(subparsers: argparse._SubParsersAction) -> None:
    command = subparsers.add_parser(
        "self-test", help="check the installation: resources and a registration of the demo case",
        description="Verify the shipped model and atlas checksums, register the demo case headless and "
        "check the result. Prints one summary line; exit status 0 = passed, 1 = failed. "
        "Same as `hipatlas --self-test`.")
    command.add_argument("--out", help="keep the demo's outputs in this folder (default: a temporary folder)")
    command.add_argument("--json", action="store_true", help="also print every check as JSON")
    command.add_argument("--backend", choices=("auto", "tf", "onnx"),
                         help="who runs the network (default $HIPATLAS_BACKEND or auto)")
    command.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    """Run the self-test for the CLI; prints the summary line (and JSON with ``--json``)."""
    result = run_self_test(getattr(args, "out", None), raise_unexpected=getattr(args, "debug", False),
                           backend=getattr(args, "backend", None))
    if getattr(args, "json", False):
        print(json.dumps({"passed": result.passed, "version": __version__, "elapsed_s": round(result.elapsed_s, 2),
                          "checks": [c.__dict__ for c in result.checks],
                          "measurements": result.measurements}, indent=2, default=float))
    print(result.summary())
    return EXIT_PASSED if result.passed else EXIT_FAILED
