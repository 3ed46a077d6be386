"""The registration frame: the model, the atlas, and one object that carries a case into the
network's right-handed frame and back.

The network was trained on right femurs seen through right-handed cameras. A left hip is
registered in the case's world mirrored in x (:func:`inference.geometry.mirror_world_x`) with
its images flipped left-right (:func:`inference.geometry.flip_horizontal`), so that the network
again sees a right femur through right-handed cameras; everything the registration makes in that
frame (points, label volumes, rigid corrections of a camera, masks) is carried back by the same
object. :class:`RegistrationFrame` is built once per case (:meth:`RegistrationFrame.of_case`):
the two-view check runs there once and every projection matrix is normalised there once.

Model and atlas loading live here too (:func:`load_registration_model`, :func:`atlas_for`), below
:mod:`inference.backends`, :mod:`inference.mask_proposal` and :mod:`inference.pipeline`, which all
import this module and none of which it imports (``tests/test_architecture.py`` checks that the
import graph of ``inference`` has no cycle).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from inference import geometry
from inference.errors import DataError, ModelError

#: Views closer than this are refused: depth along the viewing direction is then unknowable.
MIN_VIEW_ANGLE_DEG = 30.0
#: Below this angle between the views the report warns (accuracy is best near 90 degrees).
WARN_VIEW_ANGLE_DEG = 60.0


# --------------------------------------------------------------------------------------------
# Model and atlas
# --------------------------------------------------------------------------------------------

def default_model_path() -> pathlib.Path:
    """The shipped model (the first of :func:`default_model_paths`): what takes one model (training
    from it, the experiments); its error also says how to choose another."""
    return default_model_paths()[0]


def default_model_paths() -> list[pathlib.Path]:
    """The shipped models registration uses together (:func:`inference.resources.default_model_files`:
    the folders ``resources/models/DEFAULT`` names, one per line, else the first model folder;
    several are averaged, :class:`inference.backends.EnsembleBackend`)."""
    from inference.resources import default_model_files

    try:
        return default_model_files()
    except ModelError as error:
        raise ModelError(f"{error}, or choose a model file (--model on the command line, Settings in "
                         "the window)") from None


def model_file_in(path: str | os.PathLike) -> pathlib.Path:
    """The ``.keras`` file of a model folder (or the file itself)."""
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
#: Loaded models kept per process, here and in :func:`inference.backends.load_backend` (the
#: members of an ensemble, the GUI's many cases).
CACHED_MODELS = 4


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
        if len(_MODEL_CACHE) >= CACHED_MODELS:  # the members of an ensemble stay loaded together
            _MODEL_CACHE.clear()
        _MODEL_CACHE[key] = model_lib.load_model(path, card=card if card.is_file() else None)
    return _MODEL_CACHE[key]


_GRAPH_FUNCTIONS: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()
#: From this many cases on, :func:`inference.pipeline.register_cohort` runs the network as a
#: traced graph: its first call costs more (measured on the idle 2-core machine, compact model:
#: 3.8 s against 2.2 s for the first eager call), then each forward pass takes 0.11 s instead of
#: 0.43 s eagerly (benchmarks/bench_model.py), so it pays from about 5 cases on.
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


_ATLAS_CACHE: dict[str, Any] = {}


def atlas_for(net) -> Any:
    """The atlas of a registration network's grid (loaded once per process: the GUI registers many
    cases). ``net`` is an :class:`inference.backends.InferenceBackend` (it has ``config``) or a
    loaded Keras model."""
    from inference.data import atlas as atlas_lib

    config = getattr(net, "config", None)
    if config is None:
        from inference import model as model_lib

        config = model_lib.model_config_of(net)
    if config.grid not in _ATLAS_CACHE:
        _ATLAS_CACHE[config.grid] = atlas_lib.load_atlas(config.grid)
    return _ATLAS_CACHE[config.grid]


def placed_grid(atlas_geometry: "geometry.VolumeGeometry", atlas_head_mm: np.ndarray,
                head_world_mm: np.ndarray) -> "geometry.VolumeGeometry":
    """The atlas grid translated so that the atlas's head centre sits on the located head."""
    shift = np.asarray(head_world_mm, float) - np.asarray(atlas_head_mm, float)
    return dataclasses.replace(atlas_geometry, origin_mm=tuple(np.asarray(atlas_geometry.origin_mm) + shift))


# --------------------------------------------------------------------------------------------
# The frame
# --------------------------------------------------------------------------------------------

#: The mirror in x of homogeneous world points (``geometry.mirror_world_x(P) == P @ MIRROR_X``).
MIRROR_X = np.diag([-1.0, 1.0, 1.0, 1.0])
_MIRROR_POINT = np.array([-1.0, 1.0, 1.0])


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


