"""Accuracy of a registration model on a data set split: overlap, surface distances, SSIM, hip centre.

Metrics (per sample, femur label 1, the prediction being the atlas warped by Psi)
    ``dice``, ``jaccard``
        Overlap of the warped atlas femur label with the true label map.
    ``assd_mm``
        Average symmetric surface distance: the mean of all distances from each surface voxel of
        one label to the nearest surface voxel of the other, both directions pooled (mm, from the
        grid spacing). Surface voxels are label voxels with a 6-neighbour outside the label.
    ``hd95_mm``
        95th percentile of the same pooled distances (the MedPy ``hd95`` definition).
    ``ssim``
        Structural similarity (scikit-image, 7-voxel windows) of the warped atlas and the fixed
        volume, both as femur relative attenuation (:func:`inference.model.femur_intensity`), with
        the fixed volume's range as data range.
    ``hip_centre_error_mm``
        Distance between the true head centre (the sample's ``head_centre`` landmark) and the
        centre of the sphere fitted to the head of the warped atlas femur, as ``hipatlas
        register`` measures it (:func:`inference.measure.measure_femur`). When that femur cannot
        be measured (too little shaft, say), the atlas head centre carried to the patient through
        the inverse of Psi is used instead (``hip_centre_method`` says which); only when atlas
        landmarks are given.

An empty predicted or true femur gives ``nan`` distances (and counts as a failure in the summary).

:func:`evaluate_dataset` runs a model over a split and writes ``evaluation.md`` (per-sample table,
per-subject means, mean +- sd) and ``evaluation.json``; TensorFlow is imported only there.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from scipy import ndimage

from inference.errors import Cancelled, ConfigError, DataError, MeshError
from inference.io import write_text_atomic

log = logging.getLogger(__name__)

FEMUR_LABEL = 1
METRICS = ("dice", "jaccard", "assd_mm", "hd95_mm", "ssim", "hip_centre_error_mm")
#: Higher is better for these; lower for the others (used for "best model" choices).
HIGHER_IS_BETTER = {"dice": True, "jaccard": True, "ssim": True, "assd_mm": False, "hd95_mm": False,
                    "hip_centre_error_mm": False}


# --------------------------------------------------------------------------------------------
# Metrics (numpy)
# --------------------------------------------------------------------------------------------

def _binary(mask: np.ndarray, name: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise DataError(f"{name} must be a 3D (Z, Y, X) mask, not shape {mask.shape}")
    return mask.astype(bool)


def dice(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two binary masks; 1.0 when both are empty."""
    a, b = _binary(predicted, "predicted"), _binary(truth, "truth")
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def jaccard(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union of two binary masks; 1.0 when both are empty."""
    a, b = _binary(predicted, "predicted"), _binary(truth, "truth")
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union


def _surface(mask: np.ndarray) -> np.ndarray:
    # Voxels of the mask with a face neighbour outside it (the grid border counts as outside).
    eroded = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1),
                                    border_value=0)
    return mask & ~eroded


def surface_distances(predicted: np.ndarray, truth: np.ndarray,
                      spacing_zyx_mm: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each surface voxel of one mask to the other mask's surface.

    Returns
    -------
    (pred_to_truth, truth_to_pred) : two 1-D arrays; empty when either mask is empty.
    """
    a, b = _binary(predicted, "predicted"), _binary(truth, "truth")
    spacing = tuple(float(s) for s in spacing_zyx_mm)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ConfigError(f"spacing_zyx_mm must be 3 positive numbers, not {spacing_zyx_mm!r}")
    if not a.any() or not b.any():
        return np.zeros(0), np.zeros(0)
    surf_a, surf_b = _surface(a), _surface(b)
    # EDT of the complement of a surface = distance of every voxel to that surface.
    to_b = ndimage.distance_transform_edt(~surf_b, sampling=spacing)
    to_a = ndimage.distance_transform_edt(~surf_a, sampling=spacing)
    return to_b[surf_a], to_a[surf_b]


def assd(predicted: np.ndarray, truth: np.ndarray, spacing_zyx_mm: Sequence[float]) -> float:
    """Average symmetric surface distance in mm (nan if a mask is empty)."""
    d_ab, d_ba = surface_distances(predicted, truth, spacing_zyx_mm)
    if d_ab.size == 0:
        return math.nan
    return float(np.concatenate([d_ab, d_ba]).mean())


def hd95(predicted: np.ndarray, truth: np.ndarray, spacing_zyx_mm: Sequence[float]) -> float:
    """95th percentile of the pooled symmetric surface distances in mm (nan if a mask is empty)."""
    d_ab, d_ba = surface_distances(predicted, truth, spacing_zyx_mm)
    if d_ab.size == 0:
        return math.nan
    return float(np.percentile(np.concatenate([d_ab, d_ba]), 95))


def ssim(predicted: np.ndarray, truth: np.ndarray) -> float:
    """3D structural similarity with the truth's intensity range as data range."""
    from skimage.metrics import structural_similarity

    predicted = np.asarray(predicted, np.float64)
    truth = np.asarray(truth, np.float64)
    if predicted.shape != truth.shape or predicted.ndim != 3:
        raise DataError(f"SSIM needs two volumes of one 3D shape, not {predicted.shape} and {truth.shape}")
    data_range = float(truth.max() - truth.min())
    if data_range <= 0:
        return math.nan
    return float(structural_similarity(truth, predicted, data_range=data_range,
                                       win_size=min(7, *[s - (1 - s % 2) for s in truth.shape])))


def spacing_zyx_of(index_to_world: np.ndarray) -> tuple[float, float, float]:
    """Voxel sizes (z, y, x) in mm: the lengths of the columns of ``index_to_world``."""
    i2w = np.asarray(index_to_world, np.float64)
    sx, sy, sz = np.linalg.norm(i2w[:3, :3], axis=0)
    return float(sz), float(sy), float(sx)


class _Grid:
    """The two geometry methods :func:`inference.pipeline.invert_displacement_at` reads."""

    def __init__(self, index_to_world: np.ndarray):
        self._i2w = np.asarray(index_to_world, np.float64)

    def index_to_world(self) -> np.ndarray:
        return self._i2w

    def world_to_index(self) -> np.ndarray:
        return np.linalg.inv(self._i2w)


def mapped_atlas_point(atlas_point_mm: np.ndarray, psi: np.ndarray, index_to_world: np.ndarray,
                       atlas_index_to_world: np.ndarray | None = None) -> np.ndarray:
    """World position (mm) in the patient of an atlas point, through the inverse of Psi.

    ``psi`` (Z, Y, X, 3) voxel units, pull-back (patient voxel x reads the atlas at x + psi(x));
    ``index_to_world`` of the patient grid, ``atlas_index_to_world`` of the atlas grid (default:
    the same grid, as in training data).
    """
    from inference.pipeline import invert_displacement_at

    atlas_grid = _Grid(index_to_world if atlas_index_to_world is None else atlas_index_to_world)
    return np.asarray(invert_displacement_at(np.asarray(atlas_point_mm, np.float64), np.asarray(psi),
                                             atlas_grid, _Grid(index_to_world)))


def sample_metrics(warped_labels: np.ndarray, labels: np.ndarray, index_to_world: np.ndarray, *,
                   warped_intensity: np.ndarray | None = None, fixed_intensity: np.ndarray | None = None,
                   psi: np.ndarray | None = None, atlas_head_centre_mm: np.ndarray | None = None,
                   head_centre_mm: np.ndarray | None = None,
                   atlas_index_to_world: np.ndarray | None = None) -> dict[str, float]:
    """All metrics of one registered sample (those whose inputs are given; others are nan)."""
    predicted = np.asarray(warped_labels).round() == FEMUR_LABEL
    truth = np.asarray(labels) == FEMUR_LABEL
    spacing = spacing_zyx_of(index_to_world)
    d_ab, d_ba = surface_distances(predicted, truth, spacing)
    pooled = np.concatenate([d_ab, d_ba])
    out = {
        "dice": dice(predicted, truth),
        "jaccard": jaccard(predicted, truth),
        "assd_mm": float(pooled.mean()) if pooled.size else math.nan,
        "hd95_mm": float(np.percentile(pooled, 95)) if pooled.size else math.nan,
        "ssim": math.nan,
        "hip_centre_error_mm": math.nan,
    }
    if warped_intensity is not None and fixed_intensity is not None:
        out["ssim"] = ssim(warped_intensity, fixed_intensity)
    if psi is not None and atlas_head_centre_mm is not None and head_centre_mm is not None:
        centre, method = fitted_hip_centre(predicted, index_to_world), "sphere_fit"
        if centre is None:
            centre = mapped_atlas_point(atlas_head_centre_mm, psi, index_to_world, atlas_index_to_world)
            method = "mapped_landmark"
        out["hip_centre_error_mm"] = float(np.linalg.norm(centre - np.asarray(head_centre_mm, float)))
        out["hip_centre_method"] = method
    return out


def geometry_of(shape_zyx: Sequence[int], index_to_world: np.ndarray):
    """The :class:`~inference.geometry.VolumeGeometry` of a grid given by its index-to-world matrix."""
    from inference.geometry import VolumeGeometry

    i2w = np.asarray(index_to_world, np.float64)
    spacing = np.linalg.norm(i2w[:3, :3], axis=0)
    direction = i2w[:3, :3] / spacing
    return VolumeGeometry(tuple(int(n) for n in shape_zyx), tuple(spacing), tuple(i2w[:3, 3]),
                          tuple(map(tuple, direction)))


def fitted_hip_centre(femur: np.ndarray, index_to_world: np.ndarray) -> np.ndarray | None:
    """Head-sphere centre (world mm) of a right femur label map, or None if it cannot be measured."""
    from inference.measure import measure_femur

    try:
        measured = measure_femur(np.asarray(femur, np.uint8), geometry_of(np.shape(femur), index_to_world),
                                 side="right")
    except (DataError, MeshError) as error:
        log.info("hip centre not measurable on the warped atlas (%s); using the mapped landmark", error)
        return None
    return np.asarray(measured["hip_centre_mm"], float)


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------

def summarise(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str] = METRICS) -> dict[str, dict]:
    """Mean, sd (ddof 1), median, n and failures (nan values) of each metric over ``rows``."""
    summary = {}
    for name in metrics:
        values = np.array([float(r.get(name, math.nan)) for r in rows], dtype=np.float64)
        finite = values[np.isfinite(values)]
        summary[name] = {
            "mean": float(finite.mean()) if finite.size else math.nan,
            "sd": float(finite.std(ddof=1)) if finite.size > 1 else math.nan,
            "median": float(np.median(finite)) if finite.size else math.nan,
            "n": int(finite.size),
            "failures": int(values.size - finite.size),
        }
    return summary


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        return "nan" if not math.isfinite(value) else f"{value:.{digits}f}"
    return str(value)


