"""User settings (QSettings): model path, compute device, units, autosave, recent files."""

from __future__ import annotations

import os
import pathlib

from PySide6.QtCore import QSettings, QStandardPaths

from inference.resources import resources_root

ORGANISATION = "HipAtlas"
APPLICATION = "HipAtlas Planning Workstation"
MAX_RECENT = 8
DEVICES = ("cpu", "gpu")
#: Who runs the registration network (inference.backends): auto = ONNX Runtime when the model has
#: its .onnx, else TensorFlow.
BACKENDS = ("auto", "tf", "onnx")
UNITS = ("mm", "cm")


def documents_folder() -> str:
    """The user's documents folder if it exists, else their home folder."""
    documents = QStandardPaths.writableLocation(QStandardPaths.StandardLocation.DocumentsLocation)
    return documents if documents and os.path.isdir(documents) else os.path.expanduser("~")


class Settings:
    """Typed access to the workstation's QSettings.

    Parameters
    ----------
    qsettings : QSettings, optional
        Defaults to the user's native settings store; tests pass an INI file.
    """

    def __init__(self, qsettings: QSettings | None = None):
        self.q = qsettings if qsettings is not None else QSettings(ORGANISATION, APPLICATION)

    def _get(self, key: str, default):
        value = self.q.value(key, default)
        return default if value is None else value

    # model ------------------------------------------------------------------------------
    @property
    def model_path(self) -> str:
        """A .keras file or model folder; empty = the shipped model."""
        return str(self._get("model/path", ""))

    @model_path.setter
    def model_path(self, value: str) -> None:
        self.q.setValue("model/path", str(value or ""))

    @property
    def device(self) -> str:
        value = str(self._get("compute/device", "cpu")).lower()
        return value if value in DEVICES else "cpu"

    @device.setter
    def device(self, value: str) -> None:
        if value not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, not {value!r}")
        self.q.setValue("compute/device", value)

    @property
    def backend(self) -> str:
        value = str(self._get("compute/backend", "auto")).lower()
        return value if value in BACKENDS else "auto"

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, not {value!r}")
        self.q.setValue("compute/backend", value)

    @property
    def ensemble(self) -> bool:
        """Whether registration averages the shift ensemble's five network passes
        (:mod:`inference.ensemble`); unset = ``$HIPATLAS_ENSEMBLE``'s default for the model(s) a
        registration would use (auto: on for one model, off for several averaged)."""
        value = self._get("compute/ensemble", None)
        if value is None:
            from inference.ensemble import default_ensemble

            return default_ensemble(self._model_count())
        return str(value).strip().lower() in ("true", "1", "on", "yes")

    @ensemble.setter
    def ensemble(self, value: bool) -> None:
        self.q.setValue("compute/ensemble", bool(value))

    def apply_backend(self) -> None:
        """Make the compute settings (backend, shift ensemble) the defaults of registration in this
        process and in the registration processes it starts (they inherit the environment)."""
        from inference.backends import BACKEND_ENV
        from inference.ensemble import ENV_VAR as ENSEMBLE_ENV

        os.environ[BACKEND_ENV] = self.backend
        if self._get("compute/ensemble", None) is None:
            os.environ.setdefault(ENSEMBLE_ENV, "auto")
        else:
            os.environ[ENSEMBLE_ENV] = "on" if self.ensemble else "off"

    def _model_count(self) -> int:
        """How many models a registration averages: one when a model file is chosen, else those
        ``resources/models/DEFAULT`` names."""
        if self.model_path:
            return 1
        from inference.errors import ModelError
        from inference.registration import default_model_paths

        try:
            return len(default_model_paths())
        except ModelError:
            return 1

    # display ----------------------------------------------------------------------------
    @property
    def units(self) -> str:
        value = str(self._get("display/units", "mm"))
        return value if value in UNITS else "mm"

    @units.setter
    def units(self, value: str) -> None:
        if value not in UNITS:
            raise ValueError(f"units must be one of {UNITS}, not {value!r}")
        self.q.setValue("display/units", value)

    @property
    def auto_propose(self) -> bool:
        """Start the atlas-based mask proposal when a case without masks is opened."""
        value = self._get("masks/auto_propose", True)
        return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")

    @auto_propose.setter
    def auto_propose(self, value: bool) -> None:
        self.q.setValue("masks/auto_propose", bool(value))

    # autosave ---------------------------------------------------------------------------
    @property
    def autosave_minutes(self) -> float:
        try:
            return max(0.0, float(self._get("autosave/minutes", 2.0)))
        except (TypeError, ValueError):
            return 2.0

    @autosave_minutes.setter
    def autosave_minutes(self, value: float) -> None:
        self.q.setValue("autosave/minutes", float(value))

    @property
    def recovery_dir(self) -> pathlib.Path:
        """Where autosaves live: a setting, else the platform's application data folder."""
        configured = str(self._get("autosave/folder", ""))
        if configured:
            return pathlib.Path(configured)
        base = QStandardPaths.writableLocation(QStandardPaths.StandardLocation.AppDataLocation)
        return pathlib.Path(base or os.path.expanduser("~/.hipatlas")) / "recovery"

    @recovery_dir.setter
    def recovery_dir(self, value: str | os.PathLike) -> None:
        self.q.setValue("autosave/folder", str(value))

    # recent files -----------------------------------------------------------------------
    @property
    def recent_files(self) -> list[str]:
        value = self._get("recent/files", [])
        if isinstance(value, str):
            value = [value] if value else []
        return [str(v) for v in value][:MAX_RECENT]

    def add_recent(self, path: str | os.PathLike) -> list[str]:
        path = str(pathlib.Path(path).resolve())
        files = [path] + [p for p in self.recent_files if p != path]
        self.q.setValue("recent/files", files[:MAX_RECENT])
        return files[:MAX_RECENT]

    def remove_recent(self, path: str | os.PathLike) -> None:
        self.q.setValue("recent/files", [p for p in self.recent_files if p != str(path)])

    @property
    def last_folder(self) -> str:
        """Where file dialogs start: the user's last folder, else their documents folder. Never
        a folder inside the installation's resources (where the demo case lives)."""
        folder = pathlib.Path(str(self._get("recent/folder", "")) or documents_folder())
        resources = resources_root().resolve()
        if not folder.is_dir() or folder.resolve() == resources or resources in folder.resolve().parents:
            return documents_folder()
        return str(folder)

    @last_folder.setter
    def last_folder(self, value: str | os.PathLike) -> None:
        self.q.setValue("recent/folder", str(value))

    def sync(self) -> None:
        self.q.sync()
