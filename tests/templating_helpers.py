"""Synthetic registration outputs with known anatomy for the templating tests."""

from __future__ import annotations

import json
import pathlib

import numpy as np

from inference import io, measure
from inference.geometry import VolumeGeometry
from synthetic_shapes import simple_femur_sdf

#: The analytic femur (tests/synthetic_shapes.py): head centre at 0, shaft axis x = -42 along z,
#: shaft radius 14 mm; our cortex thickens distally (cortex_thickness_mm), so the canal is a funnel.
SHAFT_X_MM = -42.0
LESSER_TROCHANTER_Z_MM = -40.0


def cortex_thickness_mm(z_mm):
    """Cortex of the analytic femur: 2 mm at the lesser trochanter, 0.04 mm more per mm down, at most 5.5."""
    return np.clip(2.0 + 0.04 * (LESSER_TROCHANTER_Z_MM - np.asarray(z_mm, float)), 2.0, 5.5)


def canal_width_mm(height_above_lt_mm):
    """Canal width of the analytic femur (the 600 HU crossing of the 2 mm cortex ramp sits 0.2 mm
    inside its middle)."""
    return 2.0 * (14.0 - cortex_thickness_mm(LESSER_TROCHANTER_Z_MM + np.asarray(height_above_lt_mm)) - 0.2)
HEAD_RADIUS_MM = 22.0


def analytic_measurements(pose: np.ndarray = np.eye(4), side: str = "right") -> dict:
    """measurements.json of the analytic femur placed by ``pose`` (canonical -> world, 4x4)."""
    def w(p):
        return pose[:3, :3] @ np.asarray(p, float) + pose[:3, 3]

    return measure.measurements_from_landmarks(
        side, w([0, 0, 0]), HEAD_RADIUS_MM, w([SHAFT_X_MM, 0, -100]), pose[:3, :3] @ [0, 0, 1],
        w([-20, 0, -15]), pose[:3, :3] @ [40, 0, 30], w([SHAFT_X_MM + 14, 0, LESSER_TROCHANTER_Z_MM]))


def analytic_volumes(pose: np.ndarray = np.eye(4), spacing_mm: float = 1.0):
    """(HU, labels, geometry) of the analytic femur with its cortex, placed by ``pose``.

    The grid is axis-aligned in the canonical frame and carries the pose in its origin and
    direction (a rigid or mirroring pose moves the femur without resampling).
    """
    low, high = np.array([-70.0, -35.0, -220.0]), np.array([30.0, 35.0, 35.0])
    shape_xyz = np.round((high - low) / spacing_mm).astype(int) + 1
    i, j, k = np.meshgrid(*[np.arange(n) for n in shape_xyz], indexing="ij")
    pts = np.stack([i, j, k]).reshape(3, -1) * spacing_mm + low[:, None]
    sdf = simple_femur_sdf(pts, HEAD_RADIUS_MM).reshape(tuple(shape_xyz))
    # Cortex 1500 HU, canal 0 HU, a linear 2 mm ramp between them (a partial-volume edge two voxels
    # wide, so that linear interpolation between the 1 mm samples reproduces it).
    thickness = cortex_thickness_mm(pts[2]).reshape(sdf.shape)
    hu = np.where(sdf < 0, 1500.0 * np.clip((sdf + thickness) / 2.0 + 0.5, 0.0, 1.0), -1000.0).astype(np.float32)
    labels = (sdf < 0).astype(np.uint8)
    direction = pose[:3, :3]
    geometry = VolumeGeometry(tuple(int(n) for n in shape_xyz[::-1]), (spacing_mm,) * 3,
                              tuple(direction @ low + pose[:3, 3]), tuple(map(tuple, direction)))
    return hu.transpose(2, 1, 0).copy(), labels.transpose(2, 1, 0).copy(), geometry


def write_case_out(folder: pathlib.Path, hu, labels, geometry, measurements: dict) -> pathlib.Path:
    """A folder laid out like `hipatlas register`'s output (the files a plan reads)."""
    folder.mkdir(parents=True, exist_ok=True)
    io.write_volume(folder / "warped_atlas.nii.gz", hu, geometry, dtype=np.float32)
    io.write_volume(folder / "femur_labels.nii.gz", labels, geometry, dtype=np.uint8)
    io.write_json_atomic(folder / "measurements.json", measurements)
    return folder


def rigid_pose(angles_deg, translation_mm) -> np.ndarray:
    ax, ay, az = np.radians(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    pose = np.eye(4)
    pose[:3, :3] = rz @ ry @ rx
    pose[:3, 3] = translation_mm
    return pose


MIRROR_X = np.diag([-1.0, 1.0, 1.0, 1.0])


def atlas_case(grid: str = "compact", pose: np.ndarray = np.eye(4)):
    """The shipped atlas (a phantom with known landmarks) placed by a rigid ``pose``:
    (HU, labels, geometry, measurements)."""
    root = pathlib.Path(__file__).resolve().parents[1] / "resources" / "atlas" / grid
    hu, geometry = io.read_volume(root / "atlas.nii.gz")
    labels, _ = io.read_volume(root / "labels.nii.gz")
    lm = json.loads((root / "landmarks.json").read_text())
    p = lm["points_mm"]

    def w(x):
        return pose[:3, :3] @ np.asarray(x, float) + pose[:3, 3]

    m = measure.measurements_from_landmarks(
        "right", w(p["head_centre"]), lm["head_radius_mm"], w(p["shaft_point_distal"]),
        pose[:3, :3] @ lm["directions"]["shaft"], w(p["neck_point"]), pose[:3, :3] @ lm["directions"]["neck"],
        w(p["lesser_trochanter"]))
    direction = pose[:3, :3] @ np.asarray(geometry.direction)
    placed = VolumeGeometry(geometry.shape_zyx, geometry.spacing_xyz_mm, tuple(w(geometry.origin_mm)),
                            tuple(map(tuple, direction)))
    return hu, labels, placed, m