def to_markdown(rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Mapping[str, float]],
                title: str = "Evaluation", metrics: Sequence[str] = METRICS,
                provenance: Mapping[str, Any] | None = None) -> str:
    """Per-sample table, per-subject means and a mean +- sd line, as GitHub markdown."""
    from inference.provenance import provenance_markdown

    head = [provenance_markdown(dict(provenance))] if provenance else []
    lines = [f"# {title}", "", *head, f"{len(rows)} samples.", "",
             "| subject | sample | " + " | ".join(metrics) + " |",
             "|---|---|" + "---|" * len(metrics)]
    for row in rows:
        lines.append(f"| {row.get('subject', '')} | {row.get('sample_index', '')} | "
                     + " | ".join(_fmt(row.get(m, math.nan)) for m in metrics) + " |")
    subjects = sorted({str(r.get("subject", "")) for r in rows})
    if len(subjects) > 1:
        lines += ["", "## Per subject (mean)", "",
                  "| subject | n | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
        for subject in subjects:
            part = [r for r in rows if str(r.get("subject", "")) == subject]
            means = summarise(part, metrics)
            lines.append(f"| {subject} | {len(part)} | "
                         + " | ".join(_fmt(means[m]["mean"]) for m in metrics) + " |")
    lines += ["", "## Summary (mean +- sd over samples)", "", "| metric | mean +- sd | median | n | failures |",
              "|---|---|---|---|---|"]
    for name in metrics:
        s = summary[name]
        lines.append(f"| {name} | {_fmt(s['mean'])} +- {_fmt(s['sd'])} | {_fmt(s['median'])} | {s['n']} | "
                     f"{s['failures']} |")
    return "\n".join(lines) + "\n"


def _json_safe(value: Any) -> Any:
    """nan/inf -> None (strict JSON), numpy scalars -> Python."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


@dataclass(frozen=True)
class EvaluationProgress:
    fraction: float
    message: str


@dataclass(frozen=True)
class EvaluationReport:
    """Per-sample rows (dicts: subject, sample_index, path and the metrics) and the summary."""

    rows: tuple[dict, ...]
    summary: dict
    markdown_path: pathlib.Path | None = None
    json_path: pathlib.Path | None = None

    def to_dict(self) -> dict:
        return _json_safe({"rows": list(self.rows), "summary": self.summary})


def write_report(rows: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike, *,
                 title: str = "Evaluation", extra: Mapping[str, Any] | None = None) -> EvaluationReport:
    """Write ``evaluation.md`` and ``evaluation.json`` (atomically) into ``out_dir``."""
    out = pathlib.Path(out_dir)
    rows = tuple(dict(r) for r in rows)
    summary = summarise(rows)
    md_path, json_path = out / "evaluation.md", out / "evaluation.json"
    record = (extra or {}).get("provenance")
    write_text_atomic(md_path, to_markdown(rows, summary, title, provenance=record))
    payload = {"title": title, **dict(extra or {}), "summary": summary, "rows": list(rows)}
    write_text_atomic(json_path, json.dumps(_json_safe(payload), indent=2, sort_keys=True) + "\n")
    return EvaluationReport(rows, summary, md_path, json_path)


# --------------------------------------------------------------------------------------------
# Running a model over a data set
# --------------------------------------------------------------------------------------------

def predict_sample(model, sample: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run ``model`` on one data set sample; numpy outputs without the batch axis."""
    from inference.model import inputs_from_sample

    outputs = model(inputs_from_sample(sample), training=False)
    return {name: np.asarray(value)[0] for name, value in outputs.items()}


def evaluate_samples(model, samples, *, atlas_head_centre_mm: np.ndarray | None = None,
                     atlas_index_to_world: np.ndarray | None = None, limit: int | None = None,
                     with_ssim: bool = True, with_hip_centre: bool = True,
                     progress: Callable[[EvaluationProgress], None] | None = None,
                     cancel: Callable[[], bool] | Any = None, total: int | None = None,
                     head_landmark_index: int = 0) -> list[dict]:
    """Metrics of ``model`` on an iterable of samples (dicts as :func:`inference.data.dataset.iter_samples`).

    ``cancel`` is a callable or an object with ``is_set()`` (a threading.Event); checked between
    samples, raising :class:`~inference.errors.Cancelled`. ``head_landmark_index`` is the row of
    ``landmarks_mm`` holding the head centre (the manifest's ``landmark_names`` order).
    """
    from inference.model import femur_intensity

    rows = []
    for count, sample in enumerate(samples):
        if limit is not None and count >= limit:
            break
        if cancel is not None and (cancel.is_set() if hasattr(cancel, "is_set") else cancel()):
            raise Cancelled("evaluation cancelled")
        out = predict_sample(model, sample)
        landmarks = sample.get("landmarks_mm")
        metrics = sample_metrics(
            out["warped_labels"][..., 0], sample["labels"], sample["index_to_world"],
            warped_intensity=out["warped"][..., 0] if with_ssim else None,
            fixed_intensity=femur_intensity(sample["volume"], sample["labels"]) if with_ssim else None,
            psi=out["psi"] if with_hip_centre else None,
            atlas_head_centre_mm=atlas_head_centre_mm if with_hip_centre else None,
            head_centre_mm=(None if landmarks is None or len(landmarks) <= head_landmark_index
                            else landmarks[head_landmark_index]),
            atlas_index_to_world=atlas_index_to_world)
        rows.append({"subject": str(sample.get("subject", "")),
                     "sample_index": int(sample.get("sample_index", count)),
                     "path": str(sample.get("path", "")), **metrics})
        if progress is not None:
            denominator = total if total else (limit if limit else count + 1)
            progress(EvaluationProgress(min(1.0, (count + 1) / max(denominator, 1)),
                                        f"evaluated {count + 1} sample(s)"))
    return rows


def evaluate_dataset(model, data_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
                     split: str = "test", atlas: Any = None, limit: int | None = None,
                     progress: Callable[[EvaluationProgress], None] | None = None,
                     cancel: Any = None) -> EvaluationReport:
    """Evaluate a model (object or ``.keras`` path, verified against its card) on a data set split.

    Parameters
    ----------
    model : keras.Model or path
    data_dir : a ``hipatlas-dataset/1`` folder
    out_dir : where to write ``evaluation.md`` / ``evaluation.json`` (None: write nothing)
    split : ``train``, ``val`` or ``test``
    atlas : :class:`inference.data.atlas.Atlas`, optional
        For the hip-centre error (its ``landmarks["head_centre"]``); by default the installed atlas
        of the model's grid if it can be loaded, else the metric is left out (nan).
    limit : evaluate at most this many samples
    """
    from inference.data.dataset import iter_samples, load_manifest
    from inference.model import load_model, model_config_of

    from inference.provenance import provenance

    record = provenance(model if isinstance(model, (str, os.PathLike)) else None)
    if isinstance(model, (str, os.PathLike)):
        model = load_model(model)
    config = model_config_of(model)
    manifest = load_manifest(data_dir)
    entries = [e for e in manifest["samples"] if e.get("split") == split]
    if not entries:
        raise DataError(f"the data set in {data_dir} has no '{split}' samples")
    head, atlas_i2w = _atlas_head_centre(atlas, config.grid)
    names = list(manifest.get("landmark_names") or ["head_centre"])
    if "head_centre" not in names:
        head = None
    total = len(entries) if limit is None else min(limit, len(entries))
    rows = evaluate_samples(model, iter_samples(data_dir, split), atlas_head_centre_mm=head,
                            atlas_index_to_world=atlas_i2w, limit=limit, progress=progress,
                            cancel=cancel, total=total,
                            head_landmark_index=names.index("head_centre") if head is not None else 0)
    summary = summarise(rows)
    if out_dir is None:
        return EvaluationReport(tuple(rows), summary)
    return write_report(rows, out_dir, title=f"Evaluation of {getattr(model, 'name', 'model')} on "
                        f"{pathlib.Path(data_dir).name}/{split}",
                        extra={"provenance": record, "data_dir": str(data_dir), "split": split,
                               "config": config.to_dict(),
                               "model": _json_safe(getattr(model, "_hipatlas_card", {}) or {})})


def _atlas_head_centre(atlas: Any, grid: str) -> tuple[np.ndarray | None, np.ndarray | None]:
    if atlas is None:
        try:
            from inference.data.atlas import load_atlas

            atlas = load_atlas(grid)
        except Exception as error:  # no installed atlas: the hip-centre error is skipped
            log.warning("no atlas landmarks for grid %r (%s): hip-centre error not computed", grid, error)
            return None, None
    landmarks = getattr(atlas, "landmarks", None) or {}
    head = landmarks.get("head_centre")
    geometry = getattr(atlas, "geometry", None)
    i2w = geometry.index_to_world() if geometry is not None else None
    return (None if head is None else np.asarray(head, np.float64)), i2w


def add_parser(subparsers) -> None:
    """``hipatlas evaluate MODEL DATA_DIR --out OUT [--split test] [--limit N]`` (or ``--model M --data DIR``)."""
    parser = subparsers.add_parser(
        "evaluate", help="accuracy of a model on a data set split",
        description="Register every sample of a data set split and write evaluation.md and "
        "evaluation.json (Dice, Jaccard, ASSD, HD95, SSIM, hip-centre error; mean +- sd).")
    parser.add_argument("model", nargs="?", help=".keras model file or its folder (model_card.json beside it)")
    parser.add_argument("data_dir", nargs="?", help="data set folder (manifest.json)")
    parser.add_argument("--model", dest="model_option", metavar="MODEL", help="the same as the first argument")
    parser.add_argument("--data", dest="data_option", metavar="DIR", help="the same as the second argument")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--limit", type=int, default=None, help="evaluate at most N samples")
    parser.set_defaults(handler=_cli_evaluate)


def _cli_evaluate(args) -> int:
    from inference.registration import model_file_in

    model = args.model_option or args.model
    data_dir = args.data_option or args.data_dir
    if not model or not data_dir:
        raise ConfigError("evaluate needs a model (MODEL or --model) and a data set (DATA_DIR or --data)")
    report = evaluate_dataset(model_file_in(model), data_dir, args.out, split=args.split, limit=args.limit,
                              progress=lambda p: log.info("%3.0f%% %s", 100 * p.fraction, p.message))
    for name, stats in report.summary.items():
        print(f"{name}: {_fmt(stats['mean'])} +- {_fmt(stats['sd'])} (n={stats['n']}, "
              f"failures {stats['failures']})")
    print(f"report written to {report.markdown_path}")
    return 0


__all__ = [
    "METRICS", "HIGHER_IS_BETTER", "dice", "jaccard", "surface_distances", "assd", "hd95", "ssim",
    "spacing_zyx_of", "mapped_atlas_point", "sample_metrics", "summarise", "to_markdown",
    "write_report", "EvaluationReport", "EvaluationProgress", "predict_sample", "evaluate_samples",
    "evaluate_dataset", "add_parser",
]
