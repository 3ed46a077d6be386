"""Project files (``.hipatlas``), autosave and crash recovery, without Qt.

A project is **one zip file** so that it can be mailed, archived or copied as a unit:

```
project.json          format "hipatlas-project/1": views (mask source, confirmed, calibration),
                      case label, patient pseudonym, result metadata, current (possibly moved)
                      landmarks and measurements, software version, time saved
case/                 the case folder: case.json and the images and mask files it names
masks/view<i>.png     the current (edited) mask of each view, 8-bit 0/255
result/               the registration output folder (when registered)
```

Saving writes a hidden temporary zip beside the destination, flushes it to disk and renames it
over the destination, so a crash while saving leaves the previous project intact. Loading
extracts into the new session's work folder (refusing entries that would escape it).

Crash recovery: :class:`RecoveryStore` autosaves a running session as
``autosave-<pid>.hipatlas`` plus ``autosave-<pid>.json`` (the project path, time, label). A clean
exit deletes them; at start-up, autosaves whose process is no longer running are offered back.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import pathlib
import zipfile
from typing import Any

import numpy as np

from app.session import Session, load_result, mask_png_bytes
from inference import __version__, io
from inference.errors import CaseFormatError, InputFileError, OutputError

log = logging.getLogger(__name__)

PROJECT_FORMAT = "hipatlas-project/1"
PROJECT_SUFFIX = ".hipatlas"
# Already-compressed members are stored as they are: deflating them again costs time for nothing.
_STORED_SUFFIXES = (".png", ".gz", ".zip", ".jpg", ".jpeg", ".keras")


def _plain(value: Any) -> Any:
    """JSON form of the numpy scalars/arrays and paths a result dict may hold."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} cannot be saved in a project")


def _case_files(session: Session) -> list[pathlib.Path]:
    """case.json and every file it names (relative to the case folder)."""
    case = session.case
    files = [pathlib.Path(io.CASE_JSON)]
    for view in case.views:
        for path in (view.image_path, view.mask_path):
            if path is not None:
                files.append(pathlib.Path(path).resolve().relative_to(case.case_dir.resolve()))
    return files


def _write_member(archive: zipfile.ZipFile, name: str, data: bytes | None = None, source: pathlib.Path | None = None) -> None:
    stored = name.lower().endswith(_STORED_SUFFIXES)
    compression = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
    if source is not None:
        archive.write(source, name, compress_type=compression, compresslevel=None if stored else 1)
    else:
        archive.writestr(name, data, compress_type=compression, compresslevel=None if stored else 1)


def project_document(session: Session) -> dict[str, Any]:
    """project.json of a session."""
    result = session.result
    return {
        "format": PROJECT_FORMAT,
        "software_version": __version__,
        "saved": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "case_label": session.case_label,
        "pseudonym": session.pseudonym,
        "views": [{"name": v.name, "mask": f"masks/view{i}.png", "mask_source": v.mask_source,
                   "confirmed": v.confirmed, "calibration": v.calibration}
                  for i, v in enumerate(session.views)],
        "result": None if result is None else {
            "folder": "result",
            "files": {k: pathlib.Path(p).name for k, p in result.files.items()},
            "measurements": result.measurements,
            "landmarks_mm": result.landmarks_mm,
            "warnings": result.warnings,
            "report": result.report,
        },
        "landmarks_mm": session.landmarks_mm,
        "measurements": session.measurements,
        "landmarks_edited": session.landmarks_edited,
        "template_plan": session.template_plan,   # Template step (hipatlas-plan/1 "plan" fields), or null
        "template_basis": session.template_basis,  # app.plan_report.plan_basis of the plan's measurements
    }


