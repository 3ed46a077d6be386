"""Step 3, Register: run the registration off the GUI thread, show its progress, cancel it."""

from __future__ import annotations

import logging

import numpy as np

from PySide6.QtWidgets import QLabel, QPlainTextEdit, QProgressBar, QPushButton

from app.steps.base import Step, release_worker
from app.workers import GeneratorWorker

log = logging.getLogger(__name__)


class RegisterStep(Step):
    name, viewer = "Register", 0
    title = "Register"
    hint = ("The atlas is registered to both radiographs; this takes from seconds to a few minutes. The "
            "window stays usable meanwhile.")

    def __init__(self, window):
        super().__init__(window)
        layout = self.layout_
        self.worker: GeneratorWorker | None = None
        self._pending_masks: list[np.ndarray] | None = None
        #: The masks the current result was registered with, and those the user chose to keep
        #: the result for although they differ (None: nothing kept).
        self.result_masks: list[np.ndarray] | None = None
        self.kept_masks: list[np.ndarray] | None = None
        self.model_label = QLabel("")
        self.model_label.setWordWrap(True)
        self.model_label.setObjectName("hint")
        layout.addWidget(self.model_label)
        self.register_button = QPushButton("Register")
        self.register_button.setObjectName("primary")
        self.register_button.clicked.connect(self.start_registration)
        layout.addWidget(self.register_button)
        self.register_blocker = QLabel("")
        self.register_blocker.setObjectName("hint")
        self.register_blocker.setWordWrap(True)
        layout.addWidget(self.register_blocker)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setValue(0)
        self.progress.setFormat("")
        layout.addWidget(self.progress)
        self.progress_message = QLabel("")
        layout.addWidget(self.progress_message)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel_registration)
        layout.addWidget(self.cancel_button)
        self.warnings_box = QPlainTextEdit()
        self.warnings_box.setReadOnly(True)
        self.warnings_box.setPlaceholderText("Registration warnings appear here")
        self.warnings_box.setMaximumHeight(140)
        layout.addWidget(self.warnings_box)
        layout.addStretch(1)

    def blocker(self) -> str | None:
        """Why registration cannot start now, or None."""
        blocker = self.session.register_blocker()
        if blocker is None and self.window.masks_step.proposal_worker is not None:
            blocker = "wait for the mask proposal to finish (or stop it)"
        return blocker

    def readiness(self) -> str:
        """The status line about registering, true to the current state."""
        blocker = self.blocker()
        if blocker is None:
            return "Both masks confirmed: ready to register (Ctrl+R)"
        return f"To register: {blocker}"

    # ---------------------------------------------------------------- out-of-date results
    def session_replaced(self) -> None:
        """A case or project was opened: a result it brings was made from its current masks."""
        s = self.session
        self.result_masks = [v.mask.copy() for v in s.views] if s.result is not None else None
        self.kept_masks = None

    def _masks_equal(self, masks) -> bool:
        views = self.session.views
        return masks is not None and len(masks) == len(views) and all(
            np.array_equal(m, v.mask) for m, v in zip(masks, views))

    def stale_reason(self) -> str | None:
        """Why the result no longer matches the masks (None: it does, or the user kept it)."""
        s = self.session
        if s.result is None or self.result_masks is None or self._masks_equal(self.kept_masks):
            return None
        views = s.views
        changed = [v.name for v, m in zip(views, self.result_masks) if not np.array_equal(m, v.mask)]
        if changed:
            return "the mask of " + " and ".join(repr(n) for n in changed) + " changed after the registration"
        unconfirmed = [v.name for v in views if not v.confirmed]
        if unconfirmed:
            return "the mask of " + " and ".join(repr(n) for n in unconfirmed) + " is no longer confirmed"
        return None

    def keep_result(self) -> None:
        """The user keeps the result although the masks changed (until they change again)."""
        self.kept_masks = [v.mask.copy() for v in self.session.views]
        self.window.refresh_steps()
        self.window.status("Kept the registration result from before the mask changes")

    def refresh(self) -> None:
        w = self.window
        running = self.worker is not None
        blocker = self.blocker()
        self.register_button.setEnabled(blocker is None and not running)
        # The shortcut stays live so that Ctrl+R explains why it cannot register, not nothing.
        w.actions["register"].setEnabled(not running)
        tip = ("Registering…" if running else f"Cannot register yet: {blocker}" if blocker
               else "Register the atlas to both radiographs (Ctrl+R)")
        self.register_button.setToolTip(tip)
        w.actions["register"].setToolTip(tip)
        w.actions["cancel"].setEnabled(running)
        self.cancel_button.setEnabled(running)
        self.register_blocker.setText("" if blocker is None or running else f"To register: {blocker}.")
        model = self.settings.model_path or "shipped model"
        self.model_label.setText(f"Model: {model} \u2022 device: {self.settings.device.upper()}")
        for key in ("open_case", "import", "open_project"):
            w.actions[key].setEnabled(not running)

    def show_result(self, result) -> None:
        self.warnings_box.setPlainText("" if result is None else "\n".join(result.warnings) or "No warnings.")

    # ---------------------------------------------------------------- running
    def start_registration(self) -> bool:
        w = self.window
        if self.worker is not None:
            return False
        blocker = self.blocker()
        if blocker is not None:
            w.report_error(f"Cannot register yet: {blocker}.")
            return False
        try:
            job = self.session.registration_job(model=self.settings.model_path or None)
        except Exception as error:  # noqa: BLE001
            w.report_error(error)
            return False
        self._pending_masks = [v.mask.copy() for v in self.session.views]
        self.worker = GeneratorWorker(job, self)
        self.worker.progress.connect(self._on_progress)
        self.worker.succeeded.connect(self._on_registered)
        self.worker.cancelled.connect(self._on_cancelled)
        self.worker.errored.connect(self._on_failed)
        self.worker.done.connect(self._on_worker_done)
        self.progress.setValue(0)
        self.progress.setFormat("%p%")
        self.progress_message.setText("Starting")
        w.go_to_step("Register")
        self.worker.start()
        self.refresh()
        w.status("Registering\u2026")
        return True

    def cancel_registration(self) -> None:
        # outcome is set once the job has ended: an Esc then has nothing left to cancel
        if self.worker is not None and self.worker.outcome is None:
            self.worker.cancel()
            self.progress_message.setText("Cancelling\u2026")
            self.cancel_button.setEnabled(False)

    def _on_progress(self, fraction: float, message: str) -> None:
        self.progress.setValue(int(round(1000 * max(0.0, min(1.0, fraction)))))
        self.progress_message.setText(message)

    def _on_registered(self, result) -> None:
        w = self.window
        self.session.set_result(result)
        self.result_masks, self.kept_masks = self._pending_masks, None
        w.measure_step.stack.clear()  # its landmark moves belonged to the previous result
        self.progress.setValue(1000)
        self.progress_message.setText("Done")
        w.refresh_result()
        w.refresh_steps()
        w.go_to_step("Review")
        w.status("Registration finished" + (f" with {len(result.warnings)} warning(s)" if result.warnings else ""))

    def _on_cancelled(self) -> None:
        self.progress.setValue(0)
        self.progress.setFormat("")
        self.progress_message.setText("Cancelled")
        self.window.status("Registration cancelled")

    def _on_failed(self, error: BaseException) -> None:
        self.progress.setFormat("")
        self.progress_message.setText("Failed")
        self.window.report_error(error)

    def _on_worker_done(self) -> None:
        outcome = release_worker(self, "worker")
        if outcome is None:
            return
        self.refresh()
        self.window.refresh_steps()
        self.window.registration_finished.emit(outcome)

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.cancel()
            if not self.worker.wait(60_000):
                log.error("the registration thread did not stop within 60 s")
            self.worker = None
