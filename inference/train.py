"""Training of the registration network on a ``hipatlas-dataset/1`` folder.

:func:`train` is a callback-driven long job: it reports :class:`TrainProgress` through
``progress`` and stops cleanly (after saving a checkpoint) when ``cancel`` fires, raising
:class:`~inference.errors.Cancelled`. Run it again with the same ``out_dir`` to resume from the
latest checkpoint (weights, batch-norm statistics, optimizer state, step, best score); the data
order is a pure function of ``(seed, step)``, so a resumed run sees the same batches as an
uninterrupted one.

Output folder::

    OUT_DIR/
      run.json              model config + training config (a resumed run must match them)
      checkpoints/          tf.train checkpoints every ``checkpoint_every`` steps (last few kept)
      logs/train, logs/val  TensorBoard event files (loss terms, steps/s, validation metrics)
      history.json          validation metrics per validation round
      model/                the best model so far (by validation ``best_metric``):
        hipatlas-<grid>.keras, model_card.json

Choices
    * Adam; a constant learning rate or a cosine decay to ``lr_final_fraction`` of it over the
      run; batch 1 by default (as VoxelMorph-style registration nets).
    * Fine-tuning: ``init_from`` starts from the weights of a saved ``.keras`` model (same config).
    * Several data sets may be combined (e.g. orthogonal and generalised view pairs, or synthetic
      phantoms and your own CTs from ``prepare-ct``): their train splits are pooled, and so are
      their validation splits.
    * Loss: :func:`inference.model.registration_losses` (global NCC of the affine and of the
      final result, smoothness of phi, optional Dice).
    * A ``tf.distribute`` strategy (:mod:`inference.distributed`): MultiWorkerMirroredStrategy
      for a cluster (``TF_CONFIG`` or ``cluster``; the chief writes checkpoints, logs and the
      model), MirroredStrategy on more than one GPU, the default otherwise; mixed precision
      (float16 compute, float32 sampling layers) by default only on GPU.
    * Input: a streaming ``tf.data`` pipeline (:mod:`inference.data.stream`) that reads and
      decodes the sample files in parallel, each worker its share of every global batch.
    * Validation each epoch (or every ``validate_every`` steps): Dice and ASSD of the warped atlas
      femur label on up to ``val_limit`` validation samples.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from inference import validate
from inference.data.stream import epoch_order  # the seeded sample order (tests read it here too)
from inference.errors import Cancelled, ClusterError, ConfigError, DataError

log = logging.getLogger(__name__)

RUN_FORMAT = "hipatlas-training-run/1"
_MIXED_PRECISION = ("auto", "on", "off")
_LR_SCHEDULES = ("constant", "cosine")
_EXPORTS = ("best", "last")


@dataclass(frozen=True)
class TrainConfig:
    """How to train (the network itself is a :class:`inference.model.ModelConfig`).

    Parameters
    ----------
    steps : int
        Total optimisation steps (a resumed run continues up to this number).
    batch_size : int
        Global batch size (split over the GPUs of a MirroredStrategy).
    learning_rate : float
        Adam learning rate.
    seed : int
        Seeds the weight initialisation and the data order.
    checkpoint_every : int
        Steps between checkpoints.
    keep_checkpoints : int
        Checkpoints kept on disk.
    validate_every : int
        Steps between validations; 0 = once per epoch (train samples / batch size).
    val_limit : int or None
        Validation samples used per validation (None = all).
    log_every : int
        Steps between TensorBoard scalars and progress reports.
    mixed_precision : {"auto", "on", "off"}
        "auto" = float16 compute on GPU only.
    best_metric : {"dice", "assd_mm"}
        Validation metric that selects the exported model.
    export : {"best", "last"}
        "best": the model with the best validation score is the result; "last": the model at the
        final step is (validation is still run and reported, but chooses nothing: how a run is
        kept honest when its validation specimen is also the one it will be tested on).
    run_eagerly : bool
        Run the train step eagerly instead of as a tf.function (debugging, and tiny test runs
        where tracing the step costs more than the few steps themselves).
    lr_schedule : {"constant", "cosine"}
        "cosine": the learning rate decays from ``learning_rate`` to
        ``learning_rate * lr_final_fraction`` along a half cosine over ``steps``.
    lr_final_fraction : float
        End of the cosine decay, as a fraction of ``learning_rate``.
    init_from : str or None
        A ``.keras`` model (of the same model config) whose weights start the run (fine-tuning);
        used only when the run starts, not when it resumes from a checkpoint.
    stop_at : int or None
        End the run after this step although the learning-rate schedule spans ``steps`` (how a
        run that was stopped early is reproduced); None = run all ``steps``.
    """

    steps: int = 20000
    batch_size: int = 1
    learning_rate: float = 1e-4
    seed: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    validate_every: int = 0
    val_limit: int | None = 20
    log_every: int = 10
    mixed_precision: str = "auto"
    best_metric: str = "dice"
    export: str = "best"
    run_eagerly: bool = False
    lr_schedule: str = "constant"
    lr_final_fraction: float = 0.05
    init_from: str | None = None
    stop_at: int | None = None

    def __post_init__(self) -> None:
        for name, minimum in (("steps", 1), ("batch_size", 1), ("checkpoint_every", 1),
                              ("keep_checkpoints", 1), ("validate_every", 0), ("log_every", 1),
                              ("seed", 0)):
            object.__setattr__(self, name, validate.whole_number(getattr(self, name), f"TrainConfig {name}", minimum))
        if self.val_limit is not None:
            object.__setattr__(self, "val_limit",
                               validate.positive_int(self.val_limit, "TrainConfig val_limit (or None)"))
        lr = self.learning_rate
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise ConfigError(f"learning_rate must be a number > 0, not {lr!r}")
        if self.mixed_precision not in _MIXED_PRECISION:
            raise ConfigError(f"mixed_precision must be one of {_MIXED_PRECISION}, not {self.mixed_precision!r}")
        if self.lr_schedule not in _LR_SCHEDULES:
            raise ConfigError(f"lr_schedule must be one of {_LR_SCHEDULES}, not {self.lr_schedule!r}")
        fraction = self.lr_final_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
            raise ConfigError(f"lr_final_fraction must be a number in [0, 1], not {fraction!r}")
        if self.init_from is not None and not isinstance(self.init_from, str):
            raise ConfigError(f"init_from must be a path to a .keras model, not {self.init_from!r}")
        if self.stop_at is not None and (isinstance(self.stop_at, bool) or not isinstance(
                self.stop_at, (int, np.integer)) or not 1 <= self.stop_at <= self.steps):
            raise ConfigError(f"stop_at must be a step between 1 and steps ({self.steps}), not {self.stop_at!r}")
        if self.best_metric not in ("dice", "assd_mm"):
            raise ConfigError(f"best_metric must be 'dice' or 'assd_mm', not {self.best_metric!r}")
        if self.export not in _EXPORTS:
            raise ConfigError(f"export must be one of {_EXPORTS}, not {self.export!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainConfig":
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"unknown training config field(s): {', '.join(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class TrainProgress:
    """One progress report: ``fraction`` of the run done, the latest loss terms and validation."""

    step: int
    total_steps: int
    fraction: float
    message: str
    losses: dict = field(default_factory=dict)
    validation: dict | None = None
    steps_per_s: float | None = None


@dataclass(frozen=True)
class TrainResult:
    out_dir: pathlib.Path
    steps_done: int
    resumed_from_step: int
    best_model_path: pathlib.Path | None
    best_score: float | None
    last_validation: dict | None


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

def _split_entries(manifest: Mapping[str, Any], split: str) -> list[dict]:
    return [e for e in manifest["samples"] if e.get("split") == split]


def data_folders(data_dir: str | os.PathLike | Sequence[str | os.PathLike]) -> list[pathlib.Path]:
    """One data set folder or several, as a non-empty list of paths."""
    if isinstance(data_dir, (str, os.PathLike)):
        folders = [pathlib.Path(data_dir)]
    else:
        folders = [pathlib.Path(d) for d in data_dir]
    if not folders:
        raise ConfigError("no training data set was given")
    if len({f.resolve() for f in folders}) != len(folders):
        raise ConfigError("the same data set folder was given twice")
    return folders


def pooled_entries(folders: Sequence[pathlib.Path], manifests: Sequence[Mapping[str, Any]],
                   split: str) -> list[dict]:
    """The samples of ``split`` of every data set, each with its file's full path (``_path``)."""
    return [{**entry, "_path": str(folder / entry["file"])}
            for folder, manifest in zip(folders, manifests) for entry in _split_entries(manifest, split)]


