"""Full-resolution outputs: the paper-grid atlas warped by the network's (upsampled) field.

The network predicts its displacement ``psi`` on its own grid (the compact grid: 1.328 x 1.328 x
2 mm). Its outputs would inherit that resolution: a perfect femur label resampled to the compact
grid and back already loses about 0.025 Dice and 0.36 mm ASSD (issue 13). Here the field is
upsampled to the grid twice as fine that covers the same box (``resources/atlas/paper``, 0.664 x
0.664 x 1 mm), and that atlas is warped with it:

* intensities (HU) linearly;
* labels softly: each label's indicator (one-hot) is warped linearly and thresholded at 0.5, so
  the boundary moves by sub-voxel amounts instead of inheriting a nearest-neighbour staircase;
  the femur's indicator is first blurred by 0.6 mm (:func:`femur_indicator`), which rounds off the
  atlas label map's own staircase.

Both grids must be axis-aligned and span the same box (voxel edges coincide at the box faces),
which :func:`spacing_ratio` verifies. The displacement convention is :mod:`inference.layers.warp`'s:
voxel units of the output grid, (dz, dy, dx), pull-back ``out(x) = atlas(x + u(x))``.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any

import numpy as np

from inference import workers
from inference.errors import DataError

log = logging.getLogger(__name__)

#: Name of the fine atlas used for the outputs.
FINE_ATLAS = "paper"
#: Standard deviation (mm) of the Gaussian that rounds off the femur label's staircase before it
#: is warped (:func:`femur_indicator`; 0: the plain indicator).
FEMUR_SMOOTHING_MM = 0.6
#: Blurred indicator values this close to 0 or 1 are set to 0 or 1.
SMOOTH_TAIL = 0.01


@dataclasses.dataclass(frozen=True)
class FineWarp:
    """The atlas warped onto the fine grid: label map (uint8), HU volume, soft femur indicator."""

    labels: np.ndarray
    volume_hu: np.ndarray
    femur_soft: np.ndarray
    grid: Any


def spacing_ratio(coarse_grid, fine_grid) -> np.ndarray:
    """Per-axis ratio (z, y, x) of coarse to fine spacing; both grids must span one box.

    Raises
    ------
    DataError
        The grids are not axis-aligned or do not cover the same box (the atlases do not belong
        together).
    """
    for grid in (coarse_grid, fine_grid):
        if not np.allclose(np.asarray(grid.direction, float), np.eye(3)):
            raise DataError("full-resolution output needs axis-aligned atlas grids")
    spacing_c = np.asarray(coarse_grid.spacing_xyz_mm, float)[::-1]
    spacing_f = np.asarray(fine_grid.spacing_xyz_mm, float)[::-1]
    lo_c = np.asarray(coarse_grid.origin_mm, float)[::-1] - spacing_c / 2
    lo_f = np.asarray(fine_grid.origin_mm, float)[::-1] - spacing_f / 2
    hi_c = lo_c + spacing_c * np.asarray(coarse_grid.shape_zyx)
    hi_f = lo_f + spacing_f * np.asarray(fine_grid.shape_zyx)
    if not (np.allclose(lo_c, lo_f, atol=0.05) and np.allclose(hi_c, hi_f, atol=0.05)):
        raise DataError(f"the fine atlas grid (box {lo_f.round(2)}..{hi_f.round(2)} mm) does not cover the "
                        f"network's grid (box {lo_c.round(2)}..{hi_c.round(2)} mm)")
    return spacing_c / spacing_f


def fine_grid_placed(coarse_placed, coarse_atlas_grid, fine_atlas_grid):
    """The fine atlas grid moved exactly as the coarse one was placed on the patient."""
    shift = np.asarray(coarse_placed.origin_mm, float) - np.asarray(coarse_atlas_grid.origin_mm, float)
    return dataclasses.replace(fine_atlas_grid, origin_mm=tuple(np.asarray(fine_atlas_grid.origin_mm) + shift))


def upsample_displacement(psi_zyx3: np.ndarray) -> np.ndarray:
    """The coarse displacement (coarse voxels) on the grid twice as fine (fine voxels), (Z, Y, X, 3).

    The same arithmetic as :class:`inference.layers.grid.UpsampleField`, the network's own x2
    upsampling (shared outer edges, linear weights 3/4 and 1/4, border values held; displacements
    double in fine voxels), so the fine field is exactly what the network would have produced with
    a full-resolution output layer; in numpy, so that a registration through ONNX Runtime never
    loads TensorFlow.
    """
    return np.moveaxis(upsample_displacement_channels(psi_zyx3), 0, -1)


def upsample_displacement_channels(psi_zyx3: np.ndarray, workspace: "Workspace | None" = None) -> np.ndarray:
    """:func:`upsample_displacement` channel first, (3, 2Z, 2Y, 2X): the layout
    ``map_coordinates`` takes, so the 14 M-value fine field is never transposed. With a
    ``workspace`` the result and every intermediate array are its (overwritten by its next use)."""
    # Doubling (voxels -> fine voxels) is exact in floating point, so it is done on the coarse
    # field, an eighth of the values, with the same result bit for bit.
    field = np.ascontiguousarray(np.moveaxis(np.asarray(psi_zyx3, np.float32), -1, 0)) * np.float32(2.0)
    for axis in (1, 2, 3):
        field = _upsample_axis(field, axis, workspace, f"upsampled_{axis}")
    return field


def _upsample_axis(field: np.ndarray, axis: int, workspace: "Workspace | None" = None,
                   name: str = "upsampled") -> np.ndarray:
    """x2 along ``axis``: even = 3/4 f[i] + 1/4 f[i-1], odd = 3/4 f[i] + 1/4 f[i+1], ends held.

    Written into one preallocated array with float32 operations in the layer's order: bitwise
    the result of ``take`` + ``stack`` per axis, in half its time (0.05 s of CPU for the demo's
    field)."""
    def at(index) -> tuple:
        where = [slice(None)] * field.ndim
        where[axis] = index
        return tuple(where)

    shape = list(field.shape)
    shape[axis] *= 2
    out = _scratch(workspace, name, shape, np.float32)
    three_quarters = np.multiply(np.float32(0.75), field, out=_scratch(workspace, "three_quarters", field.shape, np.float32))
    quarter = np.multiply(np.float32(0.25), field, out=_scratch(workspace, "quarter", field.shape, np.float32))
    even, odd = out[at(slice(0, None, 2))], out[at(slice(1, None, 2))]
    np.add(three_quarters[at(slice(1, None))], quarter[at(slice(None, -1))], out=even[at(slice(1, None))])
    np.add(three_quarters[at(slice(0, 1))], quarter[at(slice(0, 1))], out=even[at(slice(0, 1))])
    np.add(three_quarters[at(slice(None, -1))], quarter[at(slice(1, None))], out=odd[at(slice(None, -1))])
    np.add(three_quarters[at(slice(-1, None))], quarter[at(slice(-1, None))], out=odd[at(slice(-1, None))])
    return out


class Workspace:
    """Scratch arrays that successive full-resolution warps reuse, each kept by name.

    One warp of the demo allocates about 0.3 GB of scratch (the upsampled field and its
    intermediates, the sample points, their nearest voxels). Fresh memory is faulted in page by
    page, and on the 2-core development machine that made :func:`warp_fine` inside a registration
    take 0.33-0.88 s of CPU from one registration to the next where a loop of warps alone took a
    steady 0.34 s (session 15, ad hoc). Reused arrays are faulted in once, at the cost of keeping
    them between registrations. Returned results never live here. One warp at a time uses
    :data:`WORKSPACE` (a second, concurrent one gets none).
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.arrays: dict[str, np.ndarray] = {}

    def array(self, name: str, shape, dtype) -> np.ndarray:
        """The array ``name`` of this shape and dtype (contents undefined)."""
        shape = tuple(int(n) for n in shape)
        array = self.arrays.get(name)
        if array is None or array.shape != shape or array.dtype != np.dtype(dtype):
            self.arrays.pop(name, None)  # freed before its successor is allocated
            array = self.arrays[name] = np.empty(shape, dtype)
        return array


