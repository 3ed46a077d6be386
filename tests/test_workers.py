"""inference.workers: side-by-side parts give the plain loop's results, in order, and its errors."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from inference import fullres, workers
from inference.errors import ConfigError


@pytest.fixture
def two_threads(monkeypatch):
    monkeypatch.setenv(workers.THREADS_ENV, "2")


def test_results_come_in_item_order_and_parts_run_side_by_side(two_threads):
    rng = np.random.default_rng(7)
    arrays = [rng.random(50_000) for _ in range(9)]
    names = set()

    def part(a):
        names.add(threading.current_thread().name)
        time.sleep(0.01)  # long enough for the pool's thread to take a part
        return float(np.sort(a)[1234])

    assert workers.thread_map(part, arrays) == [float(np.sort(a)[1234]) for a in arrays]
    assert threading.current_thread().name in names
    assert any(name.startswith("hipatlas-worker") for name in names)


def test_one_thread_runs_everything_on_the_caller(monkeypatch):
    monkeypatch.setenv(workers.THREADS_ENV, "1")
    names = workers.thread_map(lambda _: threading.current_thread().name, range(5))
    assert names == [threading.current_thread().name] * 5


@pytest.mark.parametrize("value", ["0", "two", "-3"])
def test_a_bad_thread_setting_is_refused(monkeypatch, value):
    monkeypatch.setenv(workers.THREADS_ENV, value)
    with pytest.raises(ConfigError, match=workers.THREADS_ENV):
        workers.thread_map(abs, [1, 2])


def test_the_first_failing_item_is_raised_after_every_item_finished(two_threads):
    finished = []

    def part(i):
        time.sleep(0.02 * (5 - i))
        finished.append(i)
        if i in (1, 3):
            raise ValueError(f"item {i}")
        return i

    with pytest.raises(ValueError, match="item 1"):
        workers.thread_map(part, range(5))
    assert sorted(finished) == [0, 1, 2, 3, 4]


def test_nested_calls_run_on_their_part_s_thread_without_deadlock(two_threads):
    def outer(i):
        here = threading.current_thread().name
        inner = workers.thread_map(lambda j: (threading.current_thread().name, i * 10 + j), range(3))
        assert {name for name, _ in inner} == {here}
        return [value for _, value in inner]

    done = []
    runner = threading.Thread(target=lambda: done.append(workers.thread_map(outer, range(4))))
    runner.start()
    runner.join(timeout=30)
    assert not runner.is_alive(), "nested thread_map deadlocked"
    assert done == [[[0, 1, 2], [10, 11, 12], [20, 21, 22], [30, 31, 32]]]


def test_both_returns_the_pair(two_threads):
    assert workers.both(lambda: "a", lambda: 2) == ("a", 2)


def test_the_fine_atlas_prefetch_loads_what_the_warp_uses(monkeypatch):
    from inference.data import atlas as atlas_lib

    monkeypatch.setattr(fullres, "_FINE_ATLAS_CACHE", {})
    thread = fullres.prefetch_fine_atlas()
    assert thread is not None
    thread.join()
    fine = fullres._FINE_ATLAS_CACHE[fullres.FINE_ATLAS]
    assert fullres.prefetch_fine_atlas() is None  # nothing left to do
    compact = atlas_lib.load_atlas("compact")
    assert fullres.fine_atlas_for(compact) is fine
    # the derived arrays are cached for the very arrays the warp passes
    volume = np.asarray(fine.volume, np.float32)
    cached = fullres.constant_neighbourhoods(volume)
    assert fullres.constant_neighbourhoods(volume) is cached
    np.testing.assert_array_equal(cached, fullres._constant_neighbourhoods(volume))
