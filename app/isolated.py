"""Run a progress generator in a separate process and relay its progress (Qt-free).

Why a process and not only a thread: TensorFlow and the 3D view cannot share a process on
machines that render with Mesa's llvmpipe (no GPU, virtual machines, Xvfb): both bring their own
LLVM, and whichever loads second crashes the process (segmentation fault in TensorFlow's import,
or in the first OpenGL paint after it). A separate process also means a crash or memory
exhaustion in the network cannot take the workstation, and unsaved edits, down with it; and the
GUI process never pays TensorFlow's import time or memory.

:func:`run_isolated` is itself a generator with the contract of the pipeline: it yields
:class:`inference.pipeline.Progress`, returns the child's return value, raises
:class:`~inference.errors.Cancelled` when cancelled and re-raises the child's exception (with the
child's traceback attached as a note). The child is started with the ``spawn`` method (a fresh
interpreter: no Qt, no inherited threads), so ``target`` and its arguments must be picklable
(module-level functions, ``functools.partial`` of them, arrays, paths).
"""

from __future__ import annotations

import logging
import multiprocessing
import pickle
import time
import traceback
from typing import Any, Callable, Generator

from inference.errors import Cancelled, HipAtlasError

log = logging.getLogger(__name__)

_CONTEXT = multiprocessing.get_context("spawn")
#: After a cancel request the child gets this long to stop at its next check, then it is ended.
CANCEL_GRACE_S = 2.0


def _run_job(target, args, kwargs, connection, cancel_event) -> None:  # runs in the child process
    """Drive one progress generator and send its progress and its end through ``connection``."""
    try:
        generator = target(*args, **kwargs, cancel=cancel_event.is_set)
        while True:
            try:
                step = next(generator)
            except StopIteration as stop:
                connection.send(("result", stop.value))
                return
            connection.send(("progress", (float(step.fraction), str(step.message))))
    except Cancelled as error:
        connection.send(("cancelled", str(error)))
    except BaseException as error:  # noqa: BLE001 - everything is reported to the parent
        text = traceback.format_exc()
        try:
            pickle.dumps(error)
            payload = error
        except Exception:  # noqa: BLE001 - an exception that cannot travel is described instead
            payload = None
        connection.send(("error", (payload, type(error).__name__, str(error), text)))


def _child(target, args, kwargs, connection, cancel_event) -> None:  # runs in the child process
    try:
        _run_job(target, args, kwargs, connection, cancel_event)
    finally:
        connection.close()


def _serve(connection, cancel_event) -> None:  # runs in the long-lived child process
    """Run the jobs sent by :class:`WorkerProcess` one after the other until told to quit (or the
    parent is gone). Module state (the model cache of :mod:`inference.pipeline`) lives on between
    jobs: that is the point of this process."""
    try:
        while True:
            try:
                message = connection.recv()
            except EOFError:
                return
            if message[0] != "job":
                return
            _, target, args, kwargs = message
            _run_job(target, args, kwargs, connection, cancel_event)
    finally:
        connection.close()


def run_isolated(target: Callable[..., Generator[Any, None, Any]], *args: Any,
                 cancel: Callable[[], bool] | None = None, poll_s: float = 0.05, **kwargs: Any):
    """Run ``target(*args, **kwargs, cancel=...)`` (a progress generator) in a child process.

    A generator: yields Progress, returns the child's result. ``cancel`` is polled here; when it
    turns true the child's own cancel flag is set and, if it has not stopped after
    :data:`CANCEL_GRACE_S` (e.g. in the middle of the network), the child is terminated.
    """
    receiver, sender = _CONTEXT.Pipe(duplex=False)
    cancel_event = _CONTEXT.Event()
    process = _CONTEXT.Process(target=_child, args=(target, args, kwargs, sender, cancel_event),
                               name="hipatlas-registration", daemon=True)
    process.start()
    sender.close()  # the child holds the only writing end: EOF means it is gone
    finished = False
    try:
        finished = yield from _relay(process, receiver, cancel_event, cancel, poll_s)
        return finished[1]
    finally:
        cancel_event.set()
        _end(process, finished)
        receiver.close()