#: the workspace of :func:`warp_fine`
WORKSPACE = Workspace()


def _scratch(workspace: Workspace | None, name: str, shape, dtype) -> np.ndarray:
    """``workspace``'s array ``name``, or a fresh one without a workspace (contents undefined)."""
    return np.empty(shape, dtype) if workspace is None else workspace.array(name, shape, dtype)


def sample_coordinates(field_channels: np.ndarray, *, in_place: bool = False) -> np.ndarray:
    """Pull-back sample points ``x + field(x)`` (3, Z, Y, X) float32 of a channel-first field
    (written over ``field_channels`` when ``in_place`` and it is float32)."""
    coords = np.asarray(field_channels, np.float32) if in_place else np.array(field_channels, np.float32, copy=True)
    for axis in range(3):
        shape = [1, 1, 1]
        shape[axis] = coords.shape[axis + 1]
        coords[axis] += np.arange(shape[axis], dtype=np.float32).reshape(shape)
    return coords


def warp_linear(channels: list[np.ndarray], field: np.ndarray) -> list[np.ndarray]:
    """Pull-back warp ``out(x) = channel(x + field(x))`` of each channel, linear, zero outside.

    ``field`` is (Z, Y, X, 3) in voxels. scipy's ``map_coordinates`` is used here rather than the
    TensorFlow warp layer: on the 4.7 M-voxel fine grid it took 1.4 s for three channels on the
    2-core machine, the layer 2.1 s warm and 6.5 s with its first XLA compilation (a cold
    ``hipatlas register`` pays that).
    """
    coords = sample_coordinates(np.moveaxis(np.asarray(field, np.float32), -1, 0))
    return [_map_linear(c, coords) for c in channels]


