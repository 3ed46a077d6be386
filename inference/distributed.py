"""Training on several GPUs and several machines with TensorFlow's ``tf.distribute``.

Which strategy (:func:`make_strategy`)
    * A cluster (``TF_CONFIG`` in the environment, or :class:`Cluster` from ``hipatlas train
      --cluster host:port,host:port --task-index N``) of more than one task:
      ``MultiWorkerMirroredStrategy``; every worker runs the same command, the chief (task
      ``chief:0``, else ``worker:0``) writes checkpoints, TensorBoard logs and the exported model.
    * One machine with more than one GPU (or explicit ``devices``): ``MirroredStrategy``.
    * Otherwise TensorFlow's default strategy (one device; the shipped single-process behaviour).

The batch (:func:`split_batch`)
    The global batch is ``per-replica batch x replicas``; a global batch that does not split
    evenly over the replicas (batch 1 on two GPUs would leave one of them empty) is refused.
    Gradients are summed over replicas of a loss divided by their number, so a step equals one
    step on the global batch (up to batch normalisation, whose statistics are per replica).

Which samples a worker reads (:func:`pipeline_positions`)
    The data order is one infinite sequence of sample positions fixed by the seed
    (:func:`inference.data.stream.epoch_order`); step ``s`` consumes positions
    ``[s * global_batch, (s + 1) * global_batch)``, of which input pipeline ``i`` of ``n`` (one
    per worker) reads the ``i``-th contiguous share. A resumed run starts at its step and reads
    the same positions as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from inference.errors import ConfigError
from inference.validate import positive_int

log = logging.getLogger(__name__)

__all__ = ["Cluster", "parse_cluster", "tf_config_tasks", "make_strategy", "is_chief", "task_name",
           "split_batch", "pipeline_positions", "is_multi_worker", "cluster_failure_types"]

_ADDRESS = re.compile(r"^[A-Za-z0-9_.\-\[\]:]+:(\d{1,5})$")


@dataclass(frozen=True)
class Cluster:
    """The workers of a multi-worker run (``host:port`` each) and this process's index among them."""

    workers: tuple[str, ...]
    task_index: int

    def __post_init__(self) -> None:
        workers = tuple(str(w).strip() for w in self.workers)
        if not workers:
            raise ConfigError("--cluster lists no worker")
        for address in workers:
            match = _ADDRESS.match(address)
            if not match or not 0 < int(match.group(1)) < 65536:
                raise ConfigError(f"--cluster: {address!r} is not host:port (e.g. node1:23456)")
        if len(set(workers)) != len(workers):
            raise ConfigError("--cluster lists the same host:port twice")
        index = self.task_index
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(workers):
            raise ConfigError(f"--task-index must be 0..{len(workers) - 1} for {len(workers)} workers, "
                              f"not {index!r}")
        object.__setattr__(self, "workers", workers)

    def tf_config(self) -> dict:
        """The ``TF_CONFIG`` of this process (worker 0 is the chief)."""
        return {"cluster": {"worker": list(self.workers)},
                "task": {"type": "worker", "index": self.task_index}}


def parse_cluster(text: str, task_index: int) -> Cluster:
    """``"node1:23456,node2:23456"`` and this process's index -> :class:`Cluster`."""
    return Cluster(tuple(part for part in str(text).split(",") if part.strip()), task_index)


def tf_config_tasks(environ: Mapping[str, str] | None = None) -> tuple[str, int, int] | None:
    """(task type, task index, number of tasks) of ``TF_CONFIG``, or None when it is not set."""
    text = (os.environ if environ is None else environ).get("TF_CONFIG", "").strip()
    if not text:
        return None
    try:
        config = json.loads(text)
        jobs = config["cluster"]
        task = config.get("task", {})
        task_type, index = str(task["type"]), int(task.get("index", 0))
        count = sum(len(jobs.get(name, [])) for name in ("chief", "worker"))
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ConfigError(f"TF_CONFIG is not a valid cluster description ({error}); see "
                          "docs/training-at-scale.md") from None
    if task_type not in ("chief", "worker") or not 0 <= index < len(jobs.get(task_type, [])):
        raise ConfigError(f"TF_CONFIG names task {task_type}:{index}, which its cluster does not list")
    return task_type, index, count


