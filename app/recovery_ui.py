"""Autosave and crash recovery of the workstation: a timer that saves a recovery copy of unsaved
work, and the offer to restore what a crashed session left (the store is :mod:`app.project`)."""

from __future__ import annotations

import logging

from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QMessageBox

from app import project as project_io

log = logging.getLogger(__name__)


class AutosaveKeeper:
    """Owns the window's autosave timer and its :class:`~app.project.RecoveryStore`."""

    def __init__(self, window):
        self.window = window
        self.store = project_io.RecoveryStore(window.settings.recovery_dir)
        self.timer = QTimer(window)
        self.timer.timeout.connect(self.autosave)

    def restart(self) -> None:
        """(Re)start the timer at the interval of the settings (0 = off)."""
        minutes = self.window.settings.autosave_minutes
        if minutes > 0:
            self.timer.start(int(minutes * 60_000))
        else:
            self.timer.stop()

    def autosave(self) -> bool:
        """Save a recovery copy if there are unsaved changes (not while registering)."""
        window = self.window
        if not window.session.has_case or not window.session.dirty or window.register_step.worker is not None:
            return False
        try:
            self.store.autosave(window.session)
        except Exception as error:  # noqa: BLE001 - autosave must never interrupt the user
            log.warning("autosave failed: %s", error)
            return False
        log.info("autosaved to %s", self.store.project_file)
        return True

    def offer_recovery(self) -> bool:
        """Offer to restore autosaves left by a crashed session; returns True if one was restored."""
        orphans = self.store.orphans()
        if not orphans or not self.window.interactive:
            return False
        for autosave in orphans:
            answer = QMessageBox.question(
                self.window, "Recover unsaved work?",
                f"HipAtlas did not close properly. Recover the unsaved work on "
                f"\u201c{autosave.case_label}\u201d from {autosave.saved}?",
                QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No)
            if answer == QMessageBox.StandardButton.Yes:
                return self.recover(autosave)
            self.store.discard(autosave)
        return False

    def recover(self, autosave: project_io.Autosave) -> bool:
        window = self.window
        try:
            session = self.store.recover(autosave, **window.session.options())
        except Exception as error:  # noqa: BLE001
            window.report_error(error)
            return False
        window.replace_session(session)
        window.go_to_step("Review" if session.result is not None else "Masks")
        window.status("Recovered unsaved work; save it to keep it")
        return True

    def stop(self) -> None:
        """At shutdown: no more saves, and this session's recovery copy is deleted."""
        self.timer.stop()
        self.store.clear()