def learning_rate_at(train_config: "TrainConfig", step: int) -> float:
    """The learning rate of optimisation step ``step`` (0-based) under the run's schedule."""
    base = float(train_config.learning_rate)
    if train_config.lr_schedule == "constant":
        return base
    progress = min(max(step, 0), train_config.steps) / train_config.steps
    final = base * float(train_config.lr_final_fraction)
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * progress))


def _check_dataset(manifest: Mapping[str, Any], config, data_dir) -> None:
    grid = manifest.get("grid") or {}
    shape = tuple(grid.get("shape_zyx") or ())
    detector = tuple(manifest.get("detector_hw") or grid.get("detector_hw") or ())
    if shape and shape != tuple(config.shape_zyx):
        raise ConfigError(f"the data set in {data_dir} is on grid {shape}, the model on "
                          f"shape_zyx {config.shape_zyx}; generate data for grid {config.grid!r}")
    if detector and detector != tuple(config.detector_hw):
        raise ConfigError(f"the data set in {data_dir} has detector {detector}, the model "
                          f"detector_hw {config.detector_hw}")


def _example(arrays: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
    from inference.data.stream import training_example

    return training_example(arrays)


def training_examples(entries: list[dict], seed: int, start_sample: int = 0) -> Iterator[tuple[dict, dict]]:
    """Endless stream of (inputs, targets) of ``entries`` (:func:`pooled_entries`) in the order of
    :func:`epoch_order`, starting at the ``start_sample``-th sample of that infinite sequence (for
    resuming)."""
    from inference.data.dataset import load_sample

    count = len(entries)
    epoch, offset = divmod(int(start_sample), count)
    while True:
        order = epoch_order(count, seed, epoch)
        for position in range(offset, count):
            entry = entries[order[position]]
            yield _example(load_sample(entry["_path"]))
        epoch, offset = epoch + 1, 0


def _dataset(entries, config, train_config, start_step, strategy):
    """The distributed streaming input (:mod:`inference.data.stream`): each worker's input
    pipeline reads its share of every global batch of the seeded order, from ``start_step``.
    The batches equal those of :func:`training_examples` (tested)."""
    from inference.data.stream import training_dataset
    from inference.distributed import pipeline_positions

    global_batch = train_config.batch_size
    paths = [entry["_path"] for entry in entries]

    def per_worker(context):
        batch = context.get_per_replica_batch_size(global_batch)
        return training_dataset(
            paths, train_config.seed, batch,
            lambda: pipeline_positions(start_step, global_batch, context.input_pipeline_id,
                                       context.num_input_pipelines),
            shape_zyx=config.shape_zyx, detector_hw=config.detector_hw)

    return strategy.distribute_datasets_from_function(per_worker)


# --------------------------------------------------------------------------------------------
# Output folder helpers
# --------------------------------------------------------------------------------------------

def _write_json_atomic(path: pathlib.Path, payload: Any) -> None:
    from inference.io import write_text_atomic

    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, pathlib.Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _one_or_list(values: list) -> Any:
    """One data set's value plain, several data sets' values as a list (run.json, model card)."""
    return values[0] if len(values) == 1 else values


def _data_dir_record(folders: Sequence[pathlib.Path]) -> str | list[str]:
    return _one_or_list([str(f.resolve()) for f in folders])


def _check_run_file(out: pathlib.Path, config, train_config: TrainConfig, folders) -> None:
    """Write ``run.json`` on a fresh run; on a resumed run require the same configs."""
    from inference.model import ModelConfig

    path = out / "run.json"
    run = {"format": RUN_FORMAT, "model_config": config.to_dict(),
           "train_config": train_config.to_dict(), "data_dir": _data_dir_record(folders)}
    if path.is_file():
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))
            previous_model = ModelConfig.from_dict(previous["model_config"])
            previous_train = TrainConfig.from_dict(previous["train_config"])
        except (OSError, ValueError, KeyError, TypeError, ConfigError) as error:
            raise ConfigError(f"{path} cannot be read ({error}); use a new output folder") from None
        if previous_model != config:
            raise ConfigError(f"{out} holds a run of another model config; use a new output folder")
        # Only the length of the run and the logging cadence may change on resume.
        mutable = {"steps", "log_every", "checkpoint_every", "keep_checkpoints", "validate_every",
                   "val_limit", "run_eagerly", "init_from", "stop_at"}
        changed = [f.name for f in fields(TrainConfig) if f.name not in mutable
                   and getattr(previous_train, f.name) != getattr(train_config, f.name)]
        if changed:
            raise ConfigError(f"{out} holds a run with different {', '.join(changed)}; use a new output "
                              "folder or the same settings to resume")
    _write_json_atomic(path, run)