def _map_linear(channel: np.ndarray, coords: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return ndimage.map_coordinates(np.asarray(channel, np.float32), coords, order=1, mode="constant", cval=0.0)


def labels_from_indicators(femur: np.ndarray, pelvis: np.ndarray) -> np.ndarray:
    """Label map (0, 1 femur, 2 pelvis) of the warped indicators: each thresholded at 0.5, the
    femur winning ties."""
    labels = np.zeros(femur.shape, np.uint8)
    labels[(pelvis >= 0.5) & (pelvis > femur)] = 2
    labels[(femur >= 0.5) & (femur >= pelvis)] = 1
    return labels


def warp_fine(fine_atlas, psi_coarse: np.ndarray, coarse_grid_placed, coarse_atlas_grid, *,
              dense: bool = False) -> FineWarp:
    """Warp the fine atlas by the coarse field ``psi_coarse`` (Z, Y, X, 3, coarse voxels).

    Returns the label map (0 background, 1 femur, 2 pelvis), the HU volume and the femur's soft
    indicator (for a smooth surface) on the fine grid placed like ``coarse_grid_placed``.

    Intensities are warped linearly; labels as each label's indicator warped linearly and
    thresholded at 0.5. Linear interpolation at a sample point weighs the eight voxels around
    it, all of which lie in the 3x3x3 neighbourhood of its nearest voxel: where that
    neighbourhood holds a single value (most of the atlas: 88 % of the paper atlas's HU voxels,
    92 % of its label voxels), the result is that value, so only the other samples are
    interpolated (:func:`warp_linear_sparse`). Samples beyond the grid are 0 without looking
    (48 % of them on the demo). On the demo this cut the warp to the 4.7 M-voxel fine grid from
    0.68 s to 0.25 s of CPU (``benchmarks/bench_warm_register.py``: ``fullres_warp_*_cpu_s``).
    ``dense`` interpolates everything (the plain method, which the other is tested against).
    """
    ratio = spacing_ratio(coarse_atlas_grid, fine_atlas.geometry)
    if not np.allclose(ratio, 2.0):
        raise DataError(f"the fine atlas must be twice as fine as the network's grid on every axis, not {ratio}")
    fine_grid = fine_grid_placed(coarse_grid_placed, coarse_atlas_grid, fine_atlas.geometry)
    labels_in = np.asarray(fine_atlas.labels)
    volume = np.asarray(fine_atlas.volume, np.float32)
    workspace = WORKSPACE if WORKSPACE.lock.acquire(blocking=False) else None
    try:
        coords = sample_coordinates(upsample_displacement_channels(psi_coarse, workspace), in_place=True)
        # HU + 1000 so that the zero padding outside the atlas grid reads as air, not water.
        shifted = _plus_1000(volume)
        femur_in = femur_indicator(fine_atlas)
        if dense:
            hu = _map_linear(shifted, coords)
            femur = _map_linear(femur_in, coords)
            pelvis = _map_linear((labels_in == 2).astype(np.float32), coords)
            labels = labels_from_indicators(femur, pelvis)
        else:
            nearest = nearest_voxels(coords, labels_in.shape, workspace)
            # the intensities and the labels side by side (inference.workers)
            hu, (labels, femur) = workers.both(
                lambda: warp_linear_sparse(shifted, coords, nearest, constant_neighbourhoods(volume)),
                lambda: _warp_labels_sparse(labels_in, femur_in, coords, nearest))
    finally:
        if workspace is not None:
            workspace.lock.release()
    hu -= np.float32(1000.0)
    return FineWarp(labels=labels, volume_hu=hu, femur_soft=femur, grid=fine_grid)


class _DerivedArrays:
    """Arrays computed from an input array (the atlas's, warped at every registration), kept for
    the last ``keep`` inputs, each known by identity and the other arguments (a weak reference: a
    new array with the same ``id`` is not mistaken for a freed one). Inputs that cannot be weakly
    referenced are not kept."""

    def __init__(self, compute, keep: int):
        self.compute, self.keep = compute, keep
        self.entries: dict[int, tuple[Any, np.ndarray]] = {}

    def __call__(self, array: np.ndarray, *args) -> np.ndarray:
        """``compute(array, *args)``, from the cache when the same array came with the same ``args``
        (hashable)."""
        import weakref

        key = (id(array), args)
        cached = self.entries.get(key)
        if cached is not None and cached[0]() is array:
            return cached[1]
        derived = self.compute(array, *args)
        try:
            reference = weakref.ref(array)
        except TypeError:
            return derived
        if len(self.entries) >= self.keep:
            self.entries.pop(next(iter(self.entries)))
        self.entries[key] = (reference, derived)
        return derived


def _shifted_by_1000(volume: np.ndarray) -> np.ndarray:
    shifted = volume + np.float32(1000.0)
    shifted.setflags(write=False)
    return shifted


#: ``volume + 1000`` (float32, read-only) of the last atlas volume warped
_plus_1000 = _DerivedArrays(_shifted_by_1000, keep=1)


def _constant_neighbourhoods(array: np.ndarray) -> np.ndarray:
    # Built up axis by axis from equalities of neighbours (x, then y, then z): a 3x3x3 block holds
    # one value when its nine x-lines do and their centres form a constant 3x3 block in (z, y).
    # 5x faster than comparing 3x3x3 minimum and maximum filters (0.1 s per 4.7 M-voxel atlas
    # array, paid by the first registration of a process); the same result.
    a = np.asarray(array)
    constant = np.zeros(a.shape, bool)
    if min(a.shape) < 3:
        return constant  # every voxel's neighbourhood reaches outside the grid (zero padding)
    lines_x = (a[:, :, :-2] == a[:, :, 1:-1]) & (a[:, :, 1:-1] == a[:, :, 2:])
    centre = a[:, :, 1:-1]
    planes = lines_x[:, :-2] & lines_x[:, 1:-1] & lines_x[:, 2:]
    planes &= (centre[:, :-2] == centre[:, 1:-1]) & (centre[:, 1:-1] == centre[:, 2:])
    centre = centre[:, 1:-1]
    blocks = planes[:-2] & planes[1:-1] & planes[2:]
    blocks &= (centre[:-2] == centre[1:-1]) & (centre[1:-1] == centre[2:])
    # a border voxel's neighbourhood reaches outside the grid (zero padding): never constant
    constant[1:-1, 1:-1, 1:-1] = blocks
    return constant


#: True where a voxel's 3x3x3 neighbourhood lies inside the grid and holds one value only
#: (cached for the last three arrays: the atlas's labels, HU and smoothed femur indicator, warped
#: at every registration)
constant_neighbourhoods = _DerivedArrays(_constant_neighbourhoods, keep=3)


def _smoothed_indicator(labels: np.ndarray, label: int, sigma_zyx_vox: tuple[float, ...]) -> np.ndarray:
    from scipy import ndimage

    inside = np.asarray(labels) == label
    smooth = inside.astype(np.float32)
    if inside.any() and max(sigma_zyx_vox) > 0:
        # Only the label's bounding box and the blur's reach around it change (half the grid).
        reach = [int(np.ceil(4.0 * s)) + 1 for s in sigma_zyx_vox]
        box = tuple(slice(max(0, int(i.min()) - r), min(n, int(i.max()) + 1 + r))
                    for i, r, n in zip(np.nonzero(inside), reach, inside.shape))
        smooth[box] = ndimage.gaussian_filter(smooth[box], sigma_zyx_vox, mode="nearest")
    # Exactly 0 or 1 where the blur's tail alone is left: the 0.5 level is untouched, and the
    # sparse warp interpolates only within about 2.3 sigma of the surface.
    smooth[smooth < SMOOTH_TAIL] = 0.0
    smooth[smooth > 1.0 - SMOOTH_TAIL] = 1.0
    smooth.setflags(write=False)
    return smooth


#: The atlas's femur indicator blurred by :data:`FEMUR_SMOOTHING_MM` (cached for the last atlas)
smoothed_indicator = _DerivedArrays(_smoothed_indicator, keep=1)


def femur_indicator(fine_atlas) -> np.ndarray:
    """The femur indicator that is warped (float32, read-only): the atlas's femur label blurred
    by a Gaussian of :data:`FEMUR_SMOOTHING_MM` (or the plain indicator when that is 0).

    Thresholded at 0.5, the plain indicator's surface is the label map's staircase: the warped
    femur inherits it and, with a perfect field, scores Dice 0.991 against the atlas's own
    surface (random smooth fields of 1-3 mm on the paper atlas, against the TLEM2 distance field
    it was made from; session 16). Blurred by 0.6 mm the staircase's corners are rounded off:
    0.996."""
    spacing_zyx = np.asarray(fine_atlas.geometry.spacing_xyz_mm, float)[::-1]
    return smoothed_indicator(fine_atlas.labels, 1, tuple(float(v) for v in FEMUR_SMOOTHING_MM / spacing_zyx))


@dataclasses.dataclass(frozen=True)
class NearestVoxels:
    """Where pull-back samples fall on a grid: ``flat`` (Z, Y, X) int32, the flat index of each
    sample's nearest voxel (0 for samples outside); ``outside``, the samples beyond the grid on
    some axis (coordinate < 0 or > n - 1), which linear interpolation with ``mode="constant"``
    sets to 0 without looking at any voxel."""

    flat: np.ndarray
    outside: np.ndarray


def nearest_voxels(coords: np.ndarray, shape: tuple[int, ...], workspace: Workspace | None = None) -> NearestVoxels:
    """The nearest voxel of each sample point ``coords`` (3, Z, Y, X) on a grid of ``shape``
    (in ``workspace``'s arrays when given)."""
    outside = _scratch(workspace, "outside", coords.shape[1:], bool)
    beyond = _scratch(workspace, "beyond", coords.shape[1:], bool)
    outside[...] = False
    for axis in range(3):
        outside |= np.less(coords[axis], 0, out=beyond)
        outside |= np.greater(coords[axis], shape[axis] - 1, out=beyond)
    # int(p + 0.5) rounds the coordinates inside [0, n - 1] to the nearest voxel; written in place
    # as int32: a third of the time of floor + astype(int64) on these 14 M values.
    nearest = _scratch(workspace, "nearest", coords.shape, np.int32)
    np.add(coords, np.float32(0.5), out=nearest, casting="unsafe")
    flat = nearest[0]  # the flat index, over the z index (not needed after)
    flat *= np.int32(shape[1])
    flat += nearest[1]
    flat *= np.int32(shape[2])
    flat += nearest[2]
    flat[outside] = 0
    return NearestVoxels(flat, outside)


def warp_linear_sparse(volume: np.ndarray, coords: np.ndarray, nearest: NearestVoxels,
                       constant: np.ndarray) -> np.ndarray:
    """``map_coordinates(volume, coords, order=1, mode="constant")`` interpolating only where it
    can differ from the nearest voxel's value: samples inside the grid whose nearest voxel's
    neighbourhood is not ``constant``. Samples outside are 0; the others take the nearest voxel's
    value (the interpolated one up to float rounding: the weights sum to 1)."""
    out = np.asarray(volume, np.float32).ravel()[nearest.flat]
    out[nearest.outside] = 0.0
    varying = ~(constant.ravel()[nearest.flat] | nearest.outside)
    out[varying] = _map_linear(volume, coords[:, varying])
    return out


def _warp_labels_sparse(labels_in: np.ndarray, femur_in: np.ndarray, coords: np.ndarray,
                        nearest: NearestVoxels) -> tuple[np.ndarray, np.ndarray]:
    """(labels, soft femur indicator) of the warp of ``labels_in`` with the femur indicator
    ``femur_in``, as the dense method: the indicators interpolated and thresholded, where the
    neighbourhood holds more than one label or femur indicator value."""
    labels = labels_in.ravel()[nearest.flat].astype(np.uint8)
    labels[nearest.outside] = 0
    constant = constant_neighbourhoods(labels_in).ravel()[nearest.flat]
    constant &= constant_neighbourhoods(femur_in).ravel()[nearest.flat]
    varying = ~(constant | nearest.outside)
    points = coords[:, varying]
    femur_varying = _map_linear(femur_in, points)
    labels[varying] = labels_from_indicators(femur_varying, _map_linear((labels_in == 2).astype(np.float32), points))
    femur = femur_in.ravel()[nearest.flat]
    femur[nearest.outside] = 0.0
    femur[varying] = femur_varying
    return labels, femur


_FINE_ATLAS_CACHE: dict[str, Any] = {}
#: held while a fine atlas is loaded and its derived arrays are made (a prefetch and a warp)
_FINE_ATLAS_LOCK = threading.Lock()


def _loaded_fine_atlas(name: str):
    """The fine atlas ``name``, loaded once per process with the arrays every warp of it derives
    (:func:`warp_fine`'s cached ``volume + 1000``, femur indicator and constant neighbourhoods)."""
    from inference.data import atlas as atlas_lib

    with _FINE_ATLAS_LOCK:
        if name not in _FINE_ATLAS_CACHE:
            fine = atlas_lib.load_atlas(name)
            volume = np.asarray(fine.volume, np.float32)
            _plus_1000(volume)
            constant_neighbourhoods(volume)
            constant_neighbourhoods(np.asarray(fine.labels))
            constant_neighbourhoods(femur_indicator(fine))
            _FINE_ATLAS_CACHE[name] = fine
        return _FINE_ATLAS_CACHE[name]


def prefetch_fine_atlas(name: str = FINE_ATLAS) -> threading.Thread | None:
    """Start loading the fine atlas ``name`` (and its derived arrays) on a background thread, unless
    this process has it: the first full-resolution registration of a process otherwise pays
    0.3 s for it after the network (``register_case`` starts this before it reads the case, so that
    it runs beside the case's loading and the model's). A failure is left for the warp, which
    loads it again and reports it. Returns the thread, or None when there is nothing to do."""
    from inference import resources  # noqa: F401 - imported on the caller's thread, not beside its imports
    from inference.data import atlas as atlas_lib  # noqa: F401 - (the thread imports SimpleITK alone)

    if name in _FINE_ATLAS_CACHE:
        return None

    def load():
        try:
            _loaded_fine_atlas(name)
        except Exception as error:  # noqa: BLE001 - see above
            log.debug("fine atlas prefetch failed: %s", error)

    # not a daemon: a process that ends meanwhile (a refused case) waits for it, never cuts a read short
    thread = threading.Thread(target=load, name="hipatlas-fine-atlas")
    thread.start()
    return thread


def fine_atlas_for(coarse_atlas, name: str = FINE_ATLAS):
    """The fine atlas ``name`` when it covers the coarse atlas's box twice as finely, else None."""
    if coarse_atlas.grid == name:
        return None
    fine = _loaded_fine_atlas(name)
    try:
        ratio = spacing_ratio(coarse_atlas.geometry, fine.geometry)
    except DataError as error:
        log.warning("no full-resolution output: %s", error)
        return None
    return fine if np.allclose(ratio, 2.0) else None


def pull_back_voxels(outputs: list[np.ndarray], volumes, voxels_kji, source_mm: np.ndarray, grid) -> None:
    """Set the voxels ``voxels_kji`` (three index arrays) of each of ``outputs`` to its volume of
    ``volumes`` interpolated (linear, edge values beyond the grid) at ``source_mm`` (N, 3: world
    points on ``grid``): the pull-back of a local move (the shaft fit's, the head anchor's, the
    outline fit's)."""
    from scipy import ndimage

    i2w = np.asarray(grid.index_to_world(), np.float64)
    w2i = np.linalg.inv(i2w)
    index = source_mm @ w2i[:3, :3].T + w2i[:3, 3]  # continuous (i, j, k)
    coords = np.stack([index[:, 2], index[:, 1], index[:, 0]])

    def pulled(volume):
        return ndimage.map_coordinates(np.asarray(volume, np.float32), coords, order=1, mode="nearest")

    for out, values in zip(outputs, workers.thread_map(pulled, volumes)):  # the volumes side by side
        out[voxels_kji] = values


def grown_box(voxels_zyx, reach_mm: float, spacing_zyx, shape) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) per axis (z, y, x): the box of the voxels ``voxels_zyx`` (three index arrays) grown
    by ``reach_mm`` and two voxels, within ``shape``; the box :func:`near_boundary` searches for a
    local move of that reach."""
    margin = np.ceil(reach_mm / np.asarray(spacing_zyx, float)).astype(int) + 2
    lo = np.maximum(np.array([v.min() for v in voxels_zyx]) - margin, 0)
    hi = np.minimum(np.array([v.max() for v in voxels_zyx]) + margin + 1, shape)
    return lo, hi


def near_boundary(mask: np.ndarray, lo, hi, reach_mm: float, spacing_zyx, reach_at=None) -> tuple[np.ndarray, ...]:
    """Index arrays (k, j, i) of the voxels of the box ``lo:hi`` (per axis, z y x) of ``mask`` that
    lie within ``reach_mm`` of its boundary, found on a twice coarser grid (2 x 2 x 2 blocks that
    hold both mask and not, grown by the reach and a block's diagonal): the voxels that a local
    move of at most ``reach_mm`` can take across the boundary (the shaft fit's, the outline fit's).

    ``reach_at``, if given, narrows that per block: called with the blocks' centres (an (N, 3)
    array of voxel indices k, j, i on the whole grid) within ``reach_mm``, it returns how far the
    move reaches there (mm)."""
    from scipy import ndimage

    spacing_zyx = np.asarray(spacing_zyx, float)
    block = np.asarray(mask[tuple(slice(a, b) for a, b in zip(lo, hi))], bool)
    pad = [(0, (-n) % 2) for n in block.shape]
    padded = np.pad(block, pad, mode="edge")
    # any and all over each 2 x 2 x 2 block from its eight corner lattices (strided views): the
    # same as any/all over the axes of a 6-D reshape, which numpy reduced 10x slower
    corners = [padded[a::2, b::2, c::2] for a in (0, 1) for b in (0, 1) for c in (0, 1)]
    some, every = corners[0].copy(), corners[0].copy()
    for corner in corners[1:]:
        some |= corner
        every &= corner
    mixed = some & ~every
    distance = ndimage.distance_transform_edt(~mixed, sampling=2 * spacing_zyx)
    diagonal = float(np.linalg.norm(2 * spacing_zyx))
    near = distance <= reach_mm + diagonal
    if reach_at is not None and near.any():
        blocks_kji = np.nonzero(near)
        centres = np.stack(blocks_kji, 1) * 2.0 + 0.5 + np.asarray(lo, float)
        near[blocks_kji] = distance[blocks_kji] <= np.asarray(reach_at(centres), float) + diagonal
    near = near.repeat(2, 0).repeat(2, 1).repeat(2, 2)[tuple(slice(0, n) for n in block.shape)]
    return tuple(c + o for c, o in zip(np.nonzero(near), lo))