def save_project(session: Session, path: str | os.PathLike, *, remember_path: bool = True) -> pathlib.Path:
    """Save the session as one project file, atomically. ``remember_path=False`` for autosaves."""
    if session.case is None:
        raise OutputError("nothing to save: open a case first")
    final = pathlib.Path(path)
    if final.suffix != PROJECT_SUFFIX:
        final = final.with_name(final.name + PROJECT_SUFFIX)
    try:
        with io.atomic_file(final, PROJECT_SUFFIX) as tmp, open(tmp, "wb") as handle:
            with zipfile.ZipFile(handle, "w") as archive:
                _write_member(archive, "project.json",
                              json.dumps(project_document(session), indent=2, default=_plain).encode())
                for relative in _case_files(session):
                    _write_member(archive, f"case/{relative.as_posix()}", source=session.case.case_dir / relative)
                for index, view in enumerate(session.views):
                    _write_member(archive, f"masks/view{index}.png", mask_png_bytes(view.mask))
                if session.result is not None:
                    for file in sorted(pathlib.Path(session.result.out_dir).iterdir()):
                        if file.is_file():
                            _write_member(archive, f"result/{file.name}", source=file)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        raise OutputError(f"{final}: cannot write the project ({exc.strerror or exc})") from exc
    if remember_path:
        session.project_path = final
        session.dirty = False
    log.info("saved project %s", final)
    return final


def _safe_extract(archive: zipfile.ZipFile, destination: pathlib.Path, source: pathlib.Path) -> None:
    root = destination.resolve()
    for member in archive.infolist():
        target = (destination / member.filename).resolve()
        if member.filename.startswith(("/", "\\")) or not target.is_relative_to(root):
            raise InputFileError(f"{source}: the project holds an unsafe path {member.filename!r}; not opened")
    archive.extractall(destination)


def load_project(path: str | os.PathLike, *, work_root: str | os.PathLike | None = None,
                 register_fn=None, propose_fn=None, isolate: bool = True) -> Session:
    """Open a project file into a new :class:`Session` (its work folder holds the extracted files).

    ``work_root``, ``register_fn``, ``propose_fn`` and ``isolate`` are passed to the new :class:`Session`.
    """
    source = pathlib.Path(path)
    if not source.is_file():
        raise InputFileError(f"{source}: project file not found")
    session = Session(work_root=work_root, register_fn=register_fn, propose_fn=propose_fn, isolate=isolate)
    try:
        _restore(session, source)
    except BaseException:
        session.close()
        raise
    return session