def make_strategy(cluster: Cluster | None = None, devices: list[str] | None = None):
    """The ``tf.distribute`` strategy of this process and whether it computes on GPU.

    ``cluster`` (or ``TF_CONFIG``) of more than one task: MultiWorkerMirroredStrategy (its
    coordination service's heartbeats notice a lost worker and abort the step in the others).
    Must be called before TensorFlow runs any op in this process.
    """
    import tensorflow as tf

    if cluster is not None:
        os.environ["TF_CONFIG"] = json.dumps(cluster.tf_config())
    tasks = tf_config_tasks()
    gpus = tf.config.list_physical_devices("GPU")
    if tasks is not None and tasks[2] > 1:
        implementation = (tf.distribute.experimental.CommunicationImplementation.NCCL if gpus
                          else tf.distribute.experimental.CommunicationImplementation.RING)
        strategy = tf.distribute.MultiWorkerMirroredStrategy(
            communication_options=tf.distribute.experimental.CommunicationOptions(
                implementation=implementation))
        log.info("multi-worker training: %s of %d tasks, %d replicas", task_name(strategy), tasks[2],
                 strategy.num_replicas_in_sync)
        return strategy, bool(gpus)
    if devices:
        return tf.distribute.MirroredStrategy(devices=list(devices)), any("GPU" in d.upper() for d in devices)
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy(), True
    return tf.distribute.get_strategy(), bool(gpus)


def is_multi_worker(strategy) -> bool:
    import tensorflow as tf

    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and \
        strategy.extended._num_workers > 1


def _task(strategy) -> tuple[str | None, int]:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not is_multi_worker(strategy):
        return None, 0
    return resolver.task_type, int(resolver.task_id or 0)


def is_chief(strategy) -> bool:
    """Whether this process writes the run's outputs: the single process, ``chief:0``, or
    ``worker:0`` of a cluster without a chief task."""
    task_type, task_id = _task(strategy)
    if task_type is None or task_type == "chief":
        return True
    if task_type == "worker" and task_id == 0:
        spec = strategy.cluster_resolver.cluster_spec().as_dict()
        return "chief" not in spec
    return False


def task_name(strategy) -> str:
    task_type, task_id = _task(strategy)
    return "single process" if task_type is None else f"{task_type} {task_id}"


def split_batch(batch_size: int | None, per_replica_batch: int | None, replicas: int) -> tuple[int, int]:
    """(per-replica batch, global batch) from one of the two; refuses a global batch that leaves
    a replica empty or uneven."""
    replicas = int(replicas)
    if per_replica_batch is not None:
        per_replica_batch = positive_int(per_replica_batch, "the per-replica batch")
        return per_replica_batch, per_replica_batch * replicas
    if batch_size is None or batch_size % replicas:
        raise ConfigError(f"a global batch of {batch_size} does not split evenly over {replicas} replicas "
                          f"(devices x workers); use a multiple of {replicas} or give the per-replica "
                          "batch (--per-replica-batch)")
    return batch_size // replicas, batch_size


def pipeline_positions(start_step: int, global_batch: int, pipeline_id: int = 0,
                       num_pipelines: int = 1) -> Iterator[int]:
    """Positions in the seeded sample sequence that input pipeline ``pipeline_id`` reads, step
    after step from ``start_step``: its contiguous share of each global batch."""
    if global_batch % num_pipelines:
        raise ConfigError(f"a global batch of {global_batch} does not split over {num_pipelines} workers")
    share = global_batch // num_pipelines
    step = int(start_step)
    while True:
        first = step * global_batch + pipeline_id * share
        yield from range(first, first + share)
        step += 1


def cluster_failure_types() -> tuple[type, ...]:
    """TensorFlow errors by which a step reports a lost worker."""
    import tensorflow as tf

    return (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.CancelledError,
            tf.errors.AbortedError, tf.errors.FailedPreconditionError, tf.errors.InternalError,
            tf.errors.UnknownError)