def export_model(model, out_dir: pathlib.Path, card_extra: Mapping[str, Any]) -> pathlib.Path:
    """Write ``out_dir/model/hipatlas-<grid>.keras`` + its card, replacing the folder atomically."""
    from inference.model import model_config_of, save_model

    config = model_config_of(model)
    from inference.io import atomic_output_dir

    final = out_dir / "model"
    with atomic_output_dir(final, overwrite=True) as staging:
        path, _ = save_model(model, staging / f"hipatlas-{config.grid}.keras", card_extra=card_extra)
    return final / path.name


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

def _scalar(tag: str, value: float) -> None:
    """A TensorBoard scalar in the current default writer (step set by ``as_default``).

    ``tf.summary.scalar`` needs the ``tensorboard`` package; this writes the same record (a
    float tensor tagged for the "scalars" plugin) with TensorFlow alone.
    """
    import tensorflow as tf
    from tensorflow.core.framework import summary_pb2

    metadata = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
    tf.summary.write(tag, tf.constant(float(value), tf.float32), metadata=metadata)


def _strategy(cluster=None):
    from inference.distributed import make_strategy

    return make_strategy(cluster)


def run_ops_one_at_a_time(config) -> bool:
    """With gradient checkpointing (``config.recompute``), let the TensorFlow runtime run one
    graph op at a time (inter-op threads = 1; each op still uses every core).

    With parallel ops the executor runs independent branches (the two views' decoders, their
    backward passes) side by side, and the tensors of all of them are alive at once: measured
    here at a fifth of the paper preset, a training step's tensor peak was the same 4.7 GB with
    and without checkpointing, and 2.7 GB with checkpointing and one op at a time (4.0 GB
    without it); its step took 5.5 s instead of 4.9 s. Must run before TensorFlow's runtime
    starts; returns whether the setting is in effect.
    """
    import tensorflow as tf

    if not config.recompute:
        return False
    try:
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # the runtime already started in this process (tests, notebooks)
        if tf.config.threading.get_inter_op_parallelism_threads() != 1:
            log.warning("TensorFlow already runs ops in parallel in this process: gradient checkpointing "
                        "saves less memory (start a fresh process to get the full saving)")
            return False
    return True


