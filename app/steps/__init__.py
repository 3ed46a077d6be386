"""The workstation's workflow steps, one module each, in workflow order.

Each step is a :class:`app.steps.base.Step`: the panel shown beside the viewers and the slots that
act on it. :class:`app.main_window.MainWindow` builds them from :data:`STEP_CLASSES` and wires
them to the viewers, the menus and the session.
"""

from app.steps.export import ExportStep
from app.steps.load import LoadStep
from app.steps.masks import MasksStep
from app.steps.measure import MeasureStep
from app.steps.register import RegisterStep
from app.steps.review import ReviewStep
from app.steps.template import TemplateStep

STEP_CLASSES = (LoadStep, MasksStep, RegisterStep, ReviewStep, MeasureStep, TemplateStep, ExportStep)
STEPS = tuple(cls.name for cls in STEP_CLASSES)
