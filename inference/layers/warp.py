"""Spatial transforms of volumes: warping, diffeomorphic integration, 7-parameter affine.

Displacement-field convention (used by every function and layer in this module)
------------------------------------------------------------------------------
A displacement field ``u`` has shape (B, Z, Y, X, 3), lives on the *fixed* grid (the grid of the
output), is expressed in **voxel units** of that grid, and lists its components in **(dz, dy, dx)**
order, matching the array axes. Warping is *backward* (pull-back): the warped image is

    warped(x) = moving(x + u(x))        x = (z, y, x) voxel index of the fixed grid

so ``u(x)`` points from a fixed-grid voxel to the place in the moving image (the atlas) whose
value it receives. The map ``phi(x) = x + u(x)`` is the "transform" of a field. In HipAtlas the
atlas and the network's output share one canonical grid, so voxel indices of both coincide.

Composition order
-----------------
``compose_fields(inner, outer)`` returns the displacement of ``x -> outer(inner(x))``:

    u_total(x) = u_inner(x) + u_outer(x + u_inner(x))

The network's total transform is Psi = T o phi (the brief's "Psi = phi + T o phi" written as
displacements): a fixed-grid point first moves by the local diffeomorphism phi, then by the
affine T, and the atlas is sampled there: ``warped(x) = atlas(T(phi(x)))``. This is the same as
warping the affinely aligned atlas ``atlas(T(.))`` by phi, i.e. the local module refines the
output of the affine module. In a model:

    u_T    = AffineToField(...)(params)                     # affine module output
    phi    = VecInt(7)(velocity)                            # local module output
    u_tot  = ComposeAffine(...same args...)([phi, params])  # exact, preferred
    # or     ComposeFields()([phi, u_T])                     # dense, clamped outside the grid
    warped = SpatialTransformer()([atlas, u_tot])

7-parameter affine
------------------
``params`` (B, 7) are raw network outputs; zero means identity. With configurable units:

    angles_deg       = params[:, 0:3] * rotation_unit_deg     (about world x, y, z)
    translation_mm   = params[:, 3:6] * translation_unit_mm   (world x, y, z)
    scale            = exp(params[:, 6] * log_scale_unit)     (isotropic)
    R = Rz(angle_z) @ Ry(angle_y) @ Rx(angle_x)               (extrinsic x, then y, then z)
    T(p) = c + scale * R @ (p - c) + translation_mm           (p, c in world mm)

``T`` maps a point of the fixed (patient) space to the atlas point it takes its value from,
both in world mm; ``c`` is the rotation centre (the atlas grid centre unless given). Because
warping is backward, the *image content* of the atlas moves by ``T^-1``: an atlas feature at
world point ``a`` appears at ``T^-1(a)`` in the warped image.

Borders
-------
Images are sampled with zero padding, so warp images whose background is 0 (attenuation mu,
label maps, features), not HU, where 0 would be water. Displacement fields
are sampled with *border-clamped* coordinates instead: a field sampled outside its grid takes the
value of the nearest border voxel. With zero padding, a composition step ``u + u o (id + u)``
would read a displacement of 0 just outside the grid, so e.g. a constant translation would stop
doubling near the borders and integration would create a spurious shear/folding there; clamping
extends the field smoothly (constant extrapolation), and a constant velocity integrates to the
exact translation everywhere.

XLA
---
The resampling parts (warp, scaling and squaring, dense composition) run inside
``tf.function(jit_compile=True)``: the flat gathers of :mod:`inference.layers.sampling` are much
faster under XLA on CPU (compact grid, VecInt(7) + warp forward and backward: ~0.8 s CPU time
with XLA, ~3.5 s without). Only single steps are compiled (see :func:`integrate_velocity`).
Layers take ``jit_compile`` (default True) to switch this off, e.g. when an outer
``jit_compile`` model already compiles everything.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf

from inference.errors import ConfigError
from inference.layers.sampling import nearest_sample, portable, trilinear_sample
from inference.validate import whole_number

_PACKAGE = "hipatlas"
_INTERPOLATIONS = ("linear", "nearest")


# --------------------------------------------------------------------------------------------
# Pure functions (TF tensors)
# --------------------------------------------------------------------------------------------

def identity_grid(shape_zyx, dtype=tf.float32):
    """Voxel index of every voxel of a grid.

    Parameters
    ----------
    shape_zyx : sequence of 3 ints or int tensor (3,)
    dtype : tf.DType

    Returns
    -------
    tensor, shape (Z, Y, X, 3)
        ``grid[k, j, i] = (k, j, i)`` in (z, y, x) order.
    """
    axes = [tf.range(tf.cast(shape_zyx[a], tf.int32), dtype=tf.int32) for a in range(3)]
    zz, yy, xx = tf.meshgrid(*axes, indexing="ij")
    return tf.cast(tf.stack([zz, yy, xx], axis=-1), dtype)


def _grid_like(field):
    """Identity grid for a (B, Z, Y, X, 3) field, shaped (1, Z, Y, X, 3) to broadcast.

    Under :func:`~inference.layers.sampling.portable_ops` (static shapes) the three index ramps
    of :func:`_axis_grid`, added per component (:func:`_plus_grid`): an exporter would otherwise
    fold the whole grid into a constant of the model file (7 MB at the compact grid).
    """
    if portable():
        return _axis_grid(field.shape[1:4], field.dtype)
    return identity_grid(tf.shape(field)[1:4], field.dtype)[None]


def _axis_grid(shape_zyx, dtype):
    """The identity grid as three index ramps shaped (1, Z, 1, 1), (1, 1, Y, 1), (1, 1, 1, X)."""
    parts = []
    for axis in range(3):
        shape = [1, 1, 1, 1]
        shape[axis + 1] = int(shape_zyx[axis])
        parts.append(tf.reshape(tf.range(int(shape_zyx[axis]), dtype=dtype), shape))
    return tuple(parts)


def _plus_grid(field, grid, sign=1.0):
    """``field + sign * grid`` for a dense grid or the ramps of :func:`_axis_grid`; with ramps
    each component gets its own ramp (no chain of constant additions that a constant folder
    would merge into a dense grid)."""
    if isinstance(grid, tuple):
        return tf.stack([field[..., axis] + sign * grid[axis] for axis in range(3)], axis=-1)
    return field + grid if sign > 0 else field - grid


def _minus_grid(field, grid):
    return _plus_grid(field, grid, -1.0)


def sample_clamped(volume, coords_zyx):
    """Trilinear sampling with coordinates clamped to the grid (constant extrapolation).

    Used for displacement fields, where zero padding would be wrong (see the module docstring).

    Parameters
    ----------
    volume : tensor, shape (B, Z, Y, X, C)
    coords_zyx : tensor, shape (B, ..., 3), voxel indices (z, y, x)

    Returns
    -------
    tensor, shape (B, ..., C)
    """
    volume = tf.convert_to_tensor(volume)
    coords_zyx = tf.cast(coords_zyx, volume.dtype)
    upper = tf.cast(tf.shape(volume)[1:4] - 1, volume.dtype)
    # Clamping to [0, n-1] keeps every sample inside the grid; at exactly n-1 the upper
    # neighbour has weight 0, so the border value is reproduced exactly.
    clamped = tf.clip_by_value(coords_zyx, tf.zeros_like(upper), upper)
    return trilinear_sample(volume, clamped)


# The identity grid is built outside the XLA functions and passed in: built inside, XLA
# constant-folds it, which at the paper grid (4.7 M voxels) added seconds to every compile.
def _warp_impl(image, field, grid, interp):
    coords = _plus_grid(field, grid)
    if interp == "nearest":
        return nearest_sample(image, coords)
    return trilinear_sample(image, coords)


def _compose_impl(inner, outer, grid):
    coords = _plus_grid(inner, grid)
    return inner + sample_clamped(outer, coords)


_warp_xla = tf.function(_warp_impl, jit_compile=True, reduce_retracing=True, autograph=False)
_compose_xla = tf.function(_compose_impl, jit_compile=True, reduce_retracing=True, autograph=False)


def _check_interp(interp):
    if interp not in _INTERPOLATIONS:
        raise ConfigError(f"interp must be one of {_INTERPOLATIONS}, not {interp!r}")


def warp(image, field, interp="linear", jit_compile=True):
    """Warp ``image`` backward by a voxel-unit displacement field: ``image(x + field(x))``.

    Parameters
    ----------
    image : tensor, shape (B, Z, Y, X, C)
    field : tensor, shape (B, Z, Y, X, 3), components (dz, dy, dx) in voxels
    interp : {"linear", "nearest"}
        "linear" is trilinear and differentiable; "nearest" copies voxel values (label maps).
    jit_compile : bool
        Run the sampling under XLA.

    Returns
    -------
    tensor, shape (B, Z, Y, X, C)
        Zero where ``x + field(x)`` falls more than one voxel outside the image. Same dtype
        as ``image``, except integer images warped linearly, which come back as float32.
    """
    _check_interp(interp)
    image = tf.convert_to_tensor(image)
    field = tf.cast(field, tf.float32)
    fn = _warp_xla if jit_compile and not portable() else _warp_impl
    if interp == "nearest":
        return fn(image, field, _grid_like(field), interp)
    # Interpolate in float32 even under mixed precision: in (b)float16 the sample coordinates
    # themselves (up to ~200 voxels) would lose sub-voxel resolution.
    out = fn(tf.cast(image, tf.float32), field, _grid_like(field), interp)
    return tf.cast(out, image.dtype) if image.dtype.is_floating else out


def compose_fields(inner, outer, jit_compile=True):
    """Displacement of ``x -> outer_map(inner_map(x))``: ``u_in(x) + u_out(x + u_in(x))``.

    Parameters
    ----------
    inner, outer : tensor, shape (B, Z, Y, X, 3), voxel units (dz, dy, dx)
        ``outer`` is sampled with border clamping.
    jit_compile : bool

    Returns
    -------
    tensor, shape (B, Z, Y, X, 3)
    """
    inner = tf.cast(inner, tf.float32)
    outer = tf.cast(outer, tf.float32)
    fn = _compose_xla if jit_compile and not portable() else _compose_impl
    return fn(inner, outer, _grid_like(inner))


def integrate_velocity(velocity, num_steps=7, jit_compile=True, recompute=False):
    """Diffeomorphic displacement ``exp(v) - id`` of a stationary velocity field.

    Parameters
    ----------
    velocity : tensor, shape (B, Z, Y, X, 3), voxel units (dz, dy, dx)
    num_steps : int >= 0
        Number of squarings; the velocity is divided by ``2**num_steps`` first. 0 returns the
        velocity unchanged.
    jit_compile : bool
    recompute : bool
        Keep only each step's input for the backward pass and recompute the step there
        (``tf.recompute_grad``). Measured at the paper grid, batch 1, VecInt + warp forward and
        backward on CPU: peak memory 13 GB without, 4 GB with, for ~15 % more CPU time.

    Returns
    -------
    tensor, shape (B, Z, Y, X, 3)
    """
    # Scaling and squaring: exp(v) = (exp(v / 2^N))^(2^N), and for small v / 2^N the
    # displacement of exp is approximately v / 2^N itself. Each squaring composes the
    # current map with itself: u <- u + u o (id + u).
    # Only one squaring step is compiled (once per shape) and called N times. Measured on the
    # compact grid: compiling all N steps as one XLA cluster took ~20 s and its forward pass
    # (without a gradient tape) ran ~6.5 s instead of ~0.05 s, presumably because XLA fuses
    # the chained gathers and recomputes them; one step compiles in about a second.
    field = tf.cast(velocity, tf.float32) / float(2 ** int(num_steps))
    compose = _compose_xla if jit_compile and not portable() else _compose_impl
    if recompute and not portable():
        compose = tf.recompute_grad(compose)
    grid = _grid_like(field)
    for _ in range(int(num_steps)):
        field = compose(field, field, grid)
    return field


def rotation_matrix_xyz(angles_rad):
    """Rotation ``Rz(c) @ Ry(b) @ Rx(a)`` for angles (a, b, c) about the world x, y, z axes.

    Parameters
    ----------
    angles_rad : tensor, shape (B, 3)

    Returns
    -------
    tensor, shape (B, 3, 3)
    """
    angles_rad = tf.convert_to_tensor(angles_rad)
    cos, sin = tf.cos(angles_rad), tf.sin(angles_rad)
    one, zero = tf.ones_like(cos[:, 0]), tf.zeros_like(cos[:, 0])

    def mat(rows):
        return tf.stack([tf.stack(r, axis=-1) for r in rows], axis=-2)

    rx = mat([[one, zero, zero], [zero, cos[:, 0], -sin[:, 0]], [zero, sin[:, 0], cos[:, 0]]])
    ry = mat([[cos[:, 1], zero, sin[:, 1]], [zero, one, zero], [-sin[:, 1], zero, cos[:, 1]]])
    rz = mat([[cos[:, 2], -sin[:, 2], zero], [sin[:, 2], cos[:, 2], zero], [zero, zero, one]])
    return rz @ ry @ rx


def _linear_part(params, rotation_unit_deg, translation_unit_mm, log_scale_unit):
    """(scale * R (B,3,3), translation_mm (B,3)) from raw parameters."""
    params = tf.cast(params, tf.float32)
    angles = params[:, 0:3] * (rotation_unit_deg * math.pi / 180.0)
    translation = params[:, 3:6] * translation_unit_mm
    scale = tf.exp(params[:, 6] * log_scale_unit)
    return scale[:, None, None] * rotation_matrix_xyz(angles), translation


def params_to_matrix(params, center_mm, rotation_unit_deg=10.0, translation_unit_mm=10.0,
                     log_scale_unit=0.1):
    """World transform ``T`` (fixed point -> atlas point, mm) of 7 raw parameters.

    See the module docstring for the parameterisation; zero parameters give the identity.

    Parameters
    ----------
    params : tensor, shape (B, 7)
    center_mm : sequence of 3 floats or tensor (3,) or (B, 3)
        Rotation / scaling centre in world mm.
    rotation_unit_deg, translation_unit_mm, log_scale_unit : float
        Size of one unit of the raw parameters.

    Returns
    -------
    tensor, shape (B, 4, 4), float32, acting on homogeneous world points [x, y, z, 1].
    """
    linear, translation = _linear_part(params, rotation_unit_deg, translation_unit_mm,
                                       log_scale_unit)
    center = tf.cast(tf.convert_to_tensor(center_mm), tf.float32)
    center = tf.broadcast_to(tf.reshape(center, [-1, 3]), tf.shape(translation))
    offset = center + translation - tf.einsum("bij,bj->bi", linear, center)
    top = tf.concat([linear, offset[:, :, None]], axis=2)
    bottom = tf.broadcast_to(tf.constant([[[0.0, 0.0, 0.0, 1.0]]]), [tf.shape(top)[0], 1, 4])
    return tf.concat([top, bottom], axis=1)


def _reverse_xyz(matrix):
    """Reorder a (B, 4, 4) matrix on [i, j, k, 1] to act on [z, y, x, 1] (k, j, i)."""
    perm = tf.constant([2, 1, 0, 3])
    return tf.gather(tf.gather(matrix, perm, axis=1), perm, axis=2)


def world_to_voxel_matrix(world_matrix, index_to_world):
    """Express a world transform in voxel indices of a grid, in (z, y, x) order.

    Parameters
    ----------
    world_matrix : tensor, shape (B, 4, 4), on [x, y, z, 1] in mm
    index_to_world : array (4, 4)
        Grid matrix mapping [i, j, k, 1] (i = x index) to world mm.

    Returns
    -------
    tensor, shape (B, 4, 4), float32
        ``M`` with ``[z', y', x', 1] = M @ [z, y, x, 1]`` in voxel indices.
    """
    i2w = np.asarray(index_to_world, dtype=np.float64)
    w2i = np.linalg.inv(i2w)
    world_matrix = tf.cast(world_matrix, tf.float64)
    voxel = tf.constant(w2i) @ world_matrix @ tf.constant(i2w)
    return tf.cast(_reverse_xyz(voxel), tf.float32)


def affine_field(voxel_matrix_zyx, shape_zyx):
    """Dense displacement of an affine map given in voxel indices.

    Parameters
    ----------
    voxel_matrix_zyx : tensor, shape (B, 4, 4), acting on [z, y, x, 1]
    shape_zyx : sequence of 3 ints

    Returns
    -------
    tensor, shape (B, Z, Y, X, 3): ``M @ x - x`` at every voxel ``x``.
    """
    voxel_matrix_zyx = tf.cast(voxel_matrix_zyx, tf.float32)
    if portable():
        grid = _axis_grid(shape_zyx, tf.float32)
    else:
        grid = identity_grid(shape_zyx)[None]
    return _minus_grid(_apply_affine(voxel_matrix_zyx, grid), grid)


def _apply_affine(matrix, points):
    """Apply (B, 4, 4) to points (B or 1, Z, Y, X, 3)."""
    # Written per component so that a (1, Z, Y, X, 3) grid broadcasts against B matrices
    # without materialising a (B, Z, Y, X, 3, 3) product.
    coeff = matrix[:, None, None, None, :, :]
    out = coeff[..., :3, 3]
    for j in range(3):
        component = points[j][..., None] if isinstance(points, tuple) else points[..., j:j + 1]
        out = out + coeff[..., :3, j] * component
    return out


def compose_affine(inner, voxel_matrix_zyx):
    """Displacement of ``x -> A(inner_map(x))`` for an affine ``A`` (exact, no resampling).

    Unlike :func:`compose_fields` with a dense affine field, this evaluates the affine map
    analytically at ``x + u(x)``, so it stays exact where ``x + u(x)`` leaves the grid.

    Parameters
    ----------
    inner : tensor, shape (B, Z, Y, X, 3), voxel units (dz, dy, dx)
    voxel_matrix_zyx : tensor, shape (B, 4, 4), acting on [z, y, x, 1]

    Returns
    -------
    tensor, shape (B, Z, Y, X, 3)
    """
    inner = tf.cast(inner, tf.float32)
    grid = _grid_like(inner)
    return _minus_grid(_apply_affine(tf.cast(voxel_matrix_zyx, tf.float32), _plus_grid(inner, grid)), grid)


def jacobian_determinant(field):
    """Jacobian determinant of ``x -> x + field(x)`` by central differences.

    Parameters
    ----------
    field : tensor, shape (B, Z, Y, X, 3), voxel units (dz, dy, dx)

    Returns
    -------
    tensor, shape (B, Z-2, Y-2, X-2)
        Determinants at interior voxels; values <= 0 mark folding.
    """
    field = tf.cast(field, tf.float32)
    # d u / d axis for axis = z, y, x; central differences on the interior.
    dz = (field[:, 2:, 1:-1, 1:-1] - field[:, :-2, 1:-1, 1:-1]) / 2.0
    dy = (field[:, 1:-1, 2:, 1:-1] - field[:, 1:-1, :-2, 1:-1]) / 2.0
    dx = (field[:, 1:-1, 1:-1, 2:] - field[:, 1:-1, 1:-1, :-2]) / 2.0
    # Columns of the Jacobian are derivatives along z, y, x; rows are components dz, dy, dx.
    jac = tf.stack([dz, dy, dx], axis=-1) + tf.eye(3)
    return tf.linalg.det(jac)


# --------------------------------------------------------------------------------------------
# Keras layers
# --------------------------------------------------------------------------------------------

def _static_spatial(shape):
    return tuple(None if d is None else int(d) for d in shape[1:4])


def _check_field_shape(name, shape):
    if len(shape) != 5 or (shape[-1] is not None and int(shape[-1]) != 3):
        raise ConfigError(f"{name} must have shape (batch, Z, Y, X, 3), not {tuple(shape)}")


@keras.saving.register_keras_serializable(package=_PACKAGE)
class SpatialTransformer(keras.layers.Layer):
    """Backward warp of a volume by a voxel-unit displacement field.

    Call with ``[image, field]``: image (B, Z, Y, X, C), field (B, Z, Y, X, 3) in voxels,
    components (dz, dy, dx). Returns (B, Z, Y, X, C) = ``image(x + field(x))``, zero outside.

    Parameters
    ----------
    interp : {"linear", "nearest"}
        Trilinear (differentiable) or nearest neighbour (label maps; values are copied).
    jit_compile : bool
        Run the sampling under XLA (faster on CPU).
    """

    def __init__(self, interp="linear", jit_compile=True, **kwargs):
        super().__init__(**kwargs)
        _check_interp(interp)
        self.interp = interp
        self.jit_compile = bool(jit_compile)

    def build(self, input_shape):
        if not isinstance(input_shape, (list, tuple)) or len(input_shape) != 2:
            raise ConfigError("SpatialTransformer is called on [image, field]")
        image_shape, field_shape = input_shape
        if len(image_shape) != 5:
            raise ConfigError("SpatialTransformer image must have shape (batch, Z, Y, X, C), "
                              f"not {tuple(image_shape)}")
        _check_field_shape("SpatialTransformer field", field_shape)
        for a, b in zip(_static_spatial(image_shape), _static_spatial(field_shape)):
            if a is not None and b is not None and a != b:
                raise ConfigError(
                    "SpatialTransformer image and field must share the grid, got image "
                    f"{tuple(image_shape)} and field {tuple(field_shape)}")
        self.built = True

    def call(self, inputs):
        image, field = inputs
        return warp(image, field, self.interp, self.jit_compile)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[0])

    def get_config(self):
        config = super().get_config()
        config.update(interp=self.interp, jit_compile=self.jit_compile)
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class VecInt(keras.layers.Layer):
    """Scaling and squaring of a stationary velocity field into a diffeomorphic displacement.

    Input (B, Z, Y, X, 3) velocity in voxels (dz, dy, dx); output (B, Z, Y, X, 3) displacement
    of ``exp(v)``. Fields are resampled with border clamping (see the module docstring).

    Parameters
    ----------
    num_steps : int >= 0
        Number of squarings (velocity divided by ``2**num_steps``); 7 as in VoxelMorph.
    jit_compile : bool
    recompute : bool
        Trade time for memory in training (see :func:`integrate_velocity`).
    """

    def __init__(self, num_steps=7, jit_compile=True, recompute=False, **kwargs):
        super().__init__(**kwargs)
        self.num_steps = whole_number(num_steps, "num_steps", 0)
        self.jit_compile = bool(jit_compile)
        self.recompute = bool(recompute)

    def build(self, input_shape):
        _check_field_shape("VecInt velocity", input_shape)
        self.built = True

    def call(self, velocity):
        return integrate_velocity(velocity, self.num_steps, self.jit_compile, self.recompute)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(num_steps=self.num_steps, jit_compile=self.jit_compile,
                      recompute=self.recompute)
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ComposeFields(keras.layers.Layer):
    """Compose two dense displacement fields: call ``[inner, outer]`` -> ``outer o inner``.

    Output ``u_inner(x) + u_outer(x + u_inner(x))``, all (B, Z, Y, X, 3) in voxels. ``outer`` is
    resampled with border clamping. For an affine outer map prefer :class:`ComposeAffine`,
    which is exact where ``x + u_inner(x)`` leaves the grid.

    Parameters
    ----------
    jit_compile : bool
    """

    def __init__(self, jit_compile=True, **kwargs):
        super().__init__(**kwargs)
        self.jit_compile = bool(jit_compile)

    def build(self, input_shape):
        if not isinstance(input_shape, (list, tuple)) or len(input_shape) != 2:
            raise ConfigError("ComposeFields is called on [inner, outer]")
        _check_field_shape("ComposeFields inner", input_shape[0])
        _check_field_shape("ComposeFields outer", input_shape[1])
        self.built = True

    def call(self, inputs):
        inner, outer = inputs
        return compose_fields(inner, outer, self.jit_compile)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[0])

    def get_config(self):
        config = super().get_config()
        config.update(jit_compile=self.jit_compile)
        return config


def _validate_grid(shape_zyx, index_to_world, center_mm):
    shape = tuple(int(s) for s in shape_zyx)
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"shape_zyx must be 3 positive sizes, not {shape_zyx!r}")
    i2w = np.asarray(index_to_world, dtype=np.float64)
    if i2w.shape != (4, 4) or not np.all(np.isfinite(i2w)) \
            or not np.allclose(i2w[3], [0, 0, 0, 1]) or abs(np.linalg.det(i2w[:3, :3])) < 1e-12:
        raise ConfigError(
            "index_to_world must be an invertible 4x4 affine matrix with last row [0, 0, 0, 1], "
            f"not {i2w.tolist()}")
    if center_mm is None:
        center_index = np.array([(shape[2] - 1) / 2.0, (shape[1] - 1) / 2.0,
                                 (shape[0] - 1) / 2.0, 1.0])
        center = (i2w @ center_index)[:3]
    else:
        center = np.asarray(center_mm, dtype=np.float64).reshape(-1)
        if center.shape != (3,) or not np.all(np.isfinite(center)):
            raise ConfigError(f"center_mm must be 3 finite numbers (mm), not {center_mm!r}")
    return shape, i2w, center


@keras.saving.register_keras_serializable(package=_PACKAGE)
class AffineToField(keras.layers.Layer):
    """Dense voxel-unit displacement field of the 7-parameter world transform ``T``.

    Input params (B, 7) (raw; zero = identity, see the module docstring). Output
    (B, Z, Y, X, 3) with components (dz, dy, dx): the field maps each fixed-grid voxel to the
    atlas voxel ``T`` sends it to, so ``SpatialTransformer()([atlas, field])`` is
    ``atlas(T(x))``.

    Parameters
    ----------
    shape_zyx : 3 ints
        The grid (fixed and atlas share it).
    index_to_world : (4, 4) array-like
        Grid matrix [i, j, k, 1] -> world mm (i = x index); stored in the config.
    center_mm : 3 floats or None
        Rotation / scaling centre in world mm; None = grid centre.
    rotation_unit_deg, translation_unit_mm, log_scale_unit : float
        Size of one unit of the raw rotation, translation and log-scale parameters.
    """

    def __init__(self, shape_zyx, index_to_world, center_mm=None, rotation_unit_deg=10.0,
                 translation_unit_mm=10.0, log_scale_unit=0.1, **kwargs):
        super().__init__(**kwargs)
        self.shape_zyx, i2w, center = _validate_grid(shape_zyx, index_to_world, center_mm)
        for name, value in (("rotation_unit_deg", rotation_unit_deg),
                            ("translation_unit_mm", translation_unit_mm),
                            ("log_scale_unit", log_scale_unit)):
            if not (np.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a finite number > 0, not {value!r}")
        self.index_to_world = i2w.tolist()
        self.center_mm = None if center_mm is None else center.tolist()
        self.rotation_unit_deg = float(rotation_unit_deg)
        self.translation_unit_mm = float(translation_unit_mm)
        self.log_scale_unit = float(log_scale_unit)
        # Voxel matrix A_vox = D^-1 (s R) D with D = direction * spacing, and offset
        # D^-1 (sR (o - c) - (o - c) + t). Working with (o - c), the grid origin relative to
        # the centre, keeps the float32 arithmetic away from large absolute coordinates.
        linear = i2w[:3, :3]
        # numpy, not tf.constant: a traced call then embeds them as constants of its own graph
        # (an eager tensor would be a captured input, which an ONNX export cannot feed)
        self._d = linear.astype(np.float32)
        self._d_inv = np.linalg.inv(linear).astype(np.float32)
        self._origin_rel = (i2w[:3, 3] - center).astype(np.float32)
        self._center = center

    def voxel_matrix(self, params):
        """(B, 4, 4) voxel-index matrix on [z, y, x, 1] of the transform of ``params`` (B, 7)."""
        linear, translation = _linear_part(params, self.rotation_unit_deg,
                                           self.translation_unit_mm, self.log_scale_unit)
        a_ijk = tf.einsum("ij,bjk,kl->bil", self._d_inv, linear, self._d)
        rel = self._origin_rel
        b_ijk = tf.einsum("ij,bj->bi", self._d_inv,
                          tf.einsum("bij,j->bi", linear, rel) - rel[None] + translation)
        # Reverse (i, j, k) -> (k, j, i) = (z, y, x) for rows and columns.
        a_zyx = tf.reverse(a_ijk, axis=[1, 2])
        b_zyx = tf.reverse(b_ijk, axis=[1])
        top = tf.concat([a_zyx, b_zyx[:, :, None]], axis=2)
        bottom = tf.broadcast_to(tf.constant([[[0.0, 0.0, 0.0, 1.0]]]), [tf.shape(top)[0], 1, 4])
        return tf.concat([top, bottom], axis=1)

    def world_matrix(self, params):
        """(B, 4, 4) world transform ``T`` (mm, on [x, y, z, 1]) of ``params`` (B, 7)."""
        return params_to_matrix(params, self._center, self.rotation_unit_deg,
                                self.translation_unit_mm, self.log_scale_unit)

    def build(self, input_shape):
        if len(input_shape) != 2 or (input_shape[-1] is not None and int(input_shape[-1]) != 7):
            raise ConfigError(f"{type(self).__name__} params must have shape (batch, 7), "
                              f"not {tuple(input_shape)}")
        self.built = True

    def call(self, params):
        return affine_field(self.voxel_matrix(params), self.shape_zyx)

    def compute_output_shape(self, input_shape):
        return (input_shape[0],) + self.shape_zyx + (3,)

    def get_config(self):
        config = super().get_config()
        config.update(shape_zyx=list(self.shape_zyx), index_to_world=self.index_to_world,
                      center_mm=self.center_mm, rotation_unit_deg=self.rotation_unit_deg,
                      translation_unit_mm=self.translation_unit_mm,
                      log_scale_unit=self.log_scale_unit)
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ComposeAffine(AffineToField):
    """Total displacement of ``T o phi`` from a dense field and 7 affine parameters (exact).

    Call with ``[phi_field, params]``: phi_field (B, Z, Y, X, 3) voxel units, params (B, 7).
    Returns (B, Z, Y, X, 3) ``u_phi(x) + u_T(x + u_phi(x))``, with ``u_T`` evaluated
    analytically (no resampling). Same constructor as :class:`AffineToField`, which must be
    given the same arguments for the two to describe the same ``T``.
    """

    def build(self, input_shape):
        if not isinstance(input_shape, (list, tuple)) or len(input_shape) != 2:
            raise ConfigError("ComposeAffine is called on [phi_field, params]")
        _check_field_shape("ComposeAffine phi_field", input_shape[0])
        spatial = _static_spatial(input_shape[0])
        if any(a is not None and a != b for a, b in zip(spatial, self.shape_zyx)):
            raise ConfigError(f"ComposeAffine phi_field grid {spatial} differs from shape_zyx "
                              f"{self.shape_zyx}")
        super().build(input_shape[1])

    def call(self, inputs):
        field, params = inputs
        return compose_affine(field, self.voxel_matrix(params))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[0])
