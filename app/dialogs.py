"""Small dialogs of the workstation that belong to no workflow step."""

from __future__ import annotations

from PySide6.QtWidgets import (QCheckBox, QComboBox, QDialog, QDialogButtonBox, QFileDialog, QFormLayout, QHBoxLayout,
                               QLabel, QLineEdit, QPushButton, QSpinBox)

from PySide6.QtGui import QKeySequence

from app.session import RESEARCH_NOTICE, describe_model
from app.settings import Settings
from app.steps.base import ignore_wheel_unless_focused
from inference import __version__


class SettingsDialog(QDialog):
    def __init__(self, settings: Settings, parent=None):
        super().__init__(parent)
        self.setWindowTitle("Settings")
        self.settings = settings
        form = QFormLayout(self)
        self.model = QLineEdit(settings.model_path)
        self.model.setPlaceholderText("shipped model")
        browse = QPushButton("Browse\u2026")
        browse.clicked.connect(self._browse)
        row = QHBoxLayout()
        row.addWidget(self.model, 1)
        row.addWidget(browse)
        form.addRow("Model (.keras)", row)
        self.device = QComboBox()
        self.device.addItems(["cpu", "gpu"])
        self.device.setCurrentText(settings.device)
        form.addRow("Compute device", self.device)
        self.backend = QComboBox()
        from inference.backends import tensorflow_available  # not at import: the window starts without it

        with_tensorflow = tensorflow_available()
        # the TensorFlow-free runtime (hipatlas-runtime) offers ONNX Runtime only
        self.backend.addItems(["auto", "tf", "onnx"] if with_tensorflow else ["auto", "onnx"])
        self.backend.setCurrentText(settings.backend)
        self.backend.setToolTip("Who runs the registration network: ONNX Runtime (onnx), TensorFlow (tf), "
                                "or auto (ONNX Runtime when the model has its .onnx export)"
                                + ("" if with_tensorflow else ". TensorFlow is not installed (the TensorFlow-free "
                                   "runtime): training and the test-time refinement are not available."))
        form.addRow("Inference backend", self.backend)
        self.ensemble = QCheckBox("Average five network passes (shift ensemble)")
        self.ensemble.setChecked(settings.ensemble)
        self.ensemble.setToolTip("Runs the network with the atlas grid placed a voxel off four ways and averages "
                                 "the results: slightly more accurate (held-out cases: -0.001 to +0.006 mean Dice, "
                                 "lower surface error), about 2 s more per registration. Same as "
                                 "hipatlas register --ensemble / --no-ensemble.")
        form.addRow("Registration", self.ensemble)
        note = QLabel("The device, the backend and the ensemble take effect the next time the workstation starts.")
        note.setObjectName("hint")
        form.addRow("", note)
        self.units = QComboBox()
        self.units.addItems(["mm", "cm"])
        self.units.setCurrentText(settings.units)
        form.addRow("Length units", self.units)
        self.auto_propose = QCheckBox("Propose masks from the atlas when a case has none")
        self.auto_propose.setChecked(settings.auto_propose)
        form.addRow("Masks", self.auto_propose)
        self.autosave = QSpinBox()
        self.autosave.setRange(0, 60)
        self.autosave.setSuffix(" min")
        self.autosave.setSpecialValueText("off")
        self.autosave.setValue(int(round(settings.autosave_minutes)))
        ignore_wheel_unless_focused(self.autosave)
        for combo in (self.device, self.backend, self.units):
            ignore_wheel_unless_focused(combo)
        form.addRow("Autosave every", self.autosave)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        form.addRow(buttons)

    def _browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Choose a model", self.settings.last_folder, "Keras model (*.keras)")
        if path:
            self.model.setText(path)

    def apply(self) -> None:
        self.settings.model_path = self.model.text().strip()
        self.settings.device = self.device.currentText()
        self.settings.backend = self.backend.currentText()
        self.settings.ensemble = self.ensemble.isChecked()
        self.settings.apply_backend()
        self.settings.units = self.units.currentText()
        self.settings.auto_propose = self.auto_propose.isChecked()
        self.settings.autosave_minutes = self.autosave.value()
        self.settings.sync()


def about_html(model_path) -> str:
    """The About box: version, the model a registration would use, the research notice."""
    model = describe_model(model_path)
    if "error" in model:
        model_text = f"<i>{model['error']}</i>"
    else:
        members = model.get("members") or [model]
        model_text = "<br>".join(
            f"{member.get('id')}<br><small>{member.get('file')}</small>"
            + (f"<br><small>sha256 {str(member['sha256'])[:16]}\u2026</small>" if member.get("sha256") else "")
            for member in members)
        if len(members) > 1:
            model_text = f"{len(members)} models, their fields averaged:<br>{model_text}"
    return (f"<h3>HipAtlas planning workstation</h3><p>Version {__version__}</p>"
            f"<p><b>Model:</b> {model_text}</p>"
            "<p>3D proximal femur reconstruction from two calibrated radiographs by deep "
            "atlas registration (after Van Houtte et al., IJCARS 2022).</p>"
            f"<p style='color:#E57373'><b>{RESEARCH_NOTICE}</b></p>")


def shortcuts_html(actions) -> str:
    """A table of the actions that have a keyboard shortcut."""
    lines = []
    for act in actions:
        if act.shortcut() and not act.shortcut().isEmpty():
            lines.append(f"<tr><td><b>{act.shortcut().toString(QKeySequence.SequenceFormat.NativeText)}</b></td>"
                         f"<td>{act.text().replace('&', '')}</td></tr>")
    return "<table cellspacing=4>" + "".join(lines) + "</table>"


def show_user_guide(parent, guide) -> None:
    """Open the user guide (docs/user-guide.md, with its pictures) in the system's viewer."""
    from PySide6.QtCore import QUrl
    from PySide6.QtGui import QDesktopServices
    from PySide6.QtWidgets import QMessageBox

    if not guide.is_file() or not QDesktopServices.openUrl(QUrl.fromLocalFile(str(guide))):
        QMessageBox.information(parent, "User guide", f"The user guide is {guide}; no viewer could open it "
                                "here. It is also in the HipAtlas source repository, docs/user-guide.md.")