def _restore(session: Session, source: pathlib.Path) -> None:
    folder = session.work_dir / "project"
    try:
        with zipfile.ZipFile(source) as archive:
            names = set(archive.namelist())
            if "project.json" not in names:
                raise InputFileError(f"{source}: not a HipAtlas project (project.json is missing)")
            _safe_extract(archive, folder, source)
    except zipfile.BadZipFile:
        raise InputFileError(f"{source}: not a HipAtlas project file (not a zip archive, or truncated)") from None
    except OSError as exc:
        raise InputFileError(f"{source}: cannot read the project ({exc.strerror or exc})") from exc
    try:
        document = json.loads((folder / "project.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputFileError(f"{source}: project.json is not valid JSON ({exc})") from exc
    if not isinstance(document, dict) or document.get("format") != PROJECT_FORMAT:
        raise CaseFormatError(f'{source}: project.json "format" must be "{PROJECT_FORMAT}"')
    views_doc = document.get("views") or []
    session.open_case(folder / "case", calibration_notes=[v.get("calibration") for v in views_doc],
                      label=document.get("case_label") or source.stem)
    if len(views_doc) != len(session.views):
        raise CaseFormatError(f"{source}: project.json lists {len(views_doc)} views, the case has {len(session.views)}")
    for index, (view, entry) in enumerate(zip(session.views, views_doc)):
        mask_file = folder / str(entry.get("mask", f"masks/view{index}.png"))
        if mask_file.is_file():
            view.mask = np.array(io.load_mask(mask_file, expected_shape=view.mask.shape), dtype=bool)
            view.mask_source = str(entry.get("mask_source", "project"))
        view.confirmed = bool(entry.get("confirmed", False)) and bool(view.mask.any())
    session.pseudonym = str(document.get("pseudonym") or session.pseudonym)
    result_doc = document.get("result")
    if result_doc:
        result = load_result(folder / str(result_doc.get("folder", "result")),
                             measurements=result_doc.get("measurements") or {},
                             landmarks_mm=result_doc.get("landmarks_mm") or {},
                             warnings=result_doc.get("warnings") or [], report=result_doc.get("report") or {},
                             files=result_doc.get("files"), view_names=[v.name for v in session.views],
                             frame=session.frame)
        session.set_result(result)
        session.landmarks_mm = {k: [float(x) for x in v] for k, v in (document.get("landmarks_mm") or {}).items()} \
            or session.landmarks_mm
        session.measurements = dict(document.get("measurements") or session.measurements)
        session.landmarks_edited = bool(document.get("landmarks_edited", False))
        session.template_plan = document.get("template_plan") or None
        session.template_basis = document.get("template_basis") or None
    session.project_path = source
    session.dirty = False


# --------------------------------------------------------------------------------------------
# Autosave and crash recovery
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Autosave:
    """An autosave left by a process: its project file and what it was."""

    project_file: pathlib.Path
    meta_file: pathlib.Path
    pid: int
    saved: str
    project_path: str | None
    case_label: str


def _process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OSError:
        return False
    return True


class RecoveryStore:
    """Autosaves of running sessions in ``folder`` (one pair of files per process)."""

    def __init__(self, folder: str | os.PathLike, pid: int | None = None):
        self.folder = pathlib.Path(folder)
        self.pid = os.getpid() if pid is None else int(pid)

    @property
    def project_file(self) -> pathlib.Path:
        return self.folder / f"autosave-{self.pid}{PROJECT_SUFFIX}"

    @property
    def meta_file(self) -> pathlib.Path:
        return self.folder / f"autosave-{self.pid}.json"

    def autosave(self, session: Session) -> pathlib.Path:
        """Save the session as this process's autosave (the session stays dirty)."""
        save_project(session, self.project_file, remember_path=False)
        io.write_json_atomic(self.meta_file, {
            "pid": self.pid,
            "saved": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "project_path": str(session.project_path) if session.project_path else None,
            "case_label": session.case_label,
        })
        return self.project_file

    def clear(self) -> None:
        """Delete this process's autosave (after a save or a clean exit)."""
        for path in (self.project_file, self.meta_file):
            path.unlink(missing_ok=True)

    def orphans(self) -> list[Autosave]:
        """Autosaves of processes that are no longer running (crashed or killed)."""
        found = []
        if not self.folder.is_dir():
            return found
        for meta_file in sorted(self.folder.glob("autosave-*.json")):
            try:
                meta = json.loads(meta_file.read_text(encoding="utf-8"))
                pid = int(meta["pid"])
            except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
                log.warning("ignoring unreadable autosave record %s", meta_file)
                continue
            project_file = meta_file.with_suffix(PROJECT_SUFFIX)
            if pid == self.pid or _process_alive(pid) or not project_file.is_file():
                continue
            found.append(Autosave(project_file, meta_file, pid, str(meta.get("saved", "")),
                                  meta.get("project_path"), str(meta.get("case_label", ""))))
        return found

    @staticmethod
    def discard(autosave: Autosave) -> None:
        for path in (autosave.project_file, autosave.meta_file):
            path.unlink(missing_ok=True)

    def recover(self, autosave: Autosave, **session_options) -> Session:
        """Open an orphaned autosave as an unsaved session (the original project path is kept
        as the session's project path, so Save writes back where the user was working)."""
        session = load_project(autosave.project_file, **session_options)
        session.project_path = pathlib.Path(autosave.project_path) if autosave.project_path else None
        session.dirty = True
        self.discard(autosave)
        return session
