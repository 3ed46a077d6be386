"""Start the planning workstation: QApplication, exception hooks, main window.

``hipatlas gui [CASE_DIR|PROJECT] [--demo] [--screenshot PATH] [--quit-after-register]`` ends up in
:func:`run_gui`. With ``--quit-after-register`` the window opens the case, confirms its masks,
registers, saves the screenshot if asked and exits (0 on success, 1 otherwise): a smoke test of
the whole chain and the way the README screenshot is made.
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import sys
import threading
import traceback

log = logging.getLogger(__name__)

from inference.resources import demo_dir

DEMO_CASE = demo_dir()


class ExceptionHooks:
    """Route uncaught exceptions (GUI thread and other threads) to the window's error dialog.

    ``sys.excepthook`` runs in the thread that raised (for Qt slots: the GUI thread);
    ``threading.excepthook`` runs in the dying thread, so the exception is handed to the GUI
    thread through a queued signal. The previous hooks are restored by :meth:`uninstall`.
    """

    def __init__(self, report):
        from PySide6.QtCore import QObject, Signal

        class _Relay(QObject):
            raised = Signal(object)

        self._relay = _Relay()
        self._relay.raised.connect(report)
        self._report = report
        self._previous = (sys.excepthook, threading.excepthook)

    def install(self) -> "ExceptionHooks":
        sys.excepthook = self._sys_hook
        threading.excepthook = self._thread_hook
        return self

    def uninstall(self) -> None:
        sys.excepthook, threading.excepthook = self._previous

    def _sys_hook(self, exc_type, exc, tb) -> None:
        if issubclass(exc_type, KeyboardInterrupt):
            self._previous[0](exc_type, exc, tb)
            return
        log.error("uncaught exception:\n%s", "".join(traceback.format_exception(exc_type, exc, tb)))
        try:
            self._relay.raised.emit(exc)
        except Exception:  # noqa: BLE001 - the hook itself must never raise
            self._previous[0](exc_type, exc, tb)

    def _thread_hook(self, args) -> None:
        if args.exc_type is SystemExit:
            return
        log.error("uncaught exception in thread %s:\n%s", getattr(args.thread, "name", "?"),
                  "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback)))
        try:
            self._relay.raised.emit(args.exc_value)
        except Exception:  # noqa: BLE001
            pass


def _apply_device(device: str) -> None:
    # Must happen before TensorFlow is imported (it reads the variable once, at import).
    if device == "cpu":
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")


def run_gui(args: argparse.Namespace) -> int:
    """Open the workstation window; returns the exit status."""
    from PySide6.QtCore import QEventLoop, QTimer
    from PySide6.QtWidgets import QApplication

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    owns_app = QApplication.instance() is None
    app = QApplication.instance() or QApplication(sys.argv[:1])
    app.setApplicationName("HipAtlas")
    app.setOrganizationName("HipAtlas")
    app.setStyle("Fusion")

    from app.main_window import MainWindow
    from app.settings import Settings

    settings = Settings()
    _apply_device(settings.device)
    settings.apply_backend()
    quit_after = bool(getattr(args, "quit_after_register", False))
    screenshot = getattr(args, "screenshot", None)
    window = MainWindow(settings, interactive=not quit_after)
    hooks = ExceptionHooks(window.report_error).install()
    status = {"code": 0}

    def finish(outcome: str) -> None:
        if screenshot:
            try:
                if outcome == "finished":
                    window.go_to_step("Measure")  # the measurements table beside the 3D view
                window.viewers.setCurrentIndex(1)
                path = pathlib.Path(screenshot)
                path.parent.mkdir(parents=True, exist_ok=True)
                if not window.screenshot().save(str(path)):
                    raise OSError(f"cannot write {path}")
                log.info("screenshot saved to %s", path)
            except Exception as error:  # noqa: BLE001
                log.error("screenshot failed: %s", error)
                status["code"] = 1
        if quit_after:
            if outcome != "finished":
                status["code"] = 1
            window.close()

    window.registration_finished.connect(finish)
    window.show()

    # A damaged installation (model or atlas not matching their recorded checksums) must not
    # produce plausible-looking results: say so at start, in the one error dialog.
    from inference.resources import verify_resources

    problems = verify_resources(strict=False)
    if problems:
        window.report_error("; ".join(p.message for p in problems))

    target = DEMO_CASE if getattr(args, "demo", False) else getattr(args, "case_dir", None)

    def start() -> None:
        if not quit_after:
            window.autosave.offer_recovery()
        if target is None:
            return
        if getattr(args, "demo", False) and not (DEMO_CASE / "case.json").is_file():
            window.report_error(f"the demo case is not installed ({DEMO_CASE / 'case.json'} is missing)")
            opened = False
        else:
            opened = window.open_path(target)
        if quit_after:
            started = False
            if opened:
                for index in range(len(window.session.views)):
                    window.set_mask_confirmed(index, True)
                started = window.start_registration()
            if not started:
                status["code"] = 1
                window.close()

    QTimer.singleShot(0, start)
    # Our own event loop ends when the window closes. When run_gui created the application this
    # is the application's lifetime; inside an existing application (embedding, tests) it must
    # not quit that application, so quitting on the last closed window is suspended meanwhile.
    loop = QEventLoop()
    window.closed.connect(loop.quit)
    quit_on_last = app.quitOnLastWindowClosed()
    if not owns_app:
        app.setQuitOnLastWindowClosed(False)
    try:
        code = loop.exec()
    finally:
        app.setQuitOnLastWindowClosed(quit_on_last)
        hooks.uninstall()
        window.shutdown()
    if window.errors and quit_after:
        for message in window.errors:
            print(f"error: {message}", file=sys.stderr)
    return status["code"] or (1 if code else 0)


def main(argv=None) -> int:
    """Entry point of ``hipatlas-gui``."""
    import multiprocessing

    # A frozen (PyInstaller) build starts the registration process from this same executable.
    multiprocessing.freeze_support()
    parser = argparse.ArgumentParser(prog="hipatlas-gui", description="HipAtlas planning workstation")
    parser.add_argument("case_dir", nargs="?", help="case folder or project file to open")
    parser.add_argument("--demo", action="store_true", help="open the bundled demo case")
    parser.add_argument("--screenshot", metavar="PATH", help="save a screenshot of the window after registering")
    parser.add_argument("--quit-after-register", action="store_true", help="register, screenshot and exit")
    return run_gui(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
