"""What every workflow step of the workstation shares: a panel with a title and hint, a back
reference to the window that wires the steps, and a :meth:`Step.refresh` that redraws the panel
from the session.

A step owns the widgets of its panel and the slots that act on them; everything numerical goes
through the window's Qt-free :class:`app.session.Session`. Steps talk to each other only through
the window (``self.window.refresh_all()``, ``self.window.go_to_step(...)``), never directly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from PySide6.QtCore import QEvent, QObject, Qt
from PySide6.QtWidgets import QAbstractItemView, QApplication, QHeaderView, QLabel, QTableWidget, QVBoxLayout, QWidget

if TYPE_CHECKING:  # pragma: no cover
    from app.main_window import MainWindow


def first_line(error: BaseException | str) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class Step(QWidget):
    """One workflow step: its panel (this widget) and its slots."""

    #: Name in the step list and in ``MainWindow.go_to_step``.
    name = ""
    #: Tab of the viewers shown with this step (0 radiographs, 1 3D, 2 slices).
    viewer = 0
    title = ""
    hint = ""

    def __init__(self, window: "MainWindow"):
        super().__init__()
        self.window = window
        self.layout_ = QVBoxLayout(self)
        self.layout_.setContentsMargins(12, 10, 12, 10)
        heading = QLabel(self.title)
        heading.setObjectName("stepTitle")
        self.layout_.addWidget(heading)
        if self.hint:
            text = QLabel(self.hint)
            text.setObjectName("hint")
            text.setWordWrap(True)
            self.layout_.addWidget(text)

    @property
    def session(self):
        return self.window.session

    @property
    def settings(self):
        return self.window.settings

    def refresh(self) -> None:
        """Redraw the panel from the session."""

    def shutdown(self) -> None:
        """Stop and join whatever the step runs in the background."""


class _WheelGuard(QObject):
    """Drops wheel events on a field that does not have the keyboard focus: scrolling a panel must
    never change a value the pointer happens to pass over (a landmark moved 0.5 mm per notch)."""

    def eventFilter(self, watched, event) -> bool:  # noqa: N802 - Qt's name
        if event.type() == QEvent.Type.Wheel and not watched.hasFocus():
            parent = watched.parentWidget()
            if parent is not None:  # the surrounding table or panel scrolls instead
                QApplication.sendEvent(parent, event)
            return True
        return False


_WHEEL_GUARD: _WheelGuard | None = None


def ignore_wheel_unless_focused(widget: QWidget) -> None:
    """Spin boxes and combo boxes: the wheel changes them only once clicked or tabbed into."""
    global _WHEEL_GUARD
    if _WHEEL_GUARD is None:
        _WHEEL_GUARD = _WheelGuard(QApplication.instance())
    widget.setFocusPolicy(Qt.FocusPolicy.StrongFocus)
    widget.installEventFilter(_WHEEL_GUARD)


def read_only_table(headers: Sequence[str], stretch: Sequence[int] = (0,)) -> QTableWidget:
    """A read-only table; columns in ``stretch`` share the free width, others fit their text."""
    table = QTableWidget(0, len(headers))
    table.setHorizontalHeaderLabels(list(headers))
    table.verticalHeader().setVisible(False)
    table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
    table.setSelectionMode(QAbstractItemView.SelectionMode.NoSelection)
    table.setAlternatingRowColors(True)
    table.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    header = table.horizontalHeader()
    for column in range(len(headers)):
        header.setSectionResizeMode(column, QHeaderView.ResizeMode.Stretch if column in stretch
                                    else QHeaderView.ResizeMode.ResizeToContents)
    return table


def release_worker(owner, attribute: str) -> str | None:
    """Join the finished worker thread held in ``owner.attribute``, drop it and return its outcome
    (None when there was none)."""
    worker = getattr(owner, attribute)
    if worker is None:
        return None
    worker.wait()  # run() has returned or is returning: join the thread before dropping it
    setattr(owner, attribute, None)
    worker.deleteLater()
    return worker.outcome or "errored"


class busy:
    """Context manager: a wait cursor while the GUI thread does a short blocking job."""

    def __enter__(self):
        QApplication.setOverrideCursor(Qt.CursorShape.WaitCursor)
        return self

    def __exit__(self, *exc):
        QApplication.restoreOverrideCursor()
        return False