@dataclass(frozen=True)
class RegistrationFrame:
    """A case seen by the network: the right-handed frame of a right femur, and the way back.

    For a right hip the frame is the case's world; for a left hip it is that world mirrored in x
    with every image flipped left-right, so that the cameras stay right-handed (``P @ diag(-1, 1,
    1, 1)`` alone would have a left-handed pixel frame, and the network's encoders, trained on
    right-handed views, would see mirror images of what they learned). A world point stays on its
    (flipped) pixel.

    Attributes
    ----------
    side : "right" or "left"
    pair : geometry.ViewPairReport
        The two-view check of the case's views (angle, closest approach of the central rays).
    world_projections : tuple of (3, 4) arrays
        Each view's P in the case's world, normalised so that w > 0 in front of its source.
    projections : tuple of (3, 4) arrays
        The same cameras in the registration frame (mirrored and flipped for a left hip).
    image_shapes : tuple of (rows, cols)
    start_mm : (3,) array
        Where to start looking for the femur, in the registration frame: the closest approach of
        the two central rays.
    """

    side: str
    pair: Any
    world_projections: tuple[np.ndarray, ...]
    projections: tuple[np.ndarray, ...]
    image_shapes: tuple[tuple[int, int], ...]
    start_mm: np.ndarray

    @classmethod
    def of_case(cls, case) -> "RegistrationFrame":
        """The frame of a loaded case (:class:`inference.io.Case`: ``side`` and two ``views`` with
        ``projection`` and ``image.pixels``). Runs the two-view check and normalises every P."""
        projections = [np.asarray(v.projection, float) for v in case.views]
        shapes = tuple(tuple(int(n) for n in np.shape(v.image.pixels)[:2]) for v in case.views)
        return cls.from_projections(case.side, projections, shapes)

    @classmethod
    def from_projections(cls, side: str, projections: Sequence[np.ndarray],
                         image_shapes: Sequence[tuple[int, int]]) -> "RegistrationFrame":
        """The frame of two calibrated views of a ``side`` hip with images of ``image_shapes``."""
        if side not in ("right", "left"):
            raise DataError(f"side must be 'right' or 'left', not {side!r}")
        pair = geometry.view_pair_check(projections[0], projections[1])
        world = tuple(geometry.normalise_projection(p, front_point_mm=pair.midpoint_mm) for p in projections)
        start = np.asarray(pair.midpoint_mm, float)
        shapes = tuple((int(r), int(c)) for r, c in image_shapes)
        frame = cls(side, pair, world, world, shapes, start)
        if frame.mirror:
            frame = dataclasses.replace(
                frame, start_mm=frame.point_in(start),
                projections=tuple(geometry.flip_horizontal(geometry.mirror_world_x(p), cols)
                                  for p, (_, cols) in zip(world, shapes)))
        return frame

    @property
    def mirror(self) -> bool:
        """True for a left hip: the frame is the case's world mirrored in x."""
        return self.side == "left"

    @property
    def view_angle_deg(self) -> float:
        return float(self.pair.angle_deg)

    def check_view_angle(self, where: Any, warnings: list[str]) -> None:
        """Refuse views under :data:`MIN_VIEW_ANGLE_DEG` apart (``where`` names the case file);
        warn below :data:`WARN_VIEW_ANGLE_DEG`."""
        angle = self.view_angle_deg
        if angle < MIN_VIEW_ANGLE_DEG:
            raise DataError(f"{where}: the two views are only {angle:.1f} deg "
                            f"apart; at least {MIN_VIEW_ANGLE_DEG:.0f} deg (ideally 90) is needed")
        if angle < WARN_VIEW_ANGLE_DEG:
            warnings.append(f"views are {angle:.0f} deg apart; accuracy is best near 90 deg")

    # ---------------------------------------------------------------- images and masks
    def image_in(self, image: np.ndarray) -> np.ndarray:
        """An image or mask of the case in the registration frame (flipped left-right for a left hip)."""
        return np.ascontiguousarray(image[:, ::-1]) if self.mirror else image

    #: The flip is its own inverse: a registration-frame image back in the case's pixels.
    image_out = image_in

    def images_in(self, case) -> list[np.ndarray]:
        """The case's radiographs (float32) in the registration frame."""
        return [self.image_in(np.asarray(v.image.pixels, np.float32)) for v in case.views]

    # ---------------------------------------------------------------- points and transforms
    def point_in(self, point_mm: Any) -> np.ndarray:
        """A case-world point in the registration frame (x -> -x for a left hip)."""
        return np.asarray(point_mm, float) * _MIRROR_POINT if self.mirror else np.asarray(point_mm, float)

    #: Mirroring is its own inverse: a registration-frame point in the case's world.
    point_out = point_in

    def points_out(self, points_mm: Mapping[str, Any]) -> dict[str, list[float]]:
        """Named registration-frame points in the case's world (lists of floats)."""
        return {name: [float(v) for v in self.point_out(p)] for name, p in points_mm.items()}

    def transform_out(self, matrix: np.ndarray) -> np.ndarray:
        """A (4, 4) transform of the registration frame in the case's world (``F M F``)."""
        matrix = np.asarray(matrix, float)
        return MIRROR_X @ matrix @ MIRROR_X if self.mirror else matrix

    def volume_out(self, array_zyx: np.ndarray, grid: "geometry.VolumeGeometry"):
        """A registration-frame volume (array, grid) in the case's world."""
        return mirrored_volume(array_zyx, grid) if self.mirror else (array_zyx, grid)

    def measurement_landmarks_out(self, marks):
        """:class:`inference.measure.MeasurementLandmarks` of the registration frame (a right femur)
        in the case's world, with the case's side."""
        points = {k: self.point_out(v) for k, v in marks.points_mm.items()} if self.mirror else marks.points_mm
        return dataclasses.replace(marks, points_mm=points, side=self.side)

    # ---------------------------------------------------------------- cameras
    def with_pose_corrections(self, corrections: Sequence[np.ndarray | None]) -> "RegistrationFrame":
        """The frame with each camera moved by a rigid correction ``M`` estimated in the
        registration frame (``P @ M``; ``F M F`` in the case's world; None keeps a view)."""
        projections, world = list(self.projections), list(self.world_projections)
        for index, correction in enumerate(corrections):
            if correction is not None:
                projections[index] = np.asarray(projections[index], float) @ correction
                world[index] = np.asarray(world[index], float) @ self.transform_out(correction)
        return dataclasses.replace(self, projections=tuple(projections), world_projections=tuple(world))