def _is_cancelled(cancel: Any) -> bool:
    if cancel is None:
        return False
    return bool(cancel.is_set() if hasattr(cancel, "is_set") else cancel())


def _load_atlas(atlas, config):
    if atlas is None:
        from inference.data.atlas import load_atlas

        atlas = load_atlas(config.grid)
    return atlas


def _validate(model, entries, limit, cancel) -> dict:
    from inference.data.dataset import load_sample
    from inference.evaluate import evaluate_samples, summarise

    def samples():
        for entry in entries:
            yield {**load_sample(entry["_path"]), "subject": entry.get("subject", ""),
                   "sample_index": int(entry.get("index", 0)), "path": entry["_path"]}

    rows = evaluate_samples(model, samples(), limit=limit, with_ssim=False, with_hip_centre=False,
                            cancel=cancel)
    summary = summarise(rows, ("dice", "assd_mm"))
    return {"dice": summary["dice"]["mean"], "assd_mm": summary["assd_mm"]["mean"],
            "samples": len(rows), "failures": summary["assd_mm"]["failures"]}


def train(config, data_dir: str | os.PathLike, out_dir: str | os.PathLike, steps: int | None = None, *,
          train_config: TrainConfig | None = None, atlas: Any = None,
          progress: Callable[[TrainProgress], None] | None = None, cancel: Any = None,
          strategy: Any = None, cluster: Any = None, per_replica_batch: int | None = None) -> TrainResult:
    """Train (or resume training of) the registration network.

    Parameters
    ----------
    config : ModelConfig or preset name
    data_dir : a ``hipatlas-dataset/1`` folder with a ``train`` split (and ideally ``val``), or a
        sequence of such folders whose splits are pooled
    out_dir : run folder (created; an existing run there is resumed)
    steps : total steps (overrides ``train_config.steps``)
    train_config : TrainConfig
    atlas : the atlas (see :func:`inference.model.build_model`); default the installed atlas of
        the config's grid
    progress : called with :class:`TrainProgress` every ``log_every`` steps and after validation
    cancel : callable returning True, or a threading.Event, checked every step
    strategy : a ``tf.distribute`` strategy (default :func:`inference.distributed.make_strategy`:
        from ``cluster`` or ``TF_CONFIG``, MirroredStrategy on several GPUs, else one device)
    cluster : :class:`inference.distributed.Cluster` of a multi-worker run (every worker calls
        :func:`train` with the same arguments and its own task index; the chief writes the outputs,
        ``out_dir`` must be on storage every worker sees)
    per_replica_batch : batch per replica; the global batch (``train_config.batch_size``, which the
        run records) becomes this times the replicas. Without it the global batch must split
        evenly over the replicas.

    Returns
    -------
    TrainResult

    Raises
    ------
    Cancelled
        After writing a checkpoint, when ``cancel`` fired.
    ClusterError
        A worker of a multi-worker run was lost; rerunning every worker resumes.
    """
    import keras
    import tensorflow as tf

    from inference import distributed
    from inference.data.dataset import load_manifest
    from inference.model import ModelConfig, build_model, preset, registration_losses

    if isinstance(config, str):
        config = preset(config)
    if not isinstance(config, ModelConfig):
        raise ConfigError(f"config must be a ModelConfig or a preset name, not {type(config).__name__}")
    train_config = train_config or TrainConfig()
    if steps is not None:
        train_config = TrainConfig.from_dict({**train_config.to_dict(), "steps": steps})
    out = pathlib.Path(out_dir)
    folders = data_folders(data_dir)
    manifests = [load_manifest(folder) for folder in folders]
    for folder, manifest in zip(folders, manifests):
        _check_dataset(manifest, config, folder)
    train_entries = pooled_entries(folders, manifests, "train")
    val_entries = pooled_entries(folders, manifests, "val")
    if not train_entries:
        raise DataError(f"the data set(s) in {', '.join(map(str, folders))} have no training samples")

    run_ops_one_at_a_time(config)
    if strategy is None:
        strategy, on_gpu = _strategy(cluster)
    else:
        on_gpu = bool(tf.config.list_physical_devices("GPU"))
    replicas = strategy.num_replicas_in_sync
    _, global_batch = distributed.split_batch(None if per_replica_batch else train_config.batch_size,
                                              per_replica_batch, replicas)
    if global_batch != train_config.batch_size:
        train_config = TrainConfig.from_dict({**train_config.to_dict(), "batch_size": global_batch})
    chief = distributed.is_chief(strategy)
    multi_worker = distributed.is_multi_worker(strategy)
    if chief:
        out.mkdir(parents=True, exist_ok=True)
        _check_run_file(out, config, train_config, folders)
    atlas = _load_atlas(atlas, config)
    use_mixed = train_config.mixed_precision == "on" or (train_config.mixed_precision == "auto" and on_gpu)
    previous_policy = keras.config.dtype_policy()
    if use_mixed:
        keras.config.set_dtype_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(train_config.seed)
        with strategy.scope():
            model = build_model(config, atlas)
            optimizer = keras.optimizers.Adam(train_config.learning_rate)
            if use_mixed:
                optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
            optimizer.build(model.trainable_variables)
            best_score = tf.Variable(np.nan, dtype=tf.float64, trainable=False, name="best_score")
            wall_time = tf.Variable(0.0, dtype=tf.float64, trainable=False, name="wall_time_s")
    finally:
        keras.config.set_dtype_policy(previous_policy)

    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, best_score=best_score,
                                     wall_time=wall_time)
    # Every worker saves (saving may read variables through collectives); only the chief's
    # checkpoints are kept, the others go to a scratch folder removed at the end.
    scratch = None if chief else pathlib.Path(tempfile.mkdtemp(prefix="hipatlas-worker-"))
    manager = tf.train.CheckpointManager(checkpoint, str(out / "checkpoints" if chief else scratch),
                                         max_to_keep=train_config.keep_checkpoints)
    start_step = 0
    latest = tf.train.latest_checkpoint(str(out / "checkpoints"))  # the chief's, for every worker
    if latest:
        checkpoint.restore(latest).expect_partial()
        start_step = int(optimizer.iterations.numpy())
        log.info("resuming %s from step %d (%s)", out, start_step, distributed.task_name(strategy))
    elif train_config.init_from:
        _initialise_from(model, train_config.init_from)
    history_path = out / "history.json"
    history = json.loads(history_path.read_text()) if chief and history_path.is_file() else []
    # Validations after the restored checkpoint belong to steps that will be redone.
    history = [h for h in history if int(h.get("step", 0)) <= start_step]

    def replica_step(inputs, targets):
        with tf.GradientTape() as tape:
            outputs = model(inputs, training=True)
            terms = registration_losses(config, outputs, targets["fixed"], targets["labels"])
            # Gradients of the replicas are summed: divide so that the sum is the batch mean.
            loss = terms["total"] / replicas
            scaled = optimizer.scale_loss(loss) if use_mixed else loss
        grads = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return terms

    def train_step(inputs, targets):
        per_replica = strategy.run(replica_step, args=(inputs, targets))
        return {k: strategy.reduce(tf.distribute.ReduceOp.MEAN, v, axis=None) for k, v in per_replica.items()}

    if not train_config.run_eagerly:
        # No jit_compile here: Conv3D is slow under XLA on CPU; the sampling layers compile
        # their own kernels.
        train_step = tf.function(train_step)

    steps_per_epoch = max(1, len(train_entries) // train_config.batch_size)
    validate_every = train_config.validate_every or steps_per_epoch
    higher_better = train_config.best_metric == "dice"
    if chief:
        writer_train = tf.summary.create_file_writer(str(out / "logs" / "train"))
        writer_val = tf.summary.create_file_writer(str(out / "logs" / "val"))
    else:
        writer_train = writer_val = tf.summary.create_noop_writer()
    best_path = out / "model" / f"hipatlas-{config.grid}.keras"
    last_validation = history[-1]["metrics"] if history else None
    total = train_config.steps if train_config.stop_at is None else train_config.stop_at

    def report(step, message, losses=None, validation=None, rate=None):
        if progress is not None:
            progress(TrainProgress(step, total, min(1.0, step / total), message, dict(losses or {}),
                                   validation, rate))

    data_card = _data_card(folders, manifests)  # hashed once, not at every export

    def card_extra(step, metrics):
        training = {"steps": int(step), "train_config": train_config.to_dict(), **data_card,
                    "wall_time_s": round(float(wall_time.numpy()), 1)}
        return {"training": training, "validation": metrics}

    def run_validation(step):
        nonlocal last_validation
        if not val_entries or not chief:
            return
        started = time.perf_counter()
        metrics = _validate(model, val_entries, train_config.val_limit, cancel)
        log.info("step %d: validated %d samples in %.1f s", step, metrics["samples"], time.perf_counter() - started)
        last_validation = metrics
        history.append({"step": step, "metrics": metrics})
        _write_json_atomic(history_path, history)
        with writer_val.as_default(step=step):
            for name, value in metrics.items():
                if isinstance(value, float) and math.isfinite(value):
                    _scalar(f"val/{name}", value)
        score = metrics[train_config.best_metric]
        best = float(best_score.numpy())
        improved = math.isfinite(score) and (not math.isfinite(best) or (
            score > best if higher_better else score < best))
        if improved:
            best_score.assign(score)
            if train_config.export == "best":
                export_model(model, out, card_extra(step, metrics))
                log.info("step %d: new best %s %.4f, model exported", step, train_config.best_metric, score)
        report(step, f"validation at step {step}: Dice {metrics['dice']:.3f}, "
               f"ASSD {metrics['assd_mm']:.2f} mm", validation=metrics)

    dataset = _dataset(train_entries, config, train_config, start_step, strategy)
    iterator = iter(dataset)
    report(start_step, "starting" if start_step == 0 else f"resuming at step {start_step}")
    step = start_step
    window_start, window_steps = time.perf_counter(), 0
    clock = window_start
    losses: dict = {}
    try:
        while step < total:
            if _is_cancelled(cancel):
                raise Cancelled("cancelled")
            try:
                inputs, targets = next(iterator)
            except tf.errors.OpError as error:
                raise (_input_error(error) or error) from None
            if train_config.lr_schedule != "constant":
                optimizer.learning_rate.assign(learning_rate_at(train_config, step))
            terms = train_step(inputs, targets)
            step += 1
            window_steps += 1
            if step % train_config.log_every == 0 or step == total:
                losses = {k: float(v) for k, v in terms.items()}
                if not math.isfinite(losses["total"]):
                    raise DataError(f"the training loss became {losses['total']} at step {step}; lower "
                                    "the learning rate or check the data set")
                rate = window_steps / max(time.perf_counter() - window_start, 1e-9)
                window_start, window_steps = time.perf_counter(), 0
                with writer_train.as_default(step=step):
                    for name, value in losses.items():
                        _scalar(f"loss/{name}", value)
                    _scalar("steps_per_s", rate)
                report(step, f"step {step}/{total}: loss {losses['total']:.4f}", losses, rate=rate)
            now = time.perf_counter()
            wall_time.assign_add(now - clock)
            clock = now
            # Validate before checkpointing so that the checkpoint holds the best score so far.
            if step % validate_every == 0 or step == total:
                run_validation(step)
            if step % train_config.checkpoint_every == 0 or step == total:
                manager.save(checkpoint_number=step)
    except Cancelled:
        # Cancelled between steps or during a validation: keep the work done so far.
        manager.save(checkpoint_number=step)
        raise Cancelled(f"training cancelled at step {step}; run again with the same output "
                        "folder to resume") from None
    except distributed.cluster_failure_types() as error:
        if not multi_worker:
            raise
        saved = tf.train.latest_checkpoint(str(out / "checkpoints"))
        raise ClusterError(
            f"multi-worker training stopped at step {step} ({distributed.task_name(strategy)}): another "
            f"worker is gone or unreachable ({type(error).__name__}: {_short_reason(error)}); "
            f"restart every worker with the same command to resume from "
            f"{'checkpoint ' + pathlib.Path(saved).name if saved else 'the start'}") from None
    finally:
        writer_train.flush()
        writer_val.flush()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)

    if chief and (not val_entries or train_config.export == "last"):
        # Without validation data, or when asked, the last model is the result.
        export_model(model, out, card_extra(step, last_validation if val_entries else None))
    best = float(best_score.numpy())
    report(step, "training finished", losses, last_validation)
    return TrainResult(out, step, start_step, best_path if best_path.is_file() else None,
                       best if math.isfinite(best) else None, last_validation)


