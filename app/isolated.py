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


def _child(target, args, kwargs, connection, cancel_event) -> None:  # runs in the child process
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
    finally:
        connection.close()


def run_isolated(target: Callable[..., Generator[Any, None, Any]], *args: Any,
                 cancel: Callable[[], bool] | None = None, poll_s: float = 0.05, **kwargs: Any):
    """Run ``target(*args, **kwargs, cancel=...)`` (a progress generator) in a child process.

    A generator: yields Progress, returns the child's result. ``cancel`` is polled here; when it
    turns true the child's own cancel flag is set and, if it has not stopped after
    :data:`CANCEL_GRACE_S` (e.g. in the middle of the network), the child is terminated.
    """
    from inference.pipeline import Progress

    receiver, sender = _CONTEXT.Pipe(duplex=False)
    cancel_event = _CONTEXT.Event()
    process = _CONTEXT.Process(target=_child, args=(target, args, kwargs, sender, cancel_event),
                               name="hipatlas-registration", daemon=True)
    process.start()
    sender.close()  # the child holds the only writing end: EOF means it is gone
    cancel_requested_at = None
    finished = False
    try:
        while True:
            if cancel_requested_at is None and cancel is not None and cancel():
                cancel_event.set()
                cancel_requested_at = time.monotonic()
            if cancel_requested_at is not None and time.monotonic() - cancel_requested_at > CANCEL_GRACE_S:
                raise Cancelled("registration cancelled")
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
            elif kind == "result":
                finished = True
                return payload
            elif kind == "cancelled":
                raise Cancelled(payload or "registration cancelled")
            else:
                error, name, message, child_traceback = payload
                if error is None:
                    error = HipAtlasError(f"{name}: {message}")
                error.add_note("in the registration process:\n" + child_traceback)
                raise error
    finally:
        cancel_event.set()
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
        receiver.close()


def _crashed(process) -> HipAtlasError:
    code = process.exitcode
    how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
    return HipAtlasError(f"the registration process stopped unexpectedly ({how}); your work in the "
                         "workstation is safe, try registering again or check the log")
