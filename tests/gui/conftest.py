"""Fixtures of the workstation tests: an X display (Xvfb), settings, a synthetic case, windows.

VTK needs a real X display (Qt's ``offscreen`` platform cannot host an OpenGL render window), so
the session starts its own ``Xvfb`` when no ``DISPLAY`` is set. The Qt application is created after
that (``qapp_args`` depends on ``x_display``).

TensorFlow and OpenGL rendering cannot share a process where Mesa renders in software
(llvmpipe): TensorFlow loads its LLVM with global symbol visibility and Mesa's driver then calls
into it (segmentation fault in the first paint, or in TensorFlow's import when VTK rendered
first). The workstation never loads TensorFlow (the pipeline runs in a child process, see
``app/isolated.py``), but a whole-project test run does: other test modules import it while
being collected. In that case :func:`pytest_collection_modifyitems` replaces the tests of this
folder with one test that runs them in a fresh pytest process, where TensorFlow is never imported.
"""

from __future__ import annotations

import os
import pathlib
import select
import shutil
import subprocess
import sys
import time

import pytest

import gui_helpers
from gui_helpers import synthetic_register, write_synthetic_case

HERE = pathlib.Path(__file__).resolve().parent


# ---------------------------------------------------------------------------- TensorFlow guard
class GuiSuiteFailed(Exception):
    """The GUI tests failed in their own process; the message is that run's report."""


class GuiSuiteInSubprocess(pytest.Item):
    """Runs the selected tests of this folder in a fresh pytest process (see the module docstring)."""

    def __init__(self, *, node_ids, markexpr, **kwargs):
        super().__init__(**kwargs)
        self.node_ids = list(node_ids)
        self.markexpr = markexpr
        # the whole folder runs as one test: allow it the time of all of its tests
        self.add_marker(pytest.mark.timeout(1800))

    def runtest(self) -> None:
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", self.markexpr,
                   *self.node_ids]
        done = subprocess.run(command, cwd=self.config.rootpath, capture_output=True, text=True, timeout=1800)
        summary = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"\n{self.name}: {summary}")
        if done.returncode != 0:
            raise GuiSuiteFailed(f"{summary}\n\n{done.stdout[-30000:]}\n{done.stderr[-20000:]}")

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, GuiSuiteFailed):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self):
        return self.path, None, self.name


@pytest.hookimpl(trylast=True)  # after -m / -k deselection
def pytest_collection_modifyitems(session, config, items):
    ours = [item for item in items if HERE in pathlib.Path(item.path).resolve().parents]
    if not ours or "tensorflow" not in sys.modules:
        return
    parent = ours[0].parent
    while parent is not None and pathlib.Path(parent.path).resolve() != HERE:
        parent = parent.parent
    runner = GuiSuiteInSubprocess.from_parent(
        parent or session, name="GUI tests (own process, TensorFlow-free)",
        node_ids=[item.nodeid for item in ours], markexpr=config.option.markexpr or "")
    moved = {id(item) for item in ours}
    items[:] = [item for item in items if id(item) not in moved] + [runner]


# ---------------------------------------------------------------------------- display
_XVFB_SCREEN = "1600x1000x24"


@pytest.fixture(scope="session")
def x_display():
    """An X display for Qt + VTK: the existing ``DISPLAY``, else a private Xvfb server."""
    if os.environ.get("DISPLAY"):
        yield os.environ["DISPLAY"]
        return
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        pytest.skip("GUI tests need an X display for VTK and neither DISPLAY is set nor Xvfb installed "
                    "(Debian: apt-get install xvfb, or `make system-packages`)")
    read_fd, write_fd = os.pipe()
    # -displayfd: Xvfb picks a free display number itself and writes it to the pipe once it
    # accepts connections, so parallel test runs cannot collide and no sleep/poll is needed.
    process = subprocess.Popen([xvfb, "-displayfd", str(write_fd), "-screen", "0", _XVFB_SCREEN,
                                "-nolisten", "tcp", "-noreset"], pass_fds=(write_fd,),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               preexec_fn=_die_with_parent)
    os.close(write_fd)
    number = b""
    deadline = time.monotonic() + 30
    while not number.endswith(b"\n") and time.monotonic() < deadline:
        ready, _, _ = select.select([read_fd], [], [], 0.5)
        if ready:
            chunk = os.read(read_fd, 16)
            if not chunk:
                break
            number += chunk
    os.close(read_fd)
    if not number.strip():
        process.kill()
        process.wait()
        pytest.fail("Xvfb did not start (no display number within 30 s)")
    saved = {k: os.environ.get(k) for k in ("DISPLAY", "QT_QPA_PLATFORM")}
    os.environ["DISPLAY"] = f":{number.strip().decode()}"
    gui_helpers.DISPLAY_SERVER_PIDS.append(process.pid)
    os.environ["QT_QPA_PLATFORM"] = "xcb"
    # The server must outlive the QApplication, which pytest-qt keeps until the interpreter has
    # finished tearing down: stopping it at fixture teardown or in an atexit handler makes Qt
    # abort ("The X11 connection broke") or crash at exit. So it is never stopped here: the
    # kernel sends it SIGTERM when this process ends (parent-death signal, set in the child).
    yield os.environ["DISPLAY"]
    for key, value in saved.items():
        if key == "DISPLAY":
            continue  # Qt still talks to this display until exit
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _die_with_parent() -> None:
    # Linux: deliver SIGTERM to Xvfb when the test process ends, however it ends.
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except OSError:
        pass


@pytest.fixture(scope="session")
def qapp_args(x_display):
    """pytest-qt builds the QApplication from this: depending on x_display starts Xvfb first."""
    return ["hipatlas-gui-tests"]


@pytest.fixture(scope="session", autouse=True)
def gui_thread_garbage_collection(qapp):
    """Cyclic garbage collected on the GUI thread only, as in the application (its main window
    installs app.workers.GuiThreadGarbageCollector), also for the tests that open a dialog without
    one: a collection in a worker thread that meets an earlier test's Qt objects crashes."""
    from app.workers import collect_garbage_on_the_gui_thread

    return collect_garbage_on_the_gui_thread()


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture
def synthetic_case(tmp_path):
    return write_synthetic_case(tmp_path / "case")


@pytest.fixture
def gui_settings(tmp_path, qapp):
    from PySide6.QtCore import QSettings

    from app.settings import Settings

    settings = Settings(QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat))
    settings.recovery_dir = tmp_path / "recovery"
    settings.autosave_minutes = 0
    settings.auto_propose = False  # the tests that want proposals turn them on
    return settings


@pytest.fixture
def make_window(qtbot, tmp_path, gui_settings):
    """``make_window(register_fn=synthetic_register)``: a shown, non-interactive main window.

    At teardown every window is closed (worker joined, plotter closed) and deleted.
    """
    from PySide6.QtWidgets import QApplication

    from app.main_window import MainWindow
    from app.session import Session

    windows = []

    def make(register_fn=synthetic_register, settings=None, propose_fn=None):
        session = Session(work_root=tmp_path, register_fn=register_fn, propose_fn=propose_fn)
        window = MainWindow(settings or gui_settings, session, interactive=False)
        window.resize(1400, 860)
        window.show()
        qtbot.waitExposed(window)
        windows.append(window)
        return window

    yield make
    for window in windows:
        window.close()
        window.deleteLater()
    QApplication.processEvents()


