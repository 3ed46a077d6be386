"""Talking to a PACS over DICOM networking (pynetdicom): C-ECHO, C-FIND, C-GET, C-STORE.

Settings (AE titles, host, port, TLS, timeout) live in the user's settings folder, beside the
workstation's own settings (:func:`settings_path`), as ``pacs.json``; the CLI and the workstation
read the same file. Every network call gives up after ``timeout_s`` and raises
:class:`~inference.errors.PacsError` with one line that says what failed (connection refused, no
answer, association rejected, a failure status).

Retrieval (:func:`retrieve_case`) is a generator of :class:`~inference.pipeline.Progress`: it
receives the images by C-GET into a temporary folder, turns them into a case folder
(:func:`inference.dicom_case.study_to_case`) and moves that into place only when complete; a
cancel, an error or an interrupted connection leaves no case folder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import socket
import ssl
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from inference.errors import Cancelled, ConfigError, HipAtlasError, OutputError, PacsError

logger = logging.getLogger(__name__)

__all__ = [
    "PacsSettings",
    "echo",
    "find_series",
    "find_studies",
    "load_settings",
    "retrieve_case",
    "retrieve_files",
    "save_settings",
    "send",
    "settings_path",
]

SETTINGS_FILE = "pacs.json"
#: Storage SOP classes that a C-GET accepts (radiographs and HipAtlas's own result objects).
RETRIEVE_SOP_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.1.1",    # DX for presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # DX for processing
    "1.2.840.10008.5.1.4.1.1.1",      # CR
    "1.2.840.10008.5.1.4.1.1.12.1",   # XA
    "1.2.840.10008.5.1.4.1.1.12.2",   # RF
    "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
    "1.2.840.10008.5.1.4.1.1.104.1",  # Encapsulated PDF
    "1.2.840.10008.5.1.4.1.1.104.3",  # Encapsulated STL
    "1.2.840.10008.5.1.4.1.1.7",      # Secondary Capture
    "1.2.840.10008.5.1.4.1.1.11.1",   # Grayscale Softcopy Presentation State
)
#: Modalities of the series that hold radiographs (a study may also hold HipAtlas's results).
IMAGE_MODALITIES = ("DX", "CR", "XA", "RF")
_FIND = "1.2.840.10008.5.1.4.1.2.2.1"   # Study Root Query/Retrieve - FIND
_GET = "1.2.840.10008.5.1.4.1.2.2.3"    # Study Root Query/Retrieve - GET
_VERIFICATION = "1.2.840.10008.1.1"


def settings_path() -> pathlib.Path:
    """``pacs.json`` in the user's HipAtlas settings folder.

    ``$HIPATLAS_CONFIG_DIR`` if set, else ``$XDG_CONFIG_HOME/HipAtlas`` (``~/.config/HipAtlas``), the
    folder where the workstation's QSettings file lives on Linux.
    """
    folder = os.environ.get("HIPATLAS_CONFIG_DIR")
    if not folder:
        base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
        folder = os.path.join(base, "HipAtlas")
    return pathlib.Path(folder) / SETTINGS_FILE


@dataclasses.dataclass(frozen=True)
class PacsSettings:
    """Where the PACS is and how to talk to it.

    Parameters
    ----------
    host, port : the PACS's DICOM address.
    called_ae : the PACS's AE title; calling_ae : ours (the PACS must know it for C-MOVE, and may
        check it for everything).
    timeout_s : limit for connecting, for the association and for each network read.
    tls : use DICOM over TLS; ``tls_ca_file`` verifies the PACS's certificate, ``tls_cert_file`` and
        ``tls_key_file`` are our client certificate when the PACS asks for one.
    """

    host: str = "127.0.0.1"
    port: int = 4242
    called_ae: str = "ORTHANC"
    calling_ae: str = "HIPATLAS"
    timeout_s: float = 10.0
    tls: bool = False
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""

    def __post_init__(self) -> None:
        if not str(self.host).strip():
            raise ConfigError("PACS host must not be empty")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 1 <= self.port <= 65535:
            raise ConfigError(f"PACS port must be a whole number in 1..65535, not {self.port!r}")
        for name in ("called_ae", "calling_ae"):
            value = getattr(self, name)
            if not isinstance(value, str) or not 1 <= len(value.strip()) <= 16 or "\\" in value:
                raise ConfigError(f"PACS {name} must be 1 to 16 characters without a backslash, not {value!r}")
        if not isinstance(self.timeout_s, (int, float)) or not 0 < float(self.timeout_s) <= 600:
            raise ConfigError(f"PACS timeout_s must be in (0, 600] seconds, not {self.timeout_s!r}")

    def describe(self) -> str:
        return f"PACS {self.called_ae} at {self.host}:{self.port}{' (TLS)' if self.tls else ''}"


def load_settings(path: str | os.PathLike | None = None, **overrides: Any) -> PacsSettings:
    """Settings from ``path`` (default :func:`settings_path`; missing file = defaults), then
    ``overrides`` that are not None."""
    file = pathlib.Path(path) if path else settings_path()
    values: dict[str, Any] = {}
    if file.is_file():
        try:
            values = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{file}: cannot read the PACS settings ({exc})") from exc
        if not isinstance(values, dict):
            raise ConfigError(f"{file}: the PACS settings must be a JSON object")
        known = {f.name for f in dataclasses.fields(PacsSettings)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{file}: unknown PACS settings {unknown}; known: {sorted(known)}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return PacsSettings(**values)


def save_settings(settings: PacsSettings, path: str | os.PathLike | None = None) -> pathlib.Path:
    """Write the settings (atomically) to ``path`` (default :func:`settings_path`)."""
    from inference.io import write_json_atomic

    file = pathlib.Path(path) if path else settings_path()
    file.parent.mkdir(parents=True, exist_ok=True)
    return write_json_atomic(file, dataclasses.asdict(settings))


# ----------------------------------------------------------------------------- associations
def _tls_args(settings: PacsSettings) -> tuple[ssl.SSLContext, str] | None:
    if not settings.tls:
        return None
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=settings.tls_ca_file or None)
        if settings.tls_cert_file:
            context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"PACS TLS settings: cannot load the certificates ({exc})") from exc
    return context, settings.host


def _probe(settings: PacsSettings) -> None:
    """Open and close a TCP connection, to name the reason when the PACS is not reachable."""
    try:
        with socket.create_connection((settings.host, settings.port), timeout=settings.timeout_s):
            pass
    except ConnectionRefusedError:
        raise PacsError(f"{settings.describe()}: connection refused (nothing listens on that port); "
                        "check the host and port in the PACS settings") from None
    except (socket.timeout, TimeoutError):
        raise PacsError(f"{settings.describe()}: no answer within {settings.timeout_s:g} s; check the host, "
                        "the port and the network (firewall)") from None
    except OSError as exc:
        raise PacsError(f"{settings.describe()}: cannot connect ({exc.strerror or exc})") from None


def _application_entity(settings: PacsSettings, contexts: Sequence[str], scp_roles: Sequence[str] = ()):
    from pynetdicom import AE, build_role

    ae = AE(ae_title=settings.calling_ae)
    for name in ("acse_timeout", "dimse_timeout", "network_timeout", "connection_timeout"):
        setattr(ae, name, float(settings.timeout_s))
    for context in contexts:  # a SOP class UID, or (SOP class UID, [transfer syntaxes])
        if isinstance(context, tuple):
            ae.add_requested_context(context[0], list(context[1]))
        else:
            ae.add_requested_context(context)
    roles = [build_role(uid, scp_role=True) for uid in scp_roles]
    return ae, roles


def _associate(settings: PacsSettings, contexts: Sequence[str], *, scp_roles: Sequence[str] = (),
               handlers: Sequence[Any] = ()):
    _probe(settings)
    ae, roles = _application_entity(settings, contexts, scp_roles)
    assoc = ae.associate(settings.host, settings.port, ae_title=settings.called_ae, ext_neg=roles or None,
                         tls_args=_tls_args(settings), evt_handlers=list(handlers))
    if assoc.is_established:
        return assoc
    if assoc.is_rejected:
        raise PacsError(f"{settings.describe()} rejected the association; check that the called AE title "
                        f"'{settings.called_ae}' is right and that the PACS knows our AE title '{settings.calling_ae}'")
    raise PacsError(f"{settings.describe()}: the association was aborted or not answered (limit {settings.timeout_s:g} s"
                    f"{'; check the TLS settings' if settings.tls else ''})")


def _status_text(status: Any) -> str:
    code = int(getattr(status, "Status", -1)) if status is not None else -1
    comment = str(getattr(status, "ErrorComment", "") or "") if status is not None else ""
    return f"0x{code:04X}{' ' + comment if comment else ''}" if code >= 0 else "no reply (timeout or aborted)"


def echo(settings: PacsSettings) -> float:
    """C-ECHO; returns the round trip in seconds."""
    import time

    started = time.perf_counter()
    assoc = _associate(settings, [_VERIFICATION])
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if status is None or int(getattr(status, "Status", -1)) != 0:
        raise PacsError(f"{settings.describe()}: C-ECHO failed ({_status_text(status)})")
    return time.perf_counter() - started


# ----------------------------------------------------------------------------- C-FIND
STUDY_KEYS = ("StudyInstanceUID", "PatientID", "PatientName", "StudyDate", "AccessionNumber", "StudyDescription",
              "ModalitiesInStudy", "NumberOfStudyRelatedInstances")
SERIES_KEYS = ("SeriesInstanceUID", "SeriesNumber", "Modality", "SeriesDescription", "BodyPartExamined",
               "NumberOfSeriesRelatedInstances")


def _find(settings: PacsSettings, query: Any) -> list[dict[str, str]]:
    assoc = _associate(settings, [_FIND])
    rows: list[dict[str, str]] = []
    try:
        for status, identifier in assoc.send_c_find(query, _FIND):
            code = int(getattr(status, "Status", -1)) if status else -1
            if code in (0xFF00, 0xFF01) and identifier is not None:
                rows.append({k: str(identifier.get(k, "") or "") for k in query.dir() if k != "QueryRetrieveLevel"})
            elif code != 0:
                raise PacsError(f"{settings.describe()}: C-FIND failed ({_status_text(status)})")
    finally:
        if assoc.is_established:
            assoc.release()
    return rows


def find_studies(settings: PacsSettings, *, patient_id: str = "", patient_name: str = "", study_date: str = "",
                 accession_number: str = "") -> list[dict[str, str]]:
    """Studies matching the given keys (DICOM matching: ``*`` wildcards, date ranges ``A-B``)."""
    from pydicom import Dataset

    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    for key in STUDY_KEYS:
        setattr(query, key, "")
    query.PatientID, query.PatientName = patient_id, patient_name
    query.StudyDate, query.AccessionNumber = study_date, accession_number
    return _find(settings, query)


def find_series(settings: PacsSettings, study_uid: str) -> list[dict[str, str]]:
    """Series of one study."""
    from pydicom import Dataset

    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = study_uid
    for key in SERIES_KEYS:
        setattr(query, key, "")
    return sorted(_find(settings, query), key=lambda row: int(row.get("SeriesNumber") or 0))


# ----------------------------------------------------------------------------- C-GET
def retrieve_files(settings: PacsSettings, study_uid: str, folder: str | os.PathLike, *,
                   series_uids: Sequence[str] = (), cancel: Callable[[], bool] | None = None
                   ) -> Iterator[Any]:
    """C-GET a study (or some of its series) into ``folder``; yields Progress, returns the files.

    ``cancel`` is checked after each received image; cancelling aborts the association and raises
    :class:`~inference.errors.Cancelled` (the caller's temporary folder then goes away).
    """
    from pydicom import Dataset
    from pynetdicom import evt

    from inference.pipeline import Progress

    folder = pathlib.Path(folder)
    received: list[pathlib.Path] = []

    def on_store(event: Any) -> int:
        sop_uid = str(event.request.AffectedSOPInstanceUID)
        path = folder / f"{len(received):04d}_{sop_uid}.dcm"
        with open(path, "wb") as out:
            out.write(event.encoded_dataset())
        received.append(path)
        return 0x0000

    def lost() -> PacsError:
        return PacsError(f"{settings.describe()}: the connection was lost during the retrieve "
                         f"({len(received)} image(s) received); nothing was kept")

    requests = [None] if not series_uids else list(series_uids)
    assoc = _associate(settings, [_GET, *RETRIEVE_SOP_CLASSES], scp_roles=RETRIEVE_SOP_CLASSES,
                       handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        for index, series_uid in enumerate(requests):
            query = Dataset()
            query.QueryRetrieveLevel = "STUDY" if series_uid is None else "SERIES"
            query.StudyInstanceUID = study_uid
            if series_uid is not None:
                query.SeriesInstanceUID = series_uid
            for status, _ in _c_get(assoc, query, lost):
                if cancel is not None and cancel():
                    assoc.abort()
                    raise Cancelled("retrieve cancelled; no case was written")
                code = int(getattr(status, "Status", -1)) if status else -1
                if code == 0xFF00:
                    remaining = int(getattr(status, "NumberOfRemainingSuboperations", 0) or 0)
                    done = len(received)
                    yield Progress(min(0.95, (index + done / max(1, done + remaining)) / len(requests)),
                                   f"Received {done} image(s)")
                elif code == -1 or not assoc.is_established:
                    raise lost()
                elif code not in (0x0000,):
                    raise PacsError(f"{settings.describe()}: C-GET failed ({_status_text(status)})")
    finally:
        if assoc.is_established:
            assoc.release()
    if not received:
        raise PacsError(f"{settings.describe()}: the study {study_uid} returned no images")
    return received


def _c_get(assoc, query, lost: Callable[[], PacsError]):
    """``assoc.send_c_get`` of ``query``; an association that is gone (the PACS went away after
    the previous request's last response) raises ``lost()``, not pynetdicom's RuntimeError."""
    if not assoc.is_established:
        raise lost()
    try:
        yield from assoc.send_c_get(query, _GET)
    except RuntimeError as exc:
        if assoc.is_established:
            raise
        raise lost() from exc


def retrieve_case(settings: PacsSettings, study_uid: str, case_dir: str | os.PathLike, *,
                  series_uids: Sequence[str] = (), side: str | None = None, overwrite: bool = False,
                  cancel: Callable[[], bool] | None = None) -> Iterator[Any]:
    """Retrieve a study and make it a case folder; yields Progress, returns the case folder.

    Without ``series_uids`` the study's radiograph series (DX/CR/XA/RF) are retrieved; it must hold
    two radiographs. Nothing is written at ``case_dir`` unless the whole case is complete.
    """
    from inference import dicom_case, io
    from inference.pipeline import Progress

    final = pathlib.Path(case_dir)
    if final.is_dir() and any(final.iterdir()) and not overwrite:
        raise OutputError(f"{final}: the case folder already exists and is not empty; choose a new folder")
    if not series_uids:
        # Only the radiograph series: the study may also hold reports, results and other objects.
        series_uids = [row["SeriesInstanceUID"] for row in find_series(settings, study_uid)
                       if row.get("Modality") in IMAGE_MODALITIES]
        if not series_uids:
            raise PacsError(f"{settings.describe()}: study {study_uid} has no radiograph series "
                            f"({'/'.join(IMAGE_MODALITIES)})")
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{final.name}.incoming-", dir=final.parent) as incoming:
        files = yield from retrieve_files(settings, study_uid, incoming, series_uids=series_uids, cancel=cancel)
        yield Progress(0.97, "Making the case")
        dicom_case.study_to_case(files, final, side=side, series_uids=series_uids, overwrite=overwrite,
                                 provenance={"retrieved_from": {"host": settings.host, "port": settings.port,
                                                                "called_ae": settings.called_ae,
                                                                "calling_ae": settings.calling_ae}})
    io.load_case(final)  # the case opens like any other
    yield Progress(1.0, "Done")
    return final


# ----------------------------------------------------------------------------- C-STORE
def dicom_files(paths: Sequence[str | os.PathLike]) -> list[pathlib.Path]:
    """The DICOM files among ``paths`` (folders are searched, non-DICOM files skipped)."""
    found: list[pathlib.Path] = []
    for name in paths:
        path = pathlib.Path(name)
        if not path.exists():
            raise HipAtlasError(f"{path}: no such file or folder")
        candidates = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for candidate in candidates:
            with open(candidate, "rb") as handle:
                handle.seek(128)
                if handle.read(4) == b"DICM":
                    found.append(candidate)
    return found


def send(settings: PacsSettings, paths: Sequence[str | os.PathLike]) -> Iterator[Any]:
    """C-STORE DICOM files (folders are searched); yields Progress, returns the SOP Instance UIDs.

    Storing an object again under the same SOP Instance UID replaces it in the PACS, so a failed
    send can simply be repeated.
    """
    import pydicom

    from inference.pipeline import Progress

    files = dicom_files(paths)
    if not files:
        raise HipAtlasError(f"no DICOM files in {', '.join(str(p) for p in paths)}")
    datasets = [pydicom.dcmread(str(f)) for f in files]
    classes = sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets})
    assoc = _associate(settings, [(sop_class, [syntax]) for sop_class, syntax in classes])
    stored: list[str] = []
    try:
        for index, (path, ds) in enumerate(zip(files, datasets)):
            status = assoc.send_c_store(ds)
            code = int(getattr(status, "Status", -1)) if status else -1
            if code not in (0x0000, 0xB000, 0xB007, 0xB006):
                raise PacsError(f"{settings.describe()}: storing {path.name} failed ({_status_text(status)}); "
                                f"{len(stored)} of {len(files)} stored; sending again is safe (same UIDs)")
            stored.append(str(ds.SOPInstanceUID))
            yield Progress((index + 1) / len(files), f"Stored {index + 1} of {len(files)}")
    finally:
        if assoc.is_established:
            assoc.release()
    return stored
