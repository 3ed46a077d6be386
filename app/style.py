"""The workstation's Qt style sheet (dark, high contrast for a reading room)."""

STYLE = """
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
QCheckBox::indicator { width: 14px; height: 14px; border: 1px solid #6B7686; border-radius: 3px; background: #161A20; }
QCheckBox::indicator:checked { background: #0288D1; border-color: #4FC3F7; image: none; }
QCheckBox::indicator:disabled { border-color: #3B4252; }
"""
