"""Step 6, Template: choose and place the stem and the cup, and see what the plan changes.

The step's panel holds the Template panel's controls (sizes, head, seating, cup angles and shifts,
the automatic plan, the table of changes and its warnings); the viewers' Template tab shows the
same :class:`app.template_panel.TemplatePanel`'s 3D view and both radiographs with the implants'
outlines. Plan edits are undoable (Edit > Undo while this step is shown).

The plan is out of date when the registration is (the masks changed since), or when the landmarks
moved since the plan's table was computed (:func:`app.plan_report.plan_basis`): showing the step
recomputes the changes from the current landmarks.
"""

from __future__ import annotations

from app.plan_report import plan_basis
from app.steps.base import Step


class TemplateStep(Step):
    name, viewer = "Template", 3
    title = "Template"
    hint = ("Plan the stem and the cup: the first plan is automatic; change sizes, head and angles here, or drag "
            "the green handles in the 3D view. The table shows what the plan changes; the plan is saved with the "
            "project and printed in the report.")

    def __init__(self, window):
        super().__init__(window)
        self.panel = window.template_panel
        self.stack = self.panel.stack
        self.layout_.addWidget(self.panel.controls, 1)   # out of the panel's own splitter, into the step
        self.panel.plan_changed.connect(lambda _plan: window.refresh_steps())

    def refresh(self) -> None:
        """Follow the session (a new result, a reloaded project): the panel reloads when shown."""
        self.panel.set_session(self.session)

    def stale_reason(self) -> str | None:
        """Why the plan's table no longer matches the landmarks, or None; the panel then reloads
        (now if shown, else when next shown), recomputing the changes from the current landmarks."""
        s = self.session
        if s.result is None or not s.template_plan or s.template_basis in (None, plan_basis(s.measurements)):
            return None
        self.panel.set_session(s)   # reloads now if shown (and the basis is then current), else when shown
        return "the landmarks moved since the plan was made" if s.template_basis != plan_basis(s.measurements) else None

    def shutdown(self) -> None:
        self.panel.close_plotter()
