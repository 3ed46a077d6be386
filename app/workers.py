"""Run a progress generator off the GUI thread (the pattern of superqt's ``GeneratorWorker``).

:class:`GeneratorWorker` is a ``QThread`` that drives ``job(cancel)``, a generator function that
yields :class:`inference.pipeline.Progress` and returns a result. Between two yields it checks
whether :meth:`cancel` was called and then closes the generator (its ``finally`` blocks and
context managers run, so e.g. half-written output folders are removed). It reports through
signals, which Qt delivers to the GUI thread as queued calls:

* ``progress(float, str)`` for each yield;
* exactly one of ``succeeded(object)`` (the return value), ``cancelled()`` or ``errored(object)``
  (the exception: every failure goes through this one signal);
* ``done()`` after that, always.
"""

from __future__ import annotations

import gc
import logging
import threading
import traceback
from typing import Any, Callable, Generator

from PySide6.QtCore import QObject, QThread, QTimer, Signal

from inference.errors import Cancelled

log = logging.getLogger(__name__)

Job = Callable[[Callable[[], bool]], Generator[Any, None, Any]]


class GeneratorWorker(QThread):
    """Drive ``job(cancel)`` in a thread; see the module docstring for the signals."""

    progress = Signal(float, str)
    succeeded = Signal(object)
    cancelled = Signal()
    errored = Signal(object)
    done = Signal()

    def __init__(self, job: Job, parent=None):
        super().__init__(parent)
        self._job = job
        self._cancel = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.outcome: str | None = None  # "finished", "cancelled" or "errored"

    def cancel(self) -> None:
        """Ask the job to stop at its next yield (or its next own check of ``cancel``)."""
        self._cancel.set()

    def is_cancelled(self) -> bool:
        return self._cancel.is_set()

    def run(self) -> None:  # runs in the worker thread
        generator = None
        try:
            generator = self._job(self._cancel.is_set)
            while True:
                if self._cancel.is_set():
                    generator.close()
                    raise Cancelled("cancelled by the user")
                try:
                    step = next(generator)
                except StopIteration as stop:
                    self.result = stop.value
                    break
                self.progress.emit(float(getattr(step, "fraction", 0.0)), str(getattr(step, "message", "")))
        except Cancelled:
            self.outcome = "cancelled"
            log.info("work cancelled")
            self.cancelled.emit()
        except BaseException as error:  # noqa: BLE001 - every failure goes to the one error signal
            if generator is not None:
                try:
                    generator.close()
                except BaseException:  # noqa: BLE001
                    pass
            self.outcome = "errored"
            self.error = error
            log.error("work failed: %s\n%s", error, "".join(traceback.format_exception(error)))
            self.errored.emit(error)
        else:
            self.outcome = "finished"
            self.succeeded.emit(self.result)
        finally:
            self.done.emit()


class GuiThreadGarbageCollector(QObject):
    """Python's cyclic garbage collection, run on the GUI thread only.

    CPython's collector runs in whichever thread allocates when a generation's threshold is
    crossed. If that is a worker thread (a registration, a PACS transfer, a DICOM export) and the
    garbage holds Qt objects of a closed window, their C++ destructors run off the GUI thread,
    which Qt does not survive: a clean-clone GUI test run crashed (segmentation fault) while a
    DICOM export's worker thread was "Garbage-collecting". So automatic collection is switched
    off and a timer on the GUI thread collects instead (pyqtgraph's ``GarbageCollector`` does the
    same for the same reason). Reference counting, which frees almost everything, is untouched.

    The timer follows CPython's own rules (``Modules/gcmodule.c``): the oldest generation whose
    count has passed its threshold is collected, except that a full collection also waits until
    the objects that reached the oldest generation since the last one number a quarter of those
    it kept. That rule keeps full collections (about 0.2 s for the 0.5 M objects of the
    workstation with TensorFlow loaded, measured ad hoc) as rare as they are without this class;
    they ran before in whichever thread crossed the threshold, holding the GIL all the same.
    """

    #: the fraction of the long-lived objects by which the oldest generation must grow before a
    #: full collection (CPython: ``long_lived_pending < long_lived_total / 4`` skips it)
    FULL_COLLECTION_GROWTH = 0.25

    def __init__(self, interval_ms: int = 100, parent: QObject | None = None):
        super().__init__(parent)
        self.thresholds = gc.get_threshold()
        gc.disable()
        self.long_lived_total = len(gc.get_objects(generation=2))
        self.timer = QTimer(self)
        self.timer.timeout.connect(self.collect)
        self.timer.start(interval_ms)

    def due_generation(self) -> int:
        """The generation CPython would collect now, or -1 for none."""
        counts = gc.get_count()
        for generation in (2, 1, 0):
            if counts[generation] <= self.thresholds[generation]:
                continue
            if generation == 2:
                pending = len(gc.get_objects(generation=2)) - self.long_lived_total
                if pending < self.FULL_COLLECTION_GROWTH * self.long_lived_total:
                    continue
            return generation
        return -1

    def collect(self) -> None:
        """Collect the generation that is due, if any (the timer's slot)."""
        generation = self.due_generation()
        if generation < 0:
            return
        gc.collect(generation)
        if generation == 2:
            self.long_lived_total = len(gc.get_objects(generation=2))


def collect_garbage_on_the_gui_thread() -> GuiThreadGarbageCollector:
    """Install :class:`GuiThreadGarbageCollector` once per application (call it on the GUI thread
    once a ``QApplication`` exists); returns it."""
    global _COLLECTOR
    from PySide6.QtWidgets import QApplication

    if _COLLECTOR is None:
        _COLLECTOR = GuiThreadGarbageCollector(parent=QApplication.instance())
    return _COLLECTOR


_COLLECTOR: GuiThreadGarbageCollector | None = None
