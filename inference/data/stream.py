"""The streaming ``tf.data`` input of training: sample files read and decoded in parallel.

:func:`training_dataset` turns the seeded sample order of a run (:func:`epoch_order`
over the pooled training samples) into batches of ``(inputs, targets)``:

1. a generator of the sample indices this input pipeline reads (its share of each global batch,
   :func:`inference.distributed.pipeline_positions`), from the run's start step: cheap integers;
2. ``map(tf.io.read_file)`` in parallel: the file reads run in TensorFlow's threads;
3. ``map(decode)`` in parallel: npz decompression (zlib releases the GIL) and the targets
   (:func:`training_example`);
4. ``batch(per-replica batch)`` and ``prefetch``.

Both maps are ``deterministic``, so the batches are the same, in the same order, as reading the
files one after the other (:func:`inference.train.training_examples`), for any parallelism. One
sample is one file, so there is no record stream to interleave: the parallel read map is what
an interleave over multi-record files (TFRecord) would give. Sharding between workers is by
sample position (each worker reads only its share), not by TensorFlow's auto-shard, which is
switched off: auto-shard by file would change the order with the number of workers.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from inference import errors

_RAISED = re.compile(r"inference\.errors\.(\w+): (.+)")

__all__ = ["training_example", "sample_indices", "training_dataset", "signature", "input_error"]

_INPUT_KEYS = ("images", "masks", "projection", "index_to_world")


def training_example(arrays: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
    """(inputs, targets) of one sample's arrays: the model inputs without the batch axis, the
    fixed femur intensity and the labels (each with a channel axis)."""
    from inference.model import femur_intensity, inputs_from_sample

    inputs = {k: v[0] for k, v in inputs_from_sample(arrays).items()}
    labels = np.asarray(arrays["labels"], np.uint8)
    targets = {"fixed": femur_intensity(arrays["volume"], labels)[..., None],
               "labels": labels[..., None]}
    return inputs, targets


def epoch_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the training samples in one epoch: a permutation fixed by (seed, epoch)."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(num_samples)


def sample_indices(count: int, seed: int, positions: Iterator[int]) -> Iterator[int]:
    """The sample index at each position of the run's infinite seeded order."""
    cached_epoch, order = -1, None
    for position in positions:
        epoch, offset = divmod(int(position), count)
        if epoch != cached_epoch:
            cached_epoch, order = epoch, epoch_order(count, seed, epoch)
        yield int(order[offset])


def signature(shape_zyx: Sequence[int], detector_hw: Sequence[int]):
    """The ``tf.TensorSpec`` structure of one (inputs, targets) example."""
    import tensorflow as tf

    height, width = detector_hw
    grid = tuple(shape_zyx)
    return (
        {"images": tf.TensorSpec((2, height, width), tf.float32),
         "masks": tf.TensorSpec((2, height, width), tf.float32),
         "projection": tf.TensorSpec((2, 3, 4), tf.float32),
         "index_to_world": tf.TensorSpec((4, 4), tf.float32)},
        {"fixed": tf.TensorSpec(grid + (1,), tf.float32),
         "labels": tf.TensorSpec(grid + (1,), tf.uint8)},
    )


# What the decoding function returns (numpy dtypes as stored); the casts and the femur intensity
# are TensorFlow ops, which run outside Python's lock.
_RAW = (("images", "float32"), ("masks", "uint8"), ("projection", "float64"), ("index_to_world", "float64"),
        ("volume", "float32"), ("labels", "uint8"))


def _decode(data: bytes, path: bytes) -> tuple[np.ndarray, ...]:
    from inference.data.dataset import decode_sample

    arrays = decode_sample(data, path.decode("utf-8", "replace"), writable=False)
    return tuple(np.asarray(arrays[key], dtype) for key, dtype in _RAW)


def training_dataset(paths: Sequence[str], seed: int, batch: int, positions: Callable[[], Iterator[int]], *,
                     shape_zyx: Sequence[int], detector_hw: Sequence[int],
                     parallel: int | None = None, prefetch: int | None = None) -> Any:
    """Endless ``tf.data.Dataset`` of batches of ``batch`` examples of the files ``paths`` at the
    sample positions that ``positions()`` yields, in the seeded order (see the module docstring).

    ``parallel``: parallel reads and decodes (default: TensorFlow's autotune); ``prefetch``:
    batches read ahead (default autotune).
    """
    import tensorflow as tf

    from inference.model import FEMUR_LABEL

    count = len(paths)
    spec = signature(shape_zyx, detector_hw)
    raw_shapes = [spec[0][k].shape for k in _INPUT_KEYS] + [spec[1]["labels"].shape[:-1]] * 2
    table = tf.constant([str(p) for p in paths])
    calls = tf.data.AUTOTUNE if parallel is None else int(parallel)

    def read(index):
        path = tf.gather(table, index)
        return tf.io.read_file(path), path

    def decode(data, path):
        values = tf.numpy_function(_decode, [data, path], [tf.as_dtype(dtype) for _, dtype in _RAW], stateful=False)
        for value, shape in zip(values, raw_shapes):
            value.set_shape(shape)
        inputs = {key: tf.cast(value, tf.float32) for key, value in zip(_INPUT_KEYS, values[:4])}
        volume, labels = values[4], values[5]
        # inference.model.femur_intensity, the same float32 operations
        fixed = tf.where(labels == FEMUR_LABEL, tf.maximum(volume + 1000.0, 0.0) / 1000.0, 0.0)
        return inputs, {"fixed": fixed[..., None], "labels": labels[..., None]}

    ds = tf.data.Dataset.from_generator(lambda: sample_indices(count, seed, positions()),
                                        output_signature=tf.TensorSpec((), tf.int64))
    ds = ds.map(read, num_parallel_calls=calls, deterministic=True)
    ds = ds.map(decode, num_parallel_calls=calls, deterministic=True)
    ds = ds.batch(int(batch), drop_remainder=True)
    ds = ds.prefetch(tf.data.AUTOTUNE if prefetch is None else int(prefetch))
    options = tf.data.Options()
    options.deterministic = True
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.with_options(options)


def input_error(error: BaseException) -> errors.HipAtlasError | None:
    """The HipAtlas error (e.g. a damaged sample file) that a ``tf.data`` error carries from the
    decoding function, as its own type with its one-line message; None for other errors."""
    match = _RAISED.search(str(error))
    kind = getattr(errors, match.group(1), None) if match else None
    if isinstance(kind, type) and issubclass(kind, errors.HipAtlasError):
        return kind(match.group(2).strip())
    return None
