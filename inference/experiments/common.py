"""What the paper's experiments share: held-out phantoms, resumable units of work, reports and plots.

Every experiment is a sequence of *units* (one registered view pair, say); each unit's result is
written to ``OUT/units/<key>.json`` as soon as it exists, so an interrupted experiment run again
with the same ``--out`` continues with the first unit that has no result. The phantoms of the
held-out specimen are made once and kept in ``OUT/phantoms/``.

A training costs most of an hour on a 2-core CPU, and a machine may be gone before an experiment
of several trainings ends. A *ledger* (``--ledger DIR``, a folder kept in version control, e.g.
``docs/results/ledger``) keeps what must outlive the machine: each finished training's scores on the
held-out pairs, filed under a fingerprint of everything that made them (:class:`Ledger`). Run again
on a fresh machine with the same ledger, an experiment trains only what has no entry there.

The test set is by specimen: phantoms of the held-out specimen's femurs (default JIA_MRI, left and
right, which no shipped model saw), shape-, pose- and tissue-augmented as in ``hipatlas synth``,
with radiograph realism (noise, scatter, blur, gain, gamma).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import pathlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from inference.errors import Cancelled, ConfigError
from inference.io import write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

SCALES = ("quick", "full")
HELD_OUT_FEMURS = ("JIA_MRI:left", "JIA_MRI:right")
#: The paper's Table 1 / Table 2 metrics (SSIM only where a volume is produced).
METRICS = ("dice", "jaccard", "assd_mm", "hd95_mm", "ssim")


@dataclass(frozen=True)
class ExperimentProgress:
    fraction: float
    message: str


@dataclass
class ExperimentContext:
    """Where an experiment writes, at which scale, with which model, and how it reports."""

    name: str
    out: pathlib.Path
    scale: str
    model_path: pathlib.Path
    seed: int = 7
    progress: Callable[[ExperimentProgress], None] | None = None
    cancel: Any = None
    ledger: "Ledger | None" = None
    _model: Any = None

    def __post_init__(self) -> None:
        if self.scale not in SCALES:
            raise ConfigError(f"scale must be one of {SCALES}, not {self.scale!r}")
        self.out = pathlib.Path(self.out)
        (self.out / "units").mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------- model
    @property
    def model(self):
        if self._model is None:
            from inference.model import load_model

            self._model = load_model(self.model_path)
        return self._model

    @property
    def config(self):
        from inference.model import model_config_of

        return model_config_of(self.model)

    # ---------------------------------------------------------------- progress
    def report(self, done: int, total: int, message: str) -> None:
        if self.cancel is not None and (self.cancel.is_set() if hasattr(self.cancel, "is_set") else self.cancel()):
            raise Cancelled(f"{self.name} cancelled; run the same command again to resume")
        if self.progress is not None:
            self.progress(ExperimentProgress(done / max(total, 1), message))

    # ---------------------------------------------------------------- units
    def unit(self, key: str, compute: Callable[[], Mapping[str, Any]]) -> dict:
        """The result of unit ``key``: read back if it exists, else computed and written."""
        path = self.out / "units" / f"{key}.json"
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8"))
        result = dict(compute())
        write_json_atomic(path, _finite_or_none(result))
        return json.loads(path.read_text(encoding="utf-8"))


    # ---------------------------------------------------------------- ledger
    def recorded(self, label: str, inputs: Mapping[str, Any]) -> dict | None:
        """The ledger's result for ``inputs`` (None without a ledger or without an entry)."""
        return None if self.ledger is None else self.ledger.get(label, inputs)

    def record(self, label: str, inputs: Mapping[str, Any], result: Mapping[str, Any]) -> None:
        """File ``result`` in the ledger, if there is one."""
        if self.ledger is not None:
            self.ledger.put(label, inputs, result)


LEDGER_FORMAT = "hipatlas-experiment-ledger/1"