def _relay(process, receiver, cancel_event, cancel, poll_s, ended: list | None = None):
    """Yield the child's progress until its job ends; returns ``(True, result)`` or raises.
    ``ended`` (a list) gets an entry when the child has reported the end of its job."""
    from inference.pipeline import Progress

    cancel_requested_at = None
    while True:
        if cancel_requested_at is None and cancel is not None and cancel():
            cancel_event.set()
            cancel_requested_at = time.monotonic()
        if cancel_requested_at is not None and time.monotonic() - cancel_requested_at > CANCEL_GRACE_S:
            raise _NotStopped("registration cancelled")
        if not receiver.poll(poll_s):
            if not process.is_alive() and not receiver.poll(0):
                raise _crashed(process)
            continue
        try:
            kind, payload = receiver.recv()
        except EOFError:
            process.join(5)
            raise _crashed(process) from None
        if kind == "progress":
            yield Progress(*payload)
            continue
        if ended is not None:
            ended.append(kind)
        if kind == "result":
            return True, payload
        elif kind == "cancelled":
            raise Cancelled(payload or "registration cancelled")
        else:
            error, name, message, child_traceback = payload
            if error is None:
                error = HipAtlasError(f"{name}: {message}")
            error.add_note("in the registration process:\n" + child_traceback)
            raise error


class _NotStopped(Cancelled):
    """Cancelled, and the child did not stop within the grace time (it must be ended)."""


def _end(process, finished) -> None:
    process.join(CANCEL_GRACE_S)
    if process.is_alive():
        # After a result the child is only tearing down (TensorFlow's exit can take seconds):
        # ending it is routine. Otherwise it did not honour the cancel request in time.
        (log.debug if finished else log.warning)("ending the registration process (pid %s)", process.pid)
        process.terminate()
        process.join(5)
    if process.is_alive():
        process.kill()
        process.join()


class WorkerProcess:
    """A child process that stays up between jobs, so the model it loaded stays loaded.

    :meth:`run` has the contract of :func:`run_isolated`. The process starts with the first job;
    if it has died (crash, out of memory, ended after a cancel it did not honour in time) the
    next job starts a fresh one. One job at a time: a job submitted while another runs gets a
    one-shot process of its own (:func:`run_isolated`).
    """

    def __init__(self, name: str = "hipatlas-worker"):
        self.name = name
        self._process = None
        self._connection = None
        self._cancel_event = None
        self._busy = False

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None and self._process.is_alive() else None

    def _ensure_started(self) -> None:
        if self._process is not None and self._process.is_alive():
            return
        self._discard()
        parent, child = _CONTEXT.Pipe(duplex=True)
        self._cancel_event = _CONTEXT.Event()
        self._process = _CONTEXT.Process(target=_serve, args=(child, self._cancel_event), name=self.name, daemon=True)
        self._process.start()
        child.close()
        self._connection = parent
        log.info("started the worker process (pid %s)", self._process.pid)

    def run(self, target: Callable[..., Generator[Any, None, Any]], *args: Any,
            cancel: Callable[[], bool] | None = None, poll_s: float = 0.05, **kwargs: Any):
        if self._busy:
            return (yield from run_isolated(target, *args, cancel=cancel, poll_s=poll_s, **kwargs))
        self._busy = True
        try:
            self._ensure_started()
            self._cancel_event.clear()
            try:
                self._connection.send(("job", target, args, kwargs))
            except (OSError, EOFError):
                self._discard()
                raise HipAtlasError("the registration process could not take the job; try again") from None
            ended: list = []
            try:
                return (yield from _relay(self._process, self._connection, self._cancel_event, cancel, poll_s, ended))[1]
            except BaseException:
                # Keep the process (and its model) when its job has ended or ends promptly when
                # asked to (the worker thread closes this generator on cancel); else a fresh one.
                if not self._process.is_alive() or not (ended or self._drain()):
                    self._discard()
                raise
        finally:
            self._busy = False

    def _drain(self) -> bool:
        """Ask the running job to stop; True once the child reports its end within the grace time."""
        self._cancel_event.set()
        deadline = time.monotonic() + CANCEL_GRACE_S
        try:
            while (remaining := deadline - time.monotonic()) > 0:
                if self._connection.poll(remaining) and self._connection.recv()[0] != "progress":
                    return True
        except (OSError, EOFError):
            pass
        return False

    def _discard(self, routine: bool = False) -> None:
        """Drop the process (``routine``: it was told to quit, so ending it is no news)."""
        process, self._process = self._process, None
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        if process is not None:
            if self._cancel_event is not None:
                self._cancel_event.set()
            _end(process, finished=routine)

    def close(self) -> None:
        """Ask the process to quit after its job (if any) and end it."""
        if self._process is not None and self._process.is_alive() and self._connection is not None:
            try:
                self._connection.send(("quit",))
            except (OSError, EOFError):
                pass
            self._process.join(CANCEL_GRACE_S)
        self._discard(routine=True)


def _crashed(process) -> HipAtlasError:
    code = process.exitcode
    how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
    return HipAtlasError(f"the registration process stopped unexpectedly ({how}); your work in the "
                         "workstation is safe, try registering again or check the log")
