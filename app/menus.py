"""The workstation's menus and keyboard shortcuts, in one place (Help > Keyboard shortcuts lists them)."""

from __future__ import annotations

from PySide6.QtGui import QAction, QKeySequence

from app.steps import STEPS


def _pacs_dialog():
    """app.pacs_dialog, imported when a PACS action is used (it loads pynetdicom)."""
    from app import pacs_dialog

    return pacs_dialog


def build_menus(window) -> dict[str, QAction]:
    """Fill the window's menu bar; returns the actions by key (``window.actions``)."""
    menu = window.menuBar()
    file_menu = menu.addMenu("&File")
    actions: dict[str, QAction] = {}

    def action(key, text, slot, shortcut=None, menu_=file_menu):
        act = QAction(text, window)
        if shortcut:
            act.setShortcut(QKeySequence(shortcut))
        act.triggered.connect(slot)
        menu_.addAction(act)
        actions[key] = act
        return act

    load, masks = window.load_step, window.masks_step
    action("open_case", "Open case folder\u2026", load.choose_case_folder, "Ctrl+O")
    action("import", "Import two radiographs\u2026", load.choose_radiographs, "Ctrl+I")
    action("open_pacs", "Open from PACS\u2026", lambda: _pacs_dialog().open_from_pacs(window))
    action("open_project", "Open project\u2026", load.choose_project, "Ctrl+Shift+O")
    window.recent_menu = file_menu.addMenu("Open recent")
    file_menu.addSeparator()
    action("save", "Save project", window.export_step.save_project, QKeySequence.StandardKey.Save)
    action("save_as", "Save project as\u2026", window.export_step.save_project_as, "Ctrl+Shift+S")
    action("export", "Export\u2026", window.export_step.choose_export_folder, "Ctrl+E")
    action("send_pacs", "Send to PACS\u2026", lambda: _pacs_dialog().send_to_pacs(window))
    file_menu.addSeparator()
    action("settings", "Settings\u2026", window.edit_settings, "Ctrl+,")
    file_menu.addSeparator()
    action("quit", "Quit", window.close, "Ctrl+Q")

    edit_menu = menu.addMenu("&Edit")
    undo = window.undo_group.createUndoAction(window, "Undo")
    undo.setShortcut(QKeySequence.StandardKey.Undo)
    redo = window.undo_group.createRedoAction(window, "Redo")
    redo.setShortcuts([QKeySequence.StandardKey.Redo, QKeySequence("Ctrl+Y")])
    edit_menu.addAction(undo)
    edit_menu.addAction(redo)
    actions["undo"], actions["redo"] = undo, redo
    edit_menu.addSeparator()
    for key, text, shortcut in (("navigate", "Pan tool", "N"), ("brush", "Brush", "B"),
                                ("eraser", "Eraser", "E"), ("polygon", "Polygon", "P")):
        action(f"tool_{key}", text, lambda _=False, t=key: masks.set_tool(t), shortcut, edit_menu)
    action("brush_bigger", "Larger brush", lambda: masks.brush_size.setValue(int(masks.brush_size.value() * 1.25) + 1),
           "]", edit_menu)
    action("brush_smaller", "Smaller brush", lambda: masks.brush_size.setValue(max(1, int(masks.brush_size.value() / 1.25))),
           "[", edit_menu)

    work_menu = menu.addMenu("&Workflow")
    for number, name in enumerate(STEPS, 1):
        action(f"step_{name.lower()}", f"{number}. {name}", lambda _=False, n=name: window.go_to_step(n),
               f"Ctrl+{number}", work_menu)
    work_menu.addSeparator()
    action("register", "Register", window.register_step.start_registration, "Ctrl+R", work_menu)
    action("cancel", "Cancel registration", window.register_step.cancel_registration, "Esc", work_menu)
    view_menu = menu.addMenu("&View")
    action("reset_camera", "Reset 3D camera", window.surface_view.reset_camera, "R", view_menu)
    action("fit", "Fit radiographs", lambda: [p.view.fit_to_view() for p in window.radiograph_panels], "F", view_menu)
    for index, name in enumerate(("Radiographs", "3D", "Slices", "Template")):
        action(f"viewer_{index}", name, lambda _=False, i=index: window.viewers.setCurrentIndex(i),
               f"Alt+{index + 1}", view_menu)
    help_menu = menu.addMenu("&Help")
    action("user_guide", "User guide", window.show_user_guide, "Shift+F1", help_menu)
    action("shortcuts", "Keyboard shortcuts", window.show_shortcuts, "F1", help_menu)
    action("about", "About HipAtlas", window.show_about, None, help_menu)
    return actions