def _short_reason(error) -> str:
    """TensorFlow's message of ``error`` without its op names, on one line (at most 240 characters)."""
    import re

    text = re.sub(r"\{\{[^}]*\}\}", "", str(error))
    text = re.sub(r"\[Op:[^\]]*\].*", "", text, flags=re.S)
    return " ".join(text.split())[:240]


def _input_error(error):
    from inference.data.stream import input_error

    return input_error(error)


def _data_card(folders, manifests) -> dict:
    """What the model card says of the training data (one data set: plain values; several: lists)."""
    from inference.checksums import sha256_file

    return {"data_dir": _data_dir_record(folders),
            "data_manifest_sha256": _one_or_list([sha256_file(f / "manifest.json") for f in folders]),
            "dataset_samples": sum(len(m["samples"]) for m in manifests),
            "dataset_parameters": _one_or_list([m.get("parameters", {}) for m in manifests])}


def _initialise_from(model, path: str) -> None:
    """Copy the weights of the saved model ``path`` into ``model`` (same architecture)."""
    from inference.model import load_model

    source = load_model(path, require_card=False)
    if [tuple(w.shape) for w in source.weights] != [tuple(w.shape) for w in model.weights]:
        raise ConfigError(f"{path} is a model of another architecture; it cannot initialise this run")
    model.set_weights(source.get_weights())
    log.info("initialised the weights from %s", path)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def add_parser(subparsers) -> None:
    """``hipatlas train --data DIR --out DIR [--preset compact] [--steps N] ...``."""
    parser = subparsers.add_parser(
        "train", help="train the registration network on a data set",
        description="Train (or resume) the network on a data set made by `hipatlas synth` or "
        "`hipatlas prepare-ct`; writes checkpoints, TensorBoard logs and the best model with its model card.")
    parser.add_argument("--data", action="append",
                        help="data set folder (manifest.json); repeat to pool several data sets")
    parser.add_argument("--out", required=True, help="run folder (an existing run is resumed); with "
                        "--recipe, the work folder of the whole recipe")
    parser.add_argument("--recipe", metavar="CARD_OR_RECIPE",
                        help="regenerate a model from nothing: run every data set, training stage and "
                        "the verification of this recipe (a hipatlas-recipe/1 file or a model card "
                        "with training.recipe); resumable: run it again to continue")
    parser.add_argument("--dry-run", action="store_true", help="with --recipe: print its commands only")
    parser.add_argument("--preset", default="compact", help="model preset: compact or paper")
    parser.add_argument("--model-config", help="JSON model config (overrides --preset)")
    defaults = TrainConfig()
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"global batch, split over all replicas (default {defaults.batch_size})")
    parser.add_argument("--per-replica-batch", type=int, default=None,
                        help="batch per GPU/worker replica; the global batch is this times the replicas")
    parser.add_argument("--cluster", metavar="HOST:PORT,...",
                        help="multi-worker training: every worker's host:port (the same list on each "
                        "worker; worker 0 is the chief); without it TF_CONFIG is used if set")
    parser.add_argument("--task-index", type=int, default=None,
                        help="with --cluster: this worker's index in the list")
    parser.add_argument("--lr", type=float, default=defaults.learning_rate, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    parser.add_argument("--validate-every", type=int, default=defaults.validate_every,
                        help="steps between validations (0 = each epoch)")
    parser.add_argument("--val-limit", type=int, default=defaults.val_limit)
    parser.add_argument("--mixed-precision", choices=_MIXED_PRECISION, default=defaults.mixed_precision)
    parser.add_argument("--lr-schedule", choices=_LR_SCHEDULES, default=defaults.lr_schedule,
                        help="constant, or cosine decay to --lr-final-fraction of --lr over the run")
    parser.add_argument("--lr-final-fraction", type=float, default=defaults.lr_final_fraction)
    parser.add_argument("--init-from", metavar="MODEL.keras",
                        help="start from the weights of this model (fine-tuning; same model config)")
    parser.add_argument("--export", choices=_EXPORTS, default=defaults.export,
                        help="best: the best validated model is the result (default); last: the final step's "
                        "model is, validation only reported")
    parser.add_argument("--stop-at", type=int, metavar="STEP",
                        help="end after this step although the learning-rate schedule spans --steps")
    parser.set_defaults(handler=_cli_train)


def _cli_train(args) -> int:
    from inference.model import ModelConfig, preset

    if args.recipe:
        from inference.recipe import run_cli

        return run_cli(args.recipe, args.out, dry_run=args.dry_run)
    if not args.data:
        raise ConfigError("train needs --data DIR (or --recipe CARD)")

    if args.model_config:
        try:
            text = pathlib.Path(args.model_config).read_text(encoding="utf-8")
        except OSError as error:
            raise ConfigError(f"cannot read the model config {args.model_config}: {error}") from None
        config = ModelConfig.from_json(text)
    else:
        config = preset(args.preset)
    if args.batch_size is not None and args.per_replica_batch is not None:
        raise ConfigError("give --batch-size (global) or --per-replica-batch, not both")
    cluster = None
    if args.cluster:
        from inference.distributed import parse_cluster

        if args.task_index is None:
            raise ConfigError("--cluster needs --task-index (this worker's place in the list)")
        cluster = parse_cluster(args.cluster, args.task_index)
    elif args.task_index is not None:
        raise ConfigError("--task-index needs --cluster")
    batch_size = TrainConfig().batch_size if args.batch_size is None else args.batch_size
    train_config = TrainConfig(steps=args.steps, batch_size=batch_size, learning_rate=args.lr,
                               seed=args.seed, checkpoint_every=args.checkpoint_every,
                               validate_every=args.validate_every, val_limit=args.val_limit,
                               mixed_precision=args.mixed_precision, lr_schedule=args.lr_schedule,
                               lr_final_fraction=args.lr_final_fraction, stop_at=args.stop_at,
                               export=args.export,
                               init_from=str(pathlib.Path(args.init_from).resolve()) if args.init_from else None)

    def show(p: TrainProgress) -> None:
        print(f"{100 * p.fraction:5.1f}% {p.message}", file=sys.stderr, flush=True)

    result = train(config, args.data, args.out, train_config=train_config, progress=show, cluster=cluster,
                   per_replica_batch=args.per_replica_batch)
    print(json.dumps({"steps": result.steps_done, "best_model": str(result.best_model_path),
                      "best_score": result.best_score, "validation": result.last_validation},
                     indent=2, default=_json_default))
    return 0
