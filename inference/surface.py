"""Surfaces of label maps in world millimetres (marching cubes from scikit-image, no VTK).

:func:`label_surface` turns one label of a ``(z, y, x)`` label map into a closed triangle
:class:`~inference.mesh.Mesh` in world LPS mm with outward normals, using the volume's
:class:`~inference.geometry.VolumeGeometry` (origin, anisotropic spacing, any direction, including
a left-handed one). :func:`write_surface_stl` writes it as binary STL atomically.
"""

from __future__ import annotations

import logging
import math
import os
import pathlib

import numpy as np
from scipy import ndimage

from inference import validate
from inference.errors import DataError, GeometryError, MeshError
from inference.mesh import Mesh, write_stl

logger = logging.getLogger(__name__)

__all__ = ["label_surface", "write_surface_stl"]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    # 26-connectivity: voxels touching at a corner belong together, as they do for the
    # marching-cubes surface after smoothing.
    components, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if count <= 1:
        return mask
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    keep = int(np.argmax(sizes))
    logger.info("label surface: kept the largest of %d connected components (%d voxels)", count, int(sizes[keep]))
    return components == keep


def _bounding_box(mask: np.ndarray, step: int = 1) -> tuple[slice, ...] | None:
    """Slices (z, y, x) of the smallest box holding the mask, its start a multiple of ``step``
    (so that coarser marching cubes sample the same voxels as on the whole grid); None if empty."""
    box = []
    for axis in range(3):
        occupied = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        if occupied.size == 0:
            return None
        box.append(slice(int(occupied[0]) // step * step, int(occupied[-1]) + 1))
    return tuple(box)


def label_surface(
    labels_zyx: np.ndarray,
    geometry,
    label: int = 1,
    smooth_sigma_vox: float = 0.7,
    step_size: int = 1,
    largest_component: bool = True,
    soft: np.ndarray | None = None,
) -> Mesh:
    """Closed surface of one label, in world mm, outward normals.

    Parameters
    ----------
    labels_zyx : np.ndarray
        Integer or bool label map ``(Z, Y, X)`` on ``geometry``'s grid.
    geometry : VolumeGeometry
        Grid of ``labels_zyx``; vertices are mapped with ``geometry.index_to_world()``.
    label : int
        The label whose boundary is extracted (``labels == label``).
    smooth_sigma_vox : float
        Gaussian sigma in voxels applied to the binary mask before the 0.5 iso-surface (0 = none).
        A light blur removes the staircase of a voxelised shape; the surface of a straight edge
        does not move, convex corners round off by a fraction of a voxel.
    step_size : int
        Marching-cubes step in voxels (>1 = coarser, fewer triangles).
    largest_component : bool
        Keep only the largest 26-connected component of the label (drops stray islands).
    soft : np.ndarray, optional
        A continuous indicator of the label on the same grid, 0..1, whose 0.5 level is the label's
        boundary (the warped atlas's soft femur, :class:`inference.fullres.FineWarp`). Its 0.5
        level is taken instead of the blurred mask's (``smooth_sigma_vox`` is then ignored), so
        the surface follows the boundary's sub-voxel position instead of the voxels' staircase.
        Only its values within one voxel of the (kept) label count.

    Returns
    -------
    Mesh
        Vertices (N, 3) world mm, triangles wound counter-clockwise seen from outside. Voxels on the
        border of the grid are closed off: the surface runs half a voxel outside them.

    Raises
    ------
    DataError
        The label map is not 3D, does not match the geometry, or holds no voxel of ``label``.
    """
    from skimage.measure import marching_cubes

    labels = np.asarray(labels_zyx)
    if labels.ndim != 3:
        raise DataError(f"label map must be 3D (z, y, x), not of shape {labels.shape}")
    if tuple(labels.shape) != tuple(int(s) for s in geometry.shape_zyx):
        raise DataError(
            f"label map of shape {labels.shape} does not match its geometry shape_zyx {tuple(geometry.shape_zyx)}"
        )
    validate.number(smooth_sigma_vox, "smooth_sigma_vox", 0)
    step_size = validate.positive_int(step_size, "step_size")

    mask = labels == label
    box = _bounding_box(mask, int(step_size))
    if box is None:
        raise DataError(f"the label map holds no voxel with label {label}; no surface to extract")
    if soft is not None:
        if np.shape(soft) != labels.shape:
            raise DataError(f"the soft indicator's shape {np.shape(soft)} differs from the label map's {labels.shape}")
        smooth_sigma_vox = 0.0
        # one voxel more on every side: the 0.5 level lies between a label voxel and its neighbour
        box = tuple(slice(max(0, b.start - int(step_size)), min(n, b.stop + 1)) for b, n in zip(box, labels.shape))
    # Everything below runs on the label's bounding box: outside it the mask is 0, and so are the
    # blurred field and the surface (the femur fills 41 % of the paper grid's box, 9 % of its voxels).
    mask = mask[box]
    if largest_component:
        mask = _largest_component(mask)

    # Zero padding closes surfaces that touch the grid border. With smoothing the blur spreads
    # the mask outwards, so pad by its reach too (values beyond ~2 sigma stay far below 0.5, and
    # one more voxel guarantees a 0 rim everywhere).
    pad = 1 + (int(math.ceil(2.0 * smooth_sigma_vox)) if smooth_sigma_vox > 0 else 0)
    if soft is not None:
        near = ndimage.binary_dilation(mask, structure=np.ones((3, 3, 3), dtype=bool))
        field = np.pad(np.where(near, np.asarray(soft, np.float32)[box], np.float32(0.0)), pad, mode="constant")
    else:
        field = np.pad(mask.astype(np.float32), pad, mode="constant")
    if smooth_sigma_vox > 0:
        field = ndimage.gaussian_filter(field, sigma=float(smooth_sigma_vox), mode="constant", truncate=3.0)
        if field.max() <= 0.5:
            raise DataError(
                f"label {label} is too thin to survive smoothing with sigma {smooth_sigma_vox} voxels; "
                "use a smaller smooth_sigma_vox"
            )
    verts_zyx, faces, _normals, _values = marching_cubes(
        field, level=0.5, step_size=int(step_size), allow_degenerate=False
    )
    # (z, y, x) of the padded box -> (i, j, k) = (x, y, z) indices of the original grid.
    box_start_zyx = np.array([b.start for b in box], dtype=np.float64)
    ijk = (verts_zyx.astype(np.float64) - pad + box_start_zyx)[:, ::-1]
    index_mesh = Mesh(ijk, faces)
    # Orientation in index space is measured rather than assumed (it depends on scikit-image's
    # conventions and on reversing the axis order, an odd permutation). Positive signed volume =
    # outward; Mesh.transformed then keeps it outward for a left-handed direction (det < 0).
    signed = index_mesh.signed_volume_mm3()
    if signed < 0:
        index_mesh = index_mesh.flipped()
    index_to_world = np.asarray(geometry.index_to_world(), dtype=np.float64)
    if index_to_world.shape != (4, 4) or abs(np.linalg.det(index_to_world[:3, :3])) == 0:
        raise GeometryError("the volume geometry has a singular index-to-world matrix")
    mesh = index_mesh.transformed(index_to_world)
    if not mesh.is_closed():
        logger.warning("label surface of label %d is not closed (%d triangles)", label, mesh.n_faces)
    return mesh


def write_surface_stl(path: str | os.PathLike, mesh: Mesh) -> pathlib.Path:
    """Write ``mesh`` (world mm) as a binary STL, atomically.

    Raises
    ------
    MeshError
        The mesh has no triangles.
    """
    if mesh.n_faces == 0:
        raise MeshError(f"{path}: cannot write an empty surface (no triangles)")
    return write_stl(path, mesh, header="HipAtlas femur surface, world LPS mm")
