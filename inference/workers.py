"""Independent parts of one registration run side by side on a small shared thread pool.

After the network, a registration is a chain of NumPy and SciPy steps on one thread. Several of
them repeat the same work per view (the two projections of the shaft fit, the outline fit's rims,
the overlays) or per volume (the soft femur indicator and the intensities, moved by the same
pull-back), and the bulk of that work is in calls that release the GIL: ``np.bincount``,
``scipy.ndimage``'s ``map_coordinates``, ``distance_transform_edt``, ``gaussian_filter`` and
``binary_erosion`` (each 1.5-1.8x faster as two threads than one after the other on the 2-core
build machine; ``np.nonzero`` does not release it). :func:`thread_map` runs such parts on the
calling thread and :data:`max_workers` - 1 pool threads. An ensemble's ONNX Runtime sessions are
built through it too (:mod:`inference.backends`).

The results are those of a plain loop, in order: every part computes the same values from the
same inputs, only at the same time. Parts must not depend on each other or write to shared
state (warnings are returned and appended by the caller, in order).

A part that itself calls :func:`thread_map` runs its items one after the other, so that a pool
thread never waits for another pool thread (no deadlock, no more threads than cores).
``$HIPATLAS_THREADS`` caps the threads (1: everything on the calling thread).
"""

from __future__ import annotations

import concurrent.futures
import itertools
import os
import threading
from typing import Callable, Iterable, TypeVar

from inference.errors import ConfigError

T = TypeVar("T")
R = TypeVar("R")

#: Environment variable capping the threads of :func:`thread_map` (the calling thread included).
THREADS_ENV = "HIPATLAS_THREADS"
#: The most threads :func:`thread_map` uses by default (the calling thread included): the parts it
#: runs come in twos and threes.
DEFAULT_MAX_THREADS = 3

_LOCAL = threading.local()
_POOL: concurrent.futures.ThreadPoolExecutor | None = None
_POOL_SIZE = 0
_POOL_LOCK = threading.Lock()


def max_workers() -> int:
    """Threads :func:`thread_map` uses at most, the calling thread included: ``$HIPATLAS_THREADS``,
    else the machine's cores up to :data:`DEFAULT_MAX_THREADS`."""
    value = os.environ.get(THREADS_ENV, "").strip()
    if value:
        try:
            threads = int(value)
        except ValueError:
            threads = 0
        if threads < 1:
            raise ConfigError(f"${THREADS_ENV} must be a whole number of threads >= 1, not {value!r}")
        return threads
    return max(1, min(os.cpu_count() or 1, DEFAULT_MAX_THREADS))


def _pool(workers: int) -> concurrent.futures.ThreadPoolExecutor:
    """The shared pool, with at least ``workers`` threads (grown when the cap is raised)."""
    global _POOL, _POOL_SIZE
    with _POOL_LOCK:
        if _POOL is None or _POOL_SIZE < workers:
            old = _POOL
            _POOL = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="hipatlas-worker")
            _POOL_SIZE = workers
            if old is not None:
                old.shutdown(wait=False)  # its running parts finish; it takes no more
        return _POOL


def _inside(function: Callable[[T], R], item: T) -> R:
    """``function(item)`` with nested :func:`thread_map` calls kept on this thread."""
    outer = getattr(_LOCAL, "inside", False)
    _LOCAL.inside = True
    try:
        return function(item)
    finally:
        _LOCAL.inside = outer


def thread_map(function: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """``[function(item) for item in items]``, the items run side by side (see the module
    docstring): the calling thread and the pool's take the next item as they finish one. An
    exception is raised once every item has finished: the first one's in item order."""
    items = list(items)
    threads = min(len(items), max_workers())
    if threads < 2 or getattr(_LOCAL, "inside", False):
        return [function(item) for item in items]
    results: list = [None] * len(items)
    errors: list[BaseException | None] = [None] * len(items)
    counter = itertools.count()  # next() of it is atomic: each item is taken once

    def drain(_=None) -> None:
        while (index := next(counter)) < len(items):
            try:
                results[index] = function(items[index])
            except BaseException as error:  # noqa: BLE001 - re-raised below, after the others finish
                errors[index] = error

    pool = _pool(threads - 1)
    futures = [pool.submit(_inside, drain, None) for _ in range(threads - 1)]
    _inside(drain, None)
    concurrent.futures.wait(futures)
    for error in errors:
        if error is not None:
            raise error
    return results


def both(first: Callable[[], R], second: Callable[[], T]) -> tuple[R, T]:
    """``(first(), second())`` run side by side (:func:`thread_map` of the two)."""
    a, b = thread_map(lambda f: f(), [first, second])
    return a, b

