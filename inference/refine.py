"""Test-time refinement and self-calibration: a few gradient steps on the case itself.

After the network, its registration is refined on the case's own radiographs, on the paper's 2D
loss plus a silhouette term:

    loss = mean over views of [ -NCC(DRR(femur), radiograph | mask & support)
                                + silhouette_weight * (1 - softDice(silhouette(femur), mask | support)) ]
           + smooth_weight * smoothness(d) + quadratic priors on the corrections

The femur is represented by points: the atlas femur's voxel centres (each split into 2x2x2
sub-points), carried into the patient by the inverse of the network's field ``psi``. A
correction ``C`` moves them: ``C(X) = c + s R (X + d(X) - c) + t`` with a 7-parameter similarity
about the located head centre ``c`` and a smooth displacement ``d`` interpolated from a coarse
grid (a quarter of the atlas grid per axis). Each view projects the moved points with its ``P``
and splats them bilinearly onto a detector twice as fine as the network's (voxel volume over the
pixel's footprint = path length in mm; times the femur's attenuation = its DRR). At the end, the
pull-back field of the corrected registration is ``psi'(y) = psi(C^-1(y))`` (``C^-1`` by fixed
point iteration), which the full-resolution warp and the measurements then use.

Why points rather than the ProST layer on the warped atlas volume: both are differentiable, but
on this 2-core machine (shared, load ~13) a ProST step with the dense warp and velocity
integration took 2.5-4.5 s after 9-40 s of tracing/XLA compilation, so a
10 s budget would buy one or two steps; a traced splatting step took 0.15-0.4 s under the same load
(plus 2-5 s to trace it once).

Self-calibration adds, for every view but the first (the reference: the two cameras and the femur
share a rigid motion that no image can reveal, so the first view fixes the world), a rigid
correction of the camera: rotation about the head centre and a shift, ``P' = P @ M``.

Everything is bounded: ``max_steps`` Adam steps and ``time_limit_s``, progress reported and cancel
checked after each step. The state with the lowest loss is kept, and the network's result is
returned unchanged when the refinement does not lower the loss by ``min_improvement`` (relative;
``used`` False): it never makes a case worse by its own measure.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
import time
from typing import Any, Callable, Iterator

import numpy as np

from inference import validate
from inference.errors import Cancelled, ConfigError

log = logging.getLogger(__name__)

#: Whether ``hipatlas register`` (and the workstation) refines when not told: ``"auto"``, only
#: where the network's femur outline disagrees with a mask. Refining every case raised its own
#: silhouette Dice but lowered the femur's 3D Dice on held-out orthogonal cases; gated, it left
#: them as they were and lifted the weak and oblique ones (docs/refinement.md). It self-calibrates
#: only when told. ``$HIPATLAS_REFINE`` (auto, on, off) overrides it.
DEFAULT_REFINE = "auto"
DEFAULT_SELF_CALIBRATE = False
#: Environment variable holding the default refinement (auto, on, off).
REFINE_ENV = "HIPATLAS_REFINE"
_REFINE_WORDS = {"auto": "auto", "on": True, "off": False}
#: ``refine="auto"`` (``hipatlas register --auto-refine``) refines a case only when the lowest
#: Dice of a view's projected output outline against its mask is below this. Chosen on 20
#: held-out simulated cases (orthogonal and 40 deg apart; docs/refinement.md): every case below
#: 0.955 but one gained from the refinement, all orthogonal cases above it but one lost.
AUTO_REFINE_BELOW = 0.955
#: The loss ignores the image below this height above the atlas grid's distal face (see the support).
SUPPORT_DISTAL_MARGIN_MM = 10.0
#: Past these corrections a view's calibration is flagged (report warning), not silently accepted.
CALIBRATION_LIMIT_DEG = 8.0
CALIBRATION_LIMIT_MM = 10.0


@dataclasses.dataclass(frozen=True)
class RefineSettings:
    """Settings of the test-time refinement (defaults measured on held-out simulated cases).

    Parameters
    ----------
    max_steps : int
        Adam steps at most.
    time_limit_s : float
        Wall-time bound of the optimisation (checked after each step).
    self_calibrate : bool
        Also optimise the pose of every view but the first.
    ncc_weight, silhouette_weight, smooth_weight : float
        Weights of the masked NCC, the silhouette (1 - soft Dice) and the smoothness terms.
    affine_prior, displacement_prior, pose_prior : float
        Quadratic penalties on the corrections (deg / mm / 0.01 log-scale, mm, deg and mm); they
        keep an ambiguous case where the network put it.
    learning_rate : float
        Adam step size (deg or mm per step; the displacement half of it).
    detector_scale : float
        The loss's detector is the network's times this (finer: sub-millimetre silhouettes).
    subdivide : int
        Sub-points per atlas voxel edge.
    silhouette_mm : float
        Path length (mm) at which the soft silhouette ``1 - exp(-t / silhouette_mm)`` is 0.63.
    mask_bias_mm : float
        How far the masks' outline lies outside the bone (mm at the hip); the target silhouette
        is shrunk by it. Masks drawn on (or rendered from) voxels run 0.6-0.9 mm outside the bone
        (pipeline.py, head radius from masks); matching them as they are inflates the femur.
    displacement : bool
        Optimise the smooth displacement (else only the similarity and the poses).
    rotation_and_scale : bool
        Optimise the similarity's rotation and scale (else only its translation).
    min_improvement : float
        Relative loss decrease the refinement must reach to be used.
    auto : bool
        Refine only where the network's femur outline disagrees with a mask
        (:func:`auto_refine_decision`); ``register_case(refine="auto")`` is these defaults with it.
    """

    max_steps: int = 30
    time_limit_s: float = 10.0
    self_calibrate: bool = DEFAULT_SELF_CALIBRATE
    ncc_weight: float = 0.1
    silhouette_weight: float = 1.0
    smooth_weight: float = 0.02
    affine_prior: float = 1e-4
    displacement_prior: float = 1e-4
    pose_prior: float = 1e-4
    learning_rate: float = 0.15
    detector_scale: float = 2.0
    subdivide: int = 1
    silhouette_mm: float = 1.5
    mask_bias_mm: float = 0.7
    displacement: bool = True
    rotation_and_scale: bool = True
    min_improvement: float = 0.002
    auto: bool = False

    def __post_init__(self) -> None:
        for name in ("max_steps", "subdivide"):
            validate.positive_int(getattr(self, name), f"RefineConfig {name}")
        for name in ("time_limit_s", "learning_rate", "detector_scale", "silhouette_mm"):
            validate.number(getattr(self, name), f"RefineConfig {name}", 0, low_open=True)
        for name in ("ncc_weight", "silhouette_weight", "smooth_weight", "affine_prior", "displacement_prior",
                     "pose_prior", "min_improvement", "mask_bias_mm"):
            validate.number(getattr(self, name), f"RefineConfig {name}", 0)


@dataclasses.dataclass
class RefineResult:
    """What the refinement did; ``psi`` and ``projections`` are those to use downstream."""

    used: bool
    psi: np.ndarray
    pose_corrections: list[np.ndarray | None]
    loss_before: float
    loss_after: float
    terms_before: dict[str, float]
    terms_after: dict[str, float]
    steps: int
    time_s: float
    centre_mm: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(3))

    def calibration_report(self, frame) -> list[dict[str, Any] | None]:
        """Per view: the estimated camera correction in the case's world (None: reference view).

        ``frame`` is the case's :class:`inference.registration.RegistrationFrame` (the corrections
        were estimated in it)."""
        out = []
        for correction in self.pose_corrections:
            if correction is None:
                out.append(None)
                continue
            matrix = frame.transform_out(correction)
            centre = frame.point_out(self.centre_mm)
            angle = math.degrees(math.acos(float(np.clip((np.trace(matrix[:3, :3]) - 1) / 2, -1, 1))))
            shift = float(np.linalg.norm(correction_shift(matrix, centre)))
            out.append({"rotation_deg": angle, "shift_at_head_mm": shift, "matrix": matrix.tolist(),
                        "exceeds_limit": bool(angle > CALIBRATION_LIMIT_DEG or shift > CALIBRATION_LIMIT_MM)})
        return out


def correction_shift(matrix: np.ndarray, centre_mm: np.ndarray | None = None) -> np.ndarray:
    """Translation of a rigid correction at ``centre_mm`` (where it moves that point), mm."""
    centre = np.zeros(3) if centre_mm is None else np.asarray(centre_mm, float)
    return matrix[:3, :3] @ centre + matrix[:3, 3] - centre


def corrected_world_projection(projection: np.ndarray, correction: np.ndarray | None) -> np.ndarray:
    """``P @ M`` (the camera as the self-calibration estimated it)."""
    return projection if correction is None else np.asarray(projection, float) @ correction


def _pose_matrices(tf, angles_deg, shift_mm, centre_mm):
    """(N, 4, 4) float64 rigid transforms: rotation by ``angles_deg`` about ``centre_mm``, then a shift."""
    from inference.layers.warp import rotation_matrix_xyz

    rotation = tf.cast(rotation_matrix_xyz(tf.cast(angles_deg, tf.float32) * (math.pi / 180.0)), tf.float64)
    centre = tf.constant(np.asarray(centre_mm, float))
    offset = centre[None] - tf.einsum("nij,j->ni", rotation, centre) + tf.cast(shift_mm, tf.float64)
    top = tf.concat([rotation, offset[:, :, None]], axis=2)
    bottom = tf.broadcast_to(tf.constant([[[0.0, 0.0, 0.0, 1.0]]], tf.float64), [tf.shape(top)[0], 1, 4])
    return tf.concat([top, bottom], axis=1)


def femur_points(atlas, psi: np.ndarray, grid, subdivide: int = 1, iterations: int = 10):
    """The atlas femur as patient-space points: (N, 3) world mm, per-point volume (mm^3), attenuation.

    Each femur voxel of the atlas is split into ``subdivide**3`` sub-points; a sub-point ``a``
    (atlas voxel coordinates) goes to the patient point ``x`` with ``x + psi(x) = a``, solved by
    the fixed-point iteration ``x <- a - psi(x)`` (psi is smooth, |grad psi| < 1). Points that
    do not converge (folded or outside the grid) are dropped.
    """
    from scipy import ndimage

    from inference import model as model_lib

    labels = np.asarray(atlas.labels) == model_lib.FEMUR_LABEL
    attenuation = model_lib.femur_intensity(atlas.volume, atlas.labels)
    voxels = np.argwhere(labels).astype(np.float32)
    offsets = (np.arange(subdivide, dtype=np.float32) + 0.5) / subdivide - 0.5
    sub = np.stack(np.meshgrid(offsets, offsets, offsets, indexing="ij"), -1).reshape(-1, 3)
    atlas_zyx = (voxels[:, None, :] + sub[None]).reshape(-1, 3)
    mu = np.repeat(attenuation[labels], len(sub)).astype(np.float32)
    upper = np.array(psi.shape[:3], np.float32) - 1
    x = atlas_zyx.copy()
    for _ in range(iterations):
        clamped = np.clip(x, 0, upper).T
        u = np.stack([ndimage.map_coordinates(psi[..., c], clamped, order=1, mode="nearest") for c in range(3)], -1)
        x = atlas_zyx - u
    clamped = np.clip(x, 0, upper).T
    residual = x + np.stack([ndimage.map_coordinates(psi[..., c], clamped, order=1, mode="nearest")
                             for c in range(3)], -1) - atlas_zyx
    keep = np.abs(residual).max(axis=1) < 0.05
    ijk1 = np.concatenate([x[keep][:, ::-1], np.ones((int(keep.sum()), 1), np.float32)], axis=1)
    world = (np.asarray(grid.index_to_world(), float) @ ijk1.T).T[:, :3]
    voxel_mm3 = float(np.prod(grid.spacing_xyz_mm)) / len(sub)
    return world.astype(np.float64), voxel_mm3, mu[keep]


def _pixel_area_mm2(projection: np.ndarray, point_mm: np.ndarray) -> float:
    """Area (mm^2) that one detector pixel covers in the plane through ``point_mm`` facing the source."""
    from inference.geometry import source_position

    source = np.asarray(source_position(projection), float)
    normal = point_mm - source
    normal /= np.linalg.norm(normal)
    # two small steps in the plane, projected: the pixel area is their area over the image area
    a = np.cross(normal, [0.0, 0.0, 1.0] if abs(normal[2]) < 0.9 else [1.0, 0.0, 0.0])
    a /= np.linalg.norm(a)
    b = np.cross(normal, a)
    pts = np.array([point_mm, point_mm + a, point_mm + b])
    uv = []
    for q in pts:
        h = projection @ np.append(q, 1.0)
        uv.append(h[:2] / h[2])
    du, dv = uv[1] - uv[0], uv[2] - uv[0]
    return float(1.0 / abs(du[0] * dv[1] - du[1] * dv[0]))


def _splat(tf, uv, values, height, width):
    """Bilinear splat of (N, C) values at (N, 2) pixel positions (u, v) onto an (H, W, C) image."""
    u0 = tf.floor(uv[:, 0])
    v0 = tf.floor(uv[:, 1])
    fu, fv = (uv[:, 0] - u0)[:, None], (uv[:, 1] - v0)[:, None]
    u0 = tf.cast(u0, tf.int32)
    v0 = tf.cast(v0, tf.int32)
    index, weighted = [], []
    for du, dv, weight in ((0, 0, (1 - fu) * (1 - fv)), (1, 0, fu * (1 - fv)), (0, 1, (1 - fu) * fv), (1, 1, fu * fv)):
        uu, vv = u0 + du, v0 + dv
        inside = (uu >= 0) & (uu < width) & (vv >= 0) & (vv < height)
        # points off the detector go to one extra bin that is dropped
        index.append(tf.where(inside, vv * width + uu, height * width))
        weighted.append(weight * values)
    image = tf.math.unsorted_segment_sum(tf.concat(weighted, 0), tf.concat(index, 0), height * width + 1)
    return tf.reshape(image[:-1], [height, width, -1])


def _blur(tf, image, sigma_px: float = 0.7):
    """Separable Gaussian blur of an (H, W, C) image (removes the splat's sampling pattern)."""
    radius = 2
    x = np.arange(-radius, radius + 1, dtype=np.float32)
    kernel = np.exp(-0.5 * (x / sigma_px) ** 2)
    kernel /= kernel.sum()
    channels = int(image.shape[-1])
    planes = tf.transpose(image, [2, 0, 1])[..., None]  # (C, H, W, 1)
    out = tf.nn.conv2d(planes, tf.constant(kernel.reshape(1, -1, 1, 1)), 1, "SAME")
    out = tf.nn.conv2d(out, tf.constant(kernel.reshape(-1, 1, 1, 1)), 1, "SAME")
    return tf.transpose(out[..., 0], [1, 2, 0])[..., :channels]


def _masked_ncc(tf, a, b, weights):
    total = tf.reduce_sum(weights) + 1e-6
    ma = tf.reduce_sum(a * weights) / total
    mb = tf.reduce_sum(b * weights) / total
    da, db = a - ma, b - mb
    cov = tf.reduce_sum(da * db * weights) / total
    var_a = tf.reduce_sum(da * da * weights) / total
    var_b = tf.reduce_sum(db * db * weights) / total
    return cov / tf.sqrt((var_a + 1e-9) * (var_b + 1e-9))


def _soft_dice(tf, a, b, weights):
    overlap = tf.reduce_sum(a * b * weights)
    return (2.0 * overlap + 1e-6) / (tf.reduce_sum(a * weights) + tf.reduce_sum(b * weights) + 1e-6)


def default_refine() -> bool | str:
    """The refinement ``register_case`` uses when not told: ``$HIPATLAS_REFINE`` (auto, on, off),
    else :data:`DEFAULT_REFINE`."""
    word = os.environ.get(REFINE_ENV, "").strip().lower()
    if not word:
        return DEFAULT_REFINE
    if word not in _REFINE_WORDS:
        raise ConfigError(f"{REFINE_ENV} must be one of {', '.join(_REFINE_WORDS)}, not {word!r}")
    return _REFINE_WORDS[word]


def auto_refine_decision(mask_agreement_dice: dict[str, float | None],
                         threshold: float | None = None) -> dict[str, Any]:
    """Whether ``refine="auto"`` refines a case: when the network's femur outline disagrees with a
    view's mask (Dice of the projected output against the mask below ``threshold``, default
    :data:`AUTO_REFINE_BELOW`) and TensorFlow is installed. The report.json entry (``run``,
    ``reason``, the agreement per view and the threshold)."""
    from inference.backends import tensorflow_available

    threshold = AUTO_REFINE_BELOW if threshold is None else float(threshold)
    known = {name: float(value) for name, value in mask_agreement_dice.items() if value is not None}
    lowest = min(known.values()) if known else None
    entry = {"threshold": threshold, "mask_agreement_dice": known, "lowest": lowest}
    if lowest is None:
        return {**entry, "run": False, "reason": "no view has a mask agreement to judge by"}
    if lowest >= threshold:
        return {**entry, "run": False,
                "reason": f"the outlines agree with the masks (lowest Dice {lowest:.3f} >= {threshold:.3f})"}
    if not tensorflow_available():
        return {**entry, "run": False,
                "reason": f"an outline disagrees with its mask (Dice {lowest:.3f} < {threshold:.3f}) but the "
                          "refinement needs TensorFlow, which this installation does not have"}
    return {**entry, "run": True,
            "reason": f"an outline disagrees with its mask (Dice {lowest:.3f} < {threshold:.3f})"}


def auto_refine_warning(decision: dict[str, Any]) -> str | None:
    """The line the surgeon sees (report warnings, workstation, PDF) when the automatic refinement
    found an outline that disagrees with its mask; None when the outlines agree."""
    lowest = decision.get("lowest")
    if lowest is None or lowest >= decision["threshold"]:
        return None
    view = min(decision["mask_agreement_dice"], key=decision["mask_agreement_dice"].get)
    found = (f"the network's femur outline disagreed with the {view} mask (Dice {lowest:.2f}, "
             f"below {decision['threshold']:.3f})")
    if decision["run"]:
        return f"{found}: the result was refined on the radiographs; check the overlays"
    return (f"{found} and could not be refined here (the refinement needs TensorFlow); check the "
            "overlays before relying on the result")


def require_tensorflow() -> None:
    """Stop before any work when the refinement cannot run: it needs TensorFlow's gradients, which
    the TensorFlow-free runtime (ONNX Runtime only) does not have.

    Raises
    ------
    ConfigError
        TensorFlow (or its Keras) is not installed.
    """
    from inference.backends import tensorflow_available

    if not tensorflow_available():
        raise ConfigError("the test-time refinement (--refine) needs TensorFlow, which this installation does not "
                          "have (the TensorFlow-free runtime); register without --refine, or use the full "
                          "HipAtlas installation")


def preload_tensorflow() -> threading.Thread:
    """Start importing TensorFlow in a background thread and return it.

    A registration that will refine (``--refine``) with the ONNX Runtime backend calls this after
    its first network pass: the import (3.5-4.5 s on the 2-core machine) then runs beside the
    shift ensemble's other passes, which release the GIL and leave a core idle while ONNX
    Runtime's single-threaded samplers run, instead of after them. The caller must join the
    thread before importing anything itself: two threads importing TensorFlow's modules at once
    can see them half initialised. A failed import is logged here and raised again, with its
    real message, by the refinement's own import.
    """
    def load() -> None:
        started = time.perf_counter()
        try:
            import tensorflow  # noqa: F401
        except Exception as error:  # re-raised by the refinement's own import
            log.debug("background TensorFlow import failed: %s", error)
        else:
            log.debug("TensorFlow imported in the background in %.2f s", time.perf_counter() - started)

    thread = threading.Thread(target=load, name="hipatlas-import-tensorflow", daemon=True)
    thread.start()
    return thread


def refine_registration(atlas, psi: np.ndarray, grid, images: list[np.ndarray], masks: list[np.ndarray],
                        projections: list[np.ndarray], detector_hw: tuple[int, int], centre_mm: np.ndarray,
                        settings: RefineSettings = RefineSettings(),
                        cancel: Callable[[], bool] | None = None) -> Iterator[tuple[float, str]]:
    """Refine the network's registration on the case (a generator of (fraction, message)).

    Parameters
    ----------
    atlas : Atlas
        The atlas of the network's grid.
    psi : (Z, Y, X, 3)
        The network's pull-back field (voxels of ``grid``, (dz, dy, dx)).
    grid : VolumeGeometry
        The placed atlas grid.
    images, masks, projections : per view
        Full radiographs, femur masks and P (world mm -> pixels), in the registration frame.
    detector_hw : (H, W)
        The network detector; the loss uses one ``settings.detector_scale`` times finer.
    centre_mm : (3,)
        Rotation centre of the corrections (the located femoral head).

    Returns (``StopIteration.value``) a :class:`RefineResult`.
    """
    import tensorflow as tf

    from inference import views

    started = time.perf_counter()
    psi = np.asarray(psi, np.float32)
    centre_mm = np.asarray(centre_mm, float)
    hw = (int(detector_hw[0] * settings.detector_scale), int(detector_hw[1] * settings.detector_scale))
    inputs = views.network_inputs(images, masks, projections, grid, hw)
    num_views = len(projections)
    net_p = [np.asarray(v.projection, float) for v in inputs.views]
    pixel_area = [_pixel_area_mm2(p, centre_mm) for p in net_p]
    soft_masks = [tf.constant(_shrunk_mask(views.resample_to_network((np.asarray(m) > 0).astype(np.float32), v,
                                                                     outside=views.NETWORK_OUTSIDE),
                                           settings.mask_bias_mm / math.sqrt(area)))
                  for m, v, area in zip(masks, inputs.views, pixel_area)]
    radiographs = [tf.constant(np.asarray(im, np.float32)) for im in inputs.images]

    log.debug("refine: inputs %.2f s", time.perf_counter() - started)
    points, voxel_mm3, mu = femur_points(atlas, psi, grid, settings.subdivide)
    log.debug("refine: %d points %.2f s", len(points), time.perf_counter() - started)
    points_t = tf.constant(points - centre_mm, tf.float64)  # relative to the centre: float precision
    point_values = tf.constant(np.stack([np.ones_like(mu), mu], axis=1))  # path length, attenuation
    # Where the atlas grid projects (its corners' hull, approximated by the box of all grid
    # voxel centres splatted): the mask beyond it (shaft below the atlas field of view) has no
    # counterpart in the projection and must not count.
    # The femur is cut by the grid's distal face; the box's projection (a perspective) reaches
    # below that cut in the image, where the mask shows shaft the atlas does not hold, and the
    # loss would pull the femur distally to cover it (measured: 1.6 mm). So the support starts
    # SUPPORT_DISTAL_MARGIN_MM above the distal face.
    nx, ny, nz = grid.shape_zyx[::-1]
    k0 = min(nz - 2, int(math.ceil(SUPPORT_DISTAL_MARGIN_MM / grid.spacing_xyz_mm[2])))
    box = np.stack(np.meshgrid(np.linspace(0, nx - 1, max(2, nx // 3)), np.linspace(0, ny - 1, max(2, ny // 3)),
                               np.linspace(k0, nz - 1, max(2, (nz - k0) // 3)), indexing="ij"), -1).reshape(-1, 3)
    box_world = (np.asarray(grid.index_to_world(), float) @ np.c_[box, np.ones(len(box))].T).T[:, :3]
    support = []
    for p in net_p:
        h = (p @ np.c_[box_world, np.ones(len(box_world))].T).T
        uv = tf.constant((h[:, :2] / h[:, 2:]).astype(np.float32))
        hit = _splat(tf, uv, tf.ones([len(box_world), 1]), hw[0], hw[1])[..., 0] > 0
        support.append(tf.cast(tf.constant(_fill_holes(hit.numpy())), tf.float32))

    coarse_shape = tuple(max(2, s // 4) for s in grid.shape_zyx)
    # grid world box, for interpolating d: coarse voxel (z, y, x) of a world point
    i2w = np.asarray(grid.index_to_world(), float)
    w2i = np.linalg.inv(i2w)
    scale_to_coarse = (np.array(coarse_shape[::-1], float) - 1) / (np.array(grid.shape_zyx[::-1], float) - 1)
    points_coarse = (w2i @ np.c_[points, np.ones(len(points))].T).T[:, :3] * scale_to_coarse
    points_coarse_zyx = tf.constant(points_coarse[:, ::-1].astype(np.float32))

    dv = tf.Variable(tf.zeros(coarse_shape + (3,)), name="displacement_mm")  # world mm (x, y, z)
    dp = dp_var = tf.Variable(tf.zeros(7), name="similarity")  # deg (3), mm (3), log-scale x 100
    calibrated = list(range(1, num_views)) if settings.self_calibrate else []
    pose_angles = tf.Variable(tf.zeros((max(len(calibrated), 1), 3)), name="pose_angles_deg")
    pose_shift = tf.Variable(tf.zeros((max(len(calibrated), 1), 3)), name="pose_shift_mm")
    variables = ([dv] if settings.displacement else []) + [dp] + ([pose_angles, pose_shift] if calibrated else [])
    # Adam moves each parameter by about learning_rate x scale per step (mm or deg).
    scales = {id(dv): 0.5, id(dp): 1.0, id(pose_angles): 1.0, id(pose_shift): 1.0}

    from inference.layers.sampling import trilinear_sample

    dof = tf.constant([1.0] * 7 if settings.rotation_and_scale else [0, 0, 0, 1, 1, 1, 0], tf.float32)

    def similarity():
        from inference.layers.warp import rotation_matrix_xyz

        dp = dp_var * dof
        rotation = tf.cast(rotation_matrix_xyz(dp[None, :3] * (math.pi / 180.0))[0], tf.float64)
        return rotation * tf.cast(tf.exp(dp[6] / 100.0), tf.float64), tf.cast(dp[3:6], tf.float64)

    def moved_points():
        coords = tf.clip_by_value(points_coarse_zyx, 0.0, tf.constant(np.array(coarse_shape, np.float32) - 1))
        displacement = tf.cast(trilinear_sample(dv[None], coords[None])[0], tf.float64)
        linear, shift = similarity()
        return tf.einsum("ij,nj->ni", linear, points_t + displacement) + shift  # relative to the centre

    def loss_terms():
        moved = moved_points()
        pose = (_pose_matrices(tf, pose_angles, pose_shift, np.zeros(3)) if calibrated else None)
        homogeneous = tf.concat([moved, tf.ones_like(moved[:, :1])], axis=1)
        terms, ncc_sum, sil_sum = {}, 0.0, 0.0
        for view in range(num_views):
            # P acts on world points; the points are relative to the centre: P T(centre)
            p = net_p[view] @ np.vstack([np.c_[np.eye(3), centre_mm], [0, 0, 0, 1]])
            matrix = tf.constant(p)
            if calibrated and view in calibrated:
                matrix = matrix @ pose[calibrated.index(view)]
            h = tf.einsum("ij,nj->ni", matrix, homogeneous)
            uv = tf.cast(h[:, :2] / h[:, 2:], tf.float32)
            both = _blur(tf, _splat(tf, uv, point_values * (voxel_mm3 / pixel_area[view]), hw[0], hw[1]))
            thickness, drr = both[..., 0], both[..., 1]
            silhouette = 1.0 - tf.exp(-thickness / settings.silhouette_mm)
            weights = support[view]
            ncc = _masked_ncc(tf, drr, radiographs[view], soft_masks[view] * weights)
            dice = _soft_dice(tf, silhouette, soft_masks[view], weights)
            terms[f"ncc_v{view}"], terms[f"dice_v{view}"] = ncc, dice
            ncc_sum += ncc
            sil_sum += 1.0 - dice
        smooth = tf.add_n([tf.reduce_mean(tf.square(dv[1:] - dv[:-1])), tf.reduce_mean(tf.square(dv[:, 1:] - dv[:, :-1])),
                           tf.reduce_mean(tf.square(dv[:, :, 1:] - dv[:, :, :-1]))])
        prior = settings.affine_prior * tf.reduce_sum(dp ** 2) + settings.displacement_prior * tf.reduce_mean(dv ** 2)
        if calibrated:
            prior += settings.pose_prior * (tf.reduce_sum(pose_angles ** 2) + tf.reduce_sum(pose_shift ** 2))
        total = (-settings.ncc_weight * ncc_sum / num_views + settings.silhouette_weight * sil_sum / num_views
                 + settings.smooth_weight * smooth + prior)
        terms.update(smoothness=smooth, total=total)
        return total, terms

    moments = {id(v): (tf.zeros_like(v), tf.zeros_like(v)) for v in variables}

    def adam_step(grads, step):
        beta1, beta2, eps = 0.9, 0.999, 1e-8
        for var, grad in zip(variables, grads):
            if grad is None:
                continue
            m, v = moments[id(var)]
            m = beta1 * m + (1 - beta1) * grad
            v = beta2 * v + (1 - beta2) * grad * grad
            moments[id(var)] = (m, v)
            update = (m / (1 - beta1 ** step)) / (tf.sqrt(v / (1 - beta2 ** step)) + eps)
            var.assign_sub(settings.learning_rate * scales[id(var)] * update)

    # One traced graph for the loss and its gradient: eagerly, a step dispatched ~1500 small ops
    # from Python (1.1 s per step on the loaded 2-core machine). No autograph: the loops are
    # Python loops over views, and converting the code took 24 s.
    @tf.function(autograph=False)
    def loss_and_gradients():
        with tf.GradientTape() as tape:
            total, terms = loss_terms()
        return total, terms, tape.gradient(total, variables)

    def evaluate():
        total, terms, _ = loss_and_gradients()
        return float(total), {k: float(v) for k, v in terms.items()}

    first = None
    best = None
    steps = 0
    log.debug("refine: setup %.2f s", time.perf_counter() - started)
    for step in range(1, settings.max_steps + 1):
        if cancel is not None and cancel():
            raise Cancelled("registration cancelled")
        total, terms, grads = loss_and_gradients()
        value = float(total)
        snapshot = {k: float(v) for k, v in terms.items()}
        if first is None:
            first = snapshot
        if best is None or value < best[0]:
            best = (value, snapshot, [v.numpy().copy() for v in variables])
        adam_step(grads, step)
        steps = step
        log.debug("refine: step %d %.2f s loss %.4f", step, time.perf_counter() - started, value)
        yield step / settings.max_steps, f"Refining on the radiographs ({step}/{settings.max_steps})"
        if time.perf_counter() - started > settings.time_limit_s:
            log.info("refinement stopped after %d steps by its time limit", step)
            break
    value, snapshot = evaluate()
    if value < best[0]:
        best = (value, snapshot, [v.numpy().copy() for v in variables])

    loss_before, loss_after = first["total"], best[0]
    used = loss_after < loss_before - settings.min_improvement * abs(loss_before)
    corrections: list[np.ndarray | None] = [None] * num_views
    new_psi = psi
    if used:
        for var, saved in zip(variables, best[2]):
            var.assign(saved)
        log.info("refinement: similarity %s, displacement rms %.2f mm, poses %s %s", np.round(dp.numpy(), 3),
                 float(np.sqrt(np.mean(dv.numpy() ** 2))), np.round(pose_angles.numpy(), 2),
                 np.round(pose_shift.numpy(), 2))
        linear, shift = (x.numpy() for x in similarity())
        new_psi = corrected_field(psi, grid, dv.numpy(), coarse_shape, linear, shift, centre_mm)
        if calibrated:
            matrices = _pose_matrices(tf, pose_angles, pose_shift, centre_mm).numpy()
            for i, view in enumerate(calibrated):
                corrections[view] = matrices[i]
    result = RefineResult(
        used=bool(used), psi=new_psi, pose_corrections=corrections, loss_before=float(loss_before),
        loss_after=float(loss_after), terms_before=first, terms_after=best[1], steps=steps,
        time_s=time.perf_counter() - started, centre_mm=centre_mm)
    log.info("refinement: loss %.4f -> %.4f in %d steps (%.1f s), %s", loss_before, loss_after, steps,
             result.time_s, "used" if used else "not used")
    return result


def _shrunk_mask(fraction: np.ndarray, shrink_px: float) -> np.ndarray:
    """A soft mask (area fractions) with its outline moved inwards by ``shrink_px`` pixels."""
    from scipy import ndimage

    if shrink_px <= 0:
        return fraction.astype(np.float32)
    inside = fraction >= 0.5
    depth = ndimage.distance_transform_edt(inside) - 0.5  # pixels from the outline, inside
    return np.clip(depth - shrink_px + 0.5, 0.0, 1.0).astype(np.float32) * inside


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_fill_holes(ndimage.binary_closing(mask, iterations=2))


def corrected_field(psi: np.ndarray, grid, displacement_mm: np.ndarray, coarse_shape, linear: np.ndarray,
                    shift_mm: np.ndarray, centre_mm: np.ndarray, iterations: int = 15) -> np.ndarray:
    """The pull-back field of the corrected registration, ``psi'(y) = psi(C^-1(y))`` (grid voxels).

    ``C(x) = centre + linear (x - centre + d(x)) + shift``; ``C^-1(y)`` solves
    ``x + d(x) = centre + linear^-1 (y - centre - shift)`` by the fixed point ``x <- b - d(x)``.
    The inverse's smooth part ``-d`` is solved on the coarse grid of ``d`` and interpolated
    (d is itself interpolated from that grid), the similarity is exact everywhere.
    """
    from scipy import ndimage

    shape = tuple(psi.shape[:3])
    i2w = np.asarray(grid.index_to_world(), float)
    w2i = np.linalg.inv(i2w)
    coarse_shape = tuple(coarse_shape)
    to_coarse = (np.array(coarse_shape[::-1], float) - 1) / (np.array(shape[::-1], float) - 1)  # per x, y, z
    upper = np.array(coarse_shape, float) - 1

    def d_at(world_points):
        ijk = (w2i @ np.c_[world_points, np.ones(len(world_points))].T).T[:, :3] * to_coarse
        coords = np.clip(ijk[:, ::-1], 0, upper).T
        return np.stack([ndimage.map_coordinates(displacement_mm[..., c], coords, order=1, mode="nearest")
                         for c in range(3)], -1)

    # On the coarse grid's nodes b (in the "x + d(x)" space): the x with x + d(x) = b.
    nodes_zyx = np.indices(coarse_shape, dtype=np.float64).reshape(3, -1).T
    nodes_ijk = nodes_zyx[:, ::-1] / to_coarse
    b = (i2w @ np.c_[nodes_ijk, np.ones(len(nodes_ijk))].T).T[:, :3]
    x = b.copy()
    for _ in range(iterations):
        x = b - d_at(x)
    inverse_d = (x - b).reshape(coarse_shape + (3,))  # world mm, x y z components

    zyx = np.indices(shape, dtype=np.float32).reshape(3, -1).T
    world = (i2w @ np.c_[zyx[:, ::-1], np.ones(len(zyx))].T).T[:, :3]
    b_full = centre_mm + (np.linalg.inv(linear) @ (world - centre_mm - shift_mm).T).T
    ijk = (w2i @ np.c_[b_full, np.ones(len(b_full))].T).T[:, :3]
    coarse = np.clip((ijk * to_coarse)[:, ::-1], 0, upper).T
    source_world = b_full + np.stack([ndimage.map_coordinates(inverse_d[..., c], coarse, order=1, mode="nearest")
                                      for c in range(3)], -1)
    source_zyx = ((w2i @ np.c_[source_world, np.ones(len(source_world))].T).T[:, :3])[:, ::-1]
    clamped = np.clip(source_zyx, 0, np.array(shape, float) - 1).T
    psi_at = np.stack([ndimage.map_coordinates(psi[..., c], clamped, order=1, mode="nearest") for c in range(3)], -1)
    return (source_zyx + psi_at - zyx).reshape(shape + (3,)).astype(np.float32)


def warped_labels(labels: np.ndarray, psi: np.ndarray) -> np.ndarray:
    """The atlas label map warped by ``psi`` (nearest neighbour), uint8."""
    from inference.layers import warp as warp_lib

    warped = warp_lib.warp(np.asarray(labels, np.float32)[None, ..., None], np.asarray(psi, np.float32)[None],
                           interp="nearest")
    return np.asarray(warped)[0, ..., 0].round().astype(np.uint8)


def report_entry(result: RefineResult | None, view_names: list[str], frame,
                 warnings: list[str]) -> dict[str, Any]:
    """The ``refinement`` entry of report.json; appends a warning per view past the calibration limit.

    ``frame``: the case's :class:`inference.registration.RegistrationFrame`. The corrected cameras
    themselves are :meth:`~inference.registration.RegistrationFrame.with_pose_corrections`."""
    if result is None:
        return {"run": False}
    entry = {"run": True, "used": result.used, "loss_before": result.loss_before, "loss_after": result.loss_after,
             "terms_before": result.terms_before, "terms_after": result.terms_after, "steps": result.steps,
             "time_s": result.time_s, "self_calibration": {}}
    for name, correction in zip(view_names, result.calibration_report(frame)):
        if correction is None:
            continue
        entry["self_calibration"][name] = correction
        if correction["exceeds_limit"]:
            warnings.append(f"view '{name}': its recorded calibration looks wrong: the images fit a camera "
                            f"turned by {correction['rotation_deg']:.1f} deg and shifted by "
                            f"{correction['shift_at_head_mm']:.1f} mm at the hip (limits {CALIBRATION_LIMIT_DEG:.0f} deg, "
                            f"{CALIBRATION_LIMIT_MM:.0f} mm); check the view's angle and calibration")
    return entry