def fingerprint(inputs: Mapping[str, Any]) -> str:
    """sha256 of ``inputs`` as canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(_finite_or_none(inputs), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class Ledger:
    """Finished trainings' results, kept where they outlive the machine that trained them.

    An entry is ``FOLDER/<label>-<fingerprint[:12]>.json``: the inputs that made the result (model
    configuration, data set and training arguments without paths, the test pairs), their
    fingerprint, the result itself (per-pair scores, and what else the experiment needs of the
    run) and the provenance of the run that recorded it. :meth:`get` returns a result only for
    exactly the same inputs, so a changed budget, configuration or test set trains again; an entry
    recorded by older code stays valid until it is deleted (its commit is in the entry).
    Several experiments may share one ledger: the same training filed by one is found by another.
    """

    folder: pathlib.Path

    def __post_init__(self) -> None:
        self.folder = pathlib.Path(self.folder)
        #: label -> where and when each result that was read or filed in this run was recorded
        self.used: dict[str, dict[str, Any]] = {}

    def path(self, label: str, inputs: Mapping[str, Any]) -> pathlib.Path:
        slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in label)
        return self.folder / f"{slug}-{fingerprint(inputs)[:12]}.json"

    def get(self, label: str, inputs: Mapping[str, Any]) -> dict | None:
        path = self.path(label, inputs)
        if not path.is_file():
            return None
        entry = json.loads(path.read_text(encoding="utf-8"))
        wanted = fingerprint(inputs)
        if (entry.get("format") != LEDGER_FORMAT or entry.get("fingerprint") != wanted
                or fingerprint(entry.get("inputs", {})) != wanted):
            log.warning("ledger entry %s does not match its inputs; ignored", path)
            return None
        record = entry.get("provenance", {})
        log.info("%s: taken from the ledger (%s, recorded %s)", label, path.name, record.get("measured_at"))
        self.used[label] = {"file": path.name, "measured_at": record.get("measured_at"), "commit": record.get("commit")}
        return entry["result"]

    def put(self, label: str, inputs: Mapping[str, Any], result: Mapping[str, Any]) -> pathlib.Path:
        from inference.provenance import provenance

        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path(label, inputs)
        record = provenance()
        write_json_atomic(path, _finite_or_none({"format": LEDGER_FORMAT, "label": label,
                                                 "fingerprint": fingerprint(inputs), "inputs": inputs,
                                                 "result": result, "provenance": record}))
        self.used[label] = {"file": path.name, "measured_at": record["measured_at"], "commit": record.get("commit")}
        log.info("%s: filed in the ledger as %s", label, path)
        return path

    def entries(self) -> list[dict]:
        """Every entry (label, file, when and at which commit it was recorded)."""
        out = []
        for path in sorted(self.folder.glob("*.json")):
            entry = json.loads(path.read_text(encoding="utf-8"))
            if entry.get("format") == LEDGER_FORMAT:
                record = entry.get("provenance", {})
                out.append({"label": entry["label"], "file": path.name, "measured_at": record.get("measured_at"),
                            "commit": record.get("commit")})
        return out


def data_set_complete(folder: pathlib.Path) -> bool:
    """Whether ``hipatlas synth`` finished the data set in ``folder`` (its manifest says complete)."""
    manifest = pathlib.Path(folder) / "manifest.json"
    return manifest.is_file() and bool(json.loads(manifest.read_text(encoding="utf-8")).get("complete"))


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


# --------------------------------------------------------------------------------------------
# Held-out phantoms and their view pairs
# --------------------------------------------------------------------------------------------

@dataclass
class HeldOutPhantom:
    key: str
    femur: str
    ct_hu: np.ndarray
    labels: np.ndarray
    landmarks_mm: np.ndarray   # (L, 3), LANDMARK_NAMES order; row 0 the head centre
    seed: int


def held_out_phantoms(ctx: ExperimentContext, count: int, femurs: Sequence[str] = HELD_OUT_FEMURS
                      ) -> Iterator[HeldOutPhantom]:
    """``count`` phantoms of the held-out femurs (cycled), made once and cached in ``OUT/phantoms``."""
    from inference.data.dataset import PhantomSampling, _landmark_array, dataset_grid
    from inference.data.phantom import make_phantom, sample_phantom_params

    grid = dataset_grid(ctx.config.grid)
    sampling = PhantomSampling(max_translation_mm=10.0)
    folder = ctx.out / "phantoms"
    folder.mkdir(exist_ok=True)
    for index in range(count):
        femur = femurs[index % len(femurs)]
        seed = ctx.seed * 1000 + index
        key = f"p{index:03d}"
        path = folder / f"{key}.npz"
        if not path.is_file():
            rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
            params = sample_phantom_params(rng, max_rotation_deg=sampling.max_rotation_deg,
                                           max_translation_mm=sampling.max_translation_mm,
                                           max_hip_rotation_deg=sampling.max_hip_rotation_deg)
            phantom = make_phantom(femur, params, grid.geometry)
            tmp = path.with_suffix(".tmp.npz")
            np.savez_compressed(tmp, ct_hu=phantom.ct_hu.astype(np.float32), labels=phantom.labels.astype(np.uint8),
                                landmarks_mm=_landmark_array(phantom.landmarks_mm))
            tmp.replace(path)
        with np.load(path, allow_pickle=False) as data:
            yield HeldOutPhantom(key, femur, data["ct_hu"], data["labels"], data["landmarks_mm"].astype(np.float64), seed)


def test_pairs_spec(ctx: ExperimentContext, count: int, femurs: Sequence[str] = HELD_OUT_FEMURS,
                    angles_deg: Sequence[float] = (0.0, 90.0)) -> dict[str, Any]:
    """What defines the test pairs of :func:`held_out_phantoms` + :func:`render_pair` (for a
    ledger fingerprint): the seed, how many, which femurs, the grid and the view angles."""
    return {"seed": ctx.seed, "count": int(count), "femurs": list(femurs), "grid": ctx.config.grid,
            "angles_deg": [float(a) for a in angles_deg], "max_translation_mm": 10.0}


def render_pair(ctx: ExperimentContext, phantom: HeldOutPhantom, angles_deg: Sequence[float], *,
                angle_error_deg: Sequence[float] = (0.0, 0.0), draw: int = 0) -> dict[str, np.ndarray]:
    """A sample (as :func:`inference.data.dataset.iter_samples` yields) of ``phantom`` seen from
    ``angles_deg`` (LAO), the network told those angles while the radiographs were taken at
    ``angles_deg + angle_error_deg`` (a C-arm angle recorded wrongly; rotation about the patient's
    long axis through the isocentre). ``draw`` picks the isocentre and realism draw; the same
    draw with another error gives the same pair but for the error."""
    from inference.data.augment import CalibrationPerturbation, sample_realism_params
    from inference.data.dataset import (RenderSettings, SynthConfig, ViewSampling, dataset_grid,
                                        render_view_pair, sample_views)

    grid = dataset_grid(ctx.config.grid)
    rng = np.random.default_rng(np.random.SeedSequence([phantom.seed, 2, draw]))
    views, angles = sample_views(rng, ViewSampling(), phantom.landmarks_mm[0], angles_deg=angles_deg)
    realism = [sample_realism_params(rng, SynthConfig().realism) for _ in views]
    calibration = [CalibrationPerturbation(rotation_deg=(0.0, 0.0, float(e))) for e in angle_error_deg]
    rendered = render_view_pair(phantom.ct_hu, phantom.labels, grid.geometry, grid, views, RenderSettings(),
                                realism, calibration, views[0].isocentre_mm)
    return {"volume": phantom.ct_hu, "labels": phantom.labels, "images": rendered["images"],
            "masks": rendered["masks"], "projection": rendered["projection"],
            "index_to_world": grid.geometry.index_to_world(), "landmarks_mm": phantom.landmarks_mm.astype(np.float32),
            "view_angles_deg": angles, "subject": phantom.femur}


def register_metrics(ctx: ExperimentContext, sample: Mapping[str, np.ndarray]) -> dict[str, float]:
    """The held-out metrics of the model on one sample (femur label of the warped atlas vs truth)."""
    from inference.evaluate import evaluate_samples

    row = evaluate_samples(ctx.model, [sample], with_hip_centre=False)[0]
    return {k: row[k] for k in METRICS}


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------

def summary(values: Sequence[float]) -> dict[str, float | int | None]:
    finite = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if not finite.size:
        return {"mean": None, "sd": None, "median": None, "n": 0}
    return {"mean": float(finite.mean()), "sd": float(finite.std(ddof=1)) if finite.size > 1 else None,
            "median": float(np.median(finite)), "n": int(finite.size)}


def fmt(stats: Mapping[str, Any], digits: int = 3) -> str:
    if stats.get("mean") is None:
        return "n/a"
    sd = stats.get("sd")
    return f"{stats['mean']:.{digits}f}" + (f" +- {sd:.{digits}f}" if sd is not None else "")


def write_results(ctx: ExperimentContext, results: Mapping[str, Any], markdown: str) -> None:
    """``results.json`` (with provenance) and ``results.md`` in ``ctx.out``."""
    from inference.provenance import provenance, provenance_markdown

    record = provenance(ctx.model_path)
    ledger = {} if ctx.ledger is None else dict(sorted(ctx.ledger.used.items()))
    write_json_atomic(ctx.out / "results.json", _finite_or_none({"experiment": ctx.name, "scale": ctx.scale,
                                                                 "provenance": record, **results, "ledger": ledger}))
    trained = ""
    if ledger:
        trained = ("\n\nTrainings and their scores, as filed in the ledger `" + str(ctx.ledger.folder) + "` "
                   "(each may come from an earlier run on another machine):\n\n| training | entry | recorded | commit |\n"
                   "|---|---|---|---|\n" + "\n".join(f"| {label} | `{e['file']}` | {e['measured_at']} | "
                                                      f"`{(e['commit'] or '')[:10]}` |" for label, e in ledger.items()))
    write_text_atomic(ctx.out / "results.md", f"# Experiment `{ctx.name}` ({ctx.scale} scale)\n\n"
                      + provenance_markdown(record) + "\n" + markdown.rstrip() + trained + "\n")


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: pathlib.Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    tmp.replace(path)


__all__ = ["SCALES", "HELD_OUT_FEMURS", "METRICS", "ExperimentContext", "ExperimentProgress", "HeldOutPhantom",
           "Ledger", "LEDGER_FORMAT", "fingerprint", "test_pairs_spec", "data_set_complete",
           "held_out_phantoms", "render_pair", "register_metrics", "summary", "fmt", "write_results", "pyplot",
           "save_figure"]
