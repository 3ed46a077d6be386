"""The workstation's Qt style sheet (dark, for a reading room).

Keyboard focus is a 2 px amber ring (amber underlined text on check boxes); a checked box shows a
white tick, not only another colour."""

import os
import pathlib
import tempfile

from inference import io

_TEMPLATE = """
QMainWindow, QWidget { background: #1E232B; color: #D8DEE9; font-size: 10pt; }
QLabel#banner { background: #B3261E; color: white; font-weight: bold; padding: 5px; font-size: 10.5pt; }
QLabel#viewTitle { font-weight: bold; color: #ECEFF4; }
QLabel#viewDetails, QLabel#hint { color: #9AA4B2; font-size: 9pt; }
QLabel#stepTitle { font-size: 14pt; font-weight: bold; color: #ECEFF4; padding: 2px 0 6px 0; }
QListWidget#steps { background: #161A20; border: none; font-size: 11pt; outline: none; }
QListWidget#steps::item { padding: 9px 10px; border-left: 3px solid transparent; }
QListWidget#steps::item:selected { background: #2B3340; border-left: 3px solid #4FC3F7; color: white; }
QListWidget#steps::item:disabled { color: #5B6472; }
QPushButton, QToolButton { background: #2E3440; border: 1px solid #3B4252; border-radius: 4px; padding: 5px 10px; }
QPushButton:hover, QToolButton:hover { background: #3B4252; }
QPushButton:disabled { color: #5B6472; }
QPushButton#primary { background: #0277BD; border-color: #0288D1; color: white; font-weight: bold; }
QPushButton#primary:disabled { background: #263238; color: #5B6472; }
QToolButton:checked { background: #0277BD; color: white; }
QTableWidget { background: #161A20; gridline-color: #2E3440; alternate-background-color: #1B2027; }
QHeaderView::section { background: #2E3440; color: #D8DEE9; border: none; padding: 4px; }
QTabWidget::pane { border: none; }
QTabBar::tab { background: #161A20; padding: 6px 16px; border: none; }
QTabBar::tab:selected { background: #2B3340; color: white; border-bottom: 2px solid #4FC3F7; }
QProgressBar { border: 1px solid #3B4252; border-radius: 4px; text-align: center; background: #161A20; }
QProgressBar::chunk { background: #0288D1; }
QGroupBox { border: 1px solid #2E3440; border-radius: 4px; margin-top: 14px; padding-top: 6px; }
QGroupBox::title { subcontrol-origin: margin; left: 8px; color: #9AA4B2; }
QLineEdit, QSpinBox, QDoubleSpinBox, QComboBox, QPlainTextEdit { background: #161A20; border: 1px solid #3B4252; border-radius: 3px; padding: 2px; }
QStatusBar { background: #161A20; color: #9AA4B2; }
QMenuBar { background: #161A20; } QMenuBar::item:selected { background: #2B3340; }
QMenu { background: #20252D; border: 1px solid #3B4252; } QMenu::item:selected { background: #2B3340; }
QSplitter::handle { background: #2E3440; }
QCheckBox { spacing: 7px; }
QCheckBox::indicator { width: 14px; height: 14px; border: 1px solid #8A94A6; border-radius: 3px; background: #161A20; }
QCheckBox::indicator:checked { background: #0277BD; border-color: #4FC3F7; image: url(@TICK@); }
QCheckBox::indicator:disabled { border-color: #3B4252; }
QPushButton:focus, QToolButton:focus { border: 2px solid #FFD54F; }
QLineEdit:focus, QSpinBox:focus, QDoubleSpinBox:focus, QComboBox:focus, QPlainTextEdit:focus { border: 2px solid #FFD54F; }
QListWidget#steps:focus, QTableWidget:focus, QTabBar:focus { border: 1px solid #FFD54F; }
QCheckBox:focus { color: #FFD54F; text-decoration: underline; }
QWidget#staleBanner { background: #5D4037; } QWidget#staleBanner QLabel { color: #FFE0B2; font-weight: bold; }
"""

#: A white tick for checked boxes (Qt style sheets draw images only from files or resources).
_TICK_SVG = ('<svg xmlns="http://www.w3.org/2000/svg" width="14" height="14" viewBox="0 0 14 14">'
             '<path d="M2.5 7.5 L5.8 10.6 L11.5 3.6" fill="none" stroke="white" stroke-width="2.4" '
             'stroke-linecap="round" stroke-linejoin="round"/></svg>')


def _tick_file() -> pathlib.Path:
    folder = pathlib.Path(tempfile.gettempdir()) / f"hipatlas-style-{os.getuid() if hasattr(os, 'getuid') else 0}"
    path = folder / "tick.svg"
    if not path.is_file() or path.read_text() != _TICK_SVG:
        io.write_text_atomic(path, _TICK_SVG)  # whole or not at all, even with two workstations starting
    return path


def style_sheet() -> str:
    """The style sheet, with the tick image written where Qt can read it."""
    return _TEMPLATE.replace("@TICK@", _tick_file().as_posix())
