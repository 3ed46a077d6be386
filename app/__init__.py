"""HipAtlas planning workstation (PySide6 + VTK), started with ``hipatlas gui``.

Modules
-------
main.py          QApplication, exception hooks, ``run_gui`` (the ``hipatlas gui`` command)
main_window.py   the window: wires the workflow steps to the viewers, menus, project and autosave
steps/           one module per workflow step: load, masks, register, review, measure, export
dialogs.py       settings and About text;  menus.py  menus and shortcuts;  style.py  style sheet
export.py        the export writers, one table row per format, Qt-free
screenshots.py   the window as shown (3D pixels included)
session.py       the Qt-free state of one case: masks, registration job, landmarks, export
masks.py         mask editing (brush, eraser, polygon) and mask proposals, Qt-free
imaging.py       windowing, tints and slices for display, Qt-free
project.py       ``.hipatlas`` project files (one zip), autosave and crash recovery, Qt-free
report.py        the PDF planning report (reportlab), Qt-free; report_figures.py its off-screen pictures
template_panel.py  the Template tab (implant templating);  pacs_dialog.py  Open from / Send to PACS
windowing.py     window/level and invert of a radiograph (right-drag, presets), Qt-free
isolated.py      runs the registration in a child process (TensorFlow never enters the GUI);
                 WorkerProcess keeps that process, and its loaded model, between jobs
workers.py       QThread worker driving a progress generator (cancel between yields)
settings.py      QSettings: model, device, units, autosave, recent files
views/           radiograph + mask editor + measurement graphics, 3D view (pyvistaqt), linked slice views

``app`` imports ``inference``; ``inference`` never imports ``app`` (tests/test_architecture.py).
"""
