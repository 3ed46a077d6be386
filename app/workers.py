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

import logging
import threading
import traceback
from typing import Any, Callable, Generator

from PySide6.QtCore import QThread, Signal

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
