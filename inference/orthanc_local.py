"""A private Orthanc PACS on localhost, for the tests and ``make pacs-demo`` (not for clinical use).

:class:`LocalOrthanc` starts the Debian ``orthanc`` server (``/usr/sbin/Orthanc``) with its own
configuration, storage and index in a folder of its own, on free localhost ports (DICOM and HTTP),
waits until it answers, and stops it again. It loads no plugins and accepts connections from
localhost only. It checks the called AE title, so a wrong AE title is refused as a real PACS would.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from typing import Any

from inference.errors import HipAtlasError

logger = logging.getLogger(__name__)

__all__ = ["LocalOrthanc", "find_orthanc", "free_port"]

#: The server's own AE title.
ORTHANC_AE_TITLE = "ORTHANC"
#: How long to wait for a fresh server to answer.
START_TIMEOUT_S = 30.0


def find_orthanc() -> str | None:
    """Path of the Orthanc executable, or None."""
    return shutil.which("Orthanc") or next(
        (p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc") if os.access(p, os.X_OK)), None)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalOrthanc:
    """An Orthanc server in ``folder`` on free localhost ports.

    Parameters
    ----------
    folder : path
        Holds orthanc.json, the storage, the index and orthanc.log.
    modalities : dict, optional
        AE title -> port of DICOM peers on 127.0.0.1 (C-MOVE destinations).
    tls : (certificate, private key, trusted certificates), optional
        PEM files: the DICOM port then speaks only DICOM over TLS.
    """

    def __init__(self, folder: str | os.PathLike, *, modalities: dict[str, int] | None = None,
                 ae_title: str = ORTHANC_AE_TITLE, tls: tuple[str, str, str] | None = None):
        self.folder = pathlib.Path(folder)
        self.tls = tls  # (certificate, private key, trusted client certificates) PEM files: DICOM over TLS
        self.ae_title = ae_title
        self.modalities = dict(modalities or {})
        self.dicom_port = 0
        self.http_port = 0
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def _config(self) -> dict[str, Any]:
        return {
            "Name": "HipAtlas local Orthanc",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"),
            "StorageCompression": False,
            "Plugins": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "SslEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowGet": True,
            "UnknownSopClassAccepted": True,
            "DicomModalities": {name.lower(): [name, "127.0.0.1", port] for name, port in self.modalities.items()},
            "DicomScpTimeout": 30,
            "StableAge": 1,
            "ConcurrentJobs": 1,
            "HttpThreadsCount": 4,
            "OverwriteInstances": True,
        } | ({} if self.tls is None else {
            "DicomTlsEnabled": True,
            "DicomTlsCertificate": str(self.tls[0]),
            "DicomTlsPrivateKey": str(self.tls[1]),
            "DicomTlsTrustedCertificates": str(self.tls[2]),
            "DicomTlsRemoteCertificateRequired": False,
        })

    def start(self, timeout_s: float = START_TIMEOUT_S) -> "LocalOrthanc":
        """Start the server and wait until its REST API answers."""
        executable = find_orthanc()
        if executable is None:
            raise HipAtlasError("Orthanc is not installed (Debian package 'orthanc'); run `make system-packages`")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.dicom_port, self.http_port = free_port(), free_port()
        while self.http_port == self.dicom_port:
            self.http_port = free_port()
        config = self.folder / "orthanc.json"
        config.write_text(json.dumps(self._config(), indent=2), encoding="utf-8")
        log = open(self.folder / "orthanc.log", "ab")  # noqa: SIM115 - owned by the child process
        self.process = subprocess.Popen([executable, str(config)], stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, cwd=self.folder)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = (self.folder / "orthanc.log").read_text(errors="replace")[-800:]
                raise HipAtlasError(f"Orthanc exited at start (status {self.process.returncode}): {tail}")
            with contextlib.suppress(OSError, urllib.error.URLError):
                with urllib.request.urlopen(f"{self.url}/system", timeout=1.0) as reply:
                    if reply.status == 200:
                        logger.info("Orthanc %s up: DICOM port %d, HTTP %s", self.ae_title, self.dicom_port, self.url)
                        return self
            time.sleep(0.1)
        self.stop()
        raise HipAtlasError(f"Orthanc did not answer within {timeout_s:.0f} s; see {self.folder / 'orthanc.log'}")

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 10 s)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None

    def __enter__(self) -> "LocalOrthanc":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # REST helpers (for tests and the demo: what the PACS holds) ------------------------------
    def rest(self, path: str, method: str = "GET", body: bytes | None = None) -> Any:
        request = urllib.request.Request(f"{self.url}{path}", data=body, method=method)
        with urllib.request.urlopen(request, timeout=30) as reply:
            data = reply.read()
        return json.loads(data) if data[:1] in (b"{", b"[") else data

    def instances(self, patient_id: str | None = None) -> list[str]:
        """Orthanc IDs of the stored instances (of one patient if given)."""
        if patient_id is None:
            return list(self.rest("/instances"))
        query = {"Level": "Instance", "Query": {"PatientID": patient_id}}
        return list(self.rest("/tools/find", "POST", json.dumps(query).encode("utf-8")))

    def instance_file(self, orthanc_id: str) -> bytes:
        """The stored DICOM file of one instance."""
        return self.rest(f"/instances/{orthanc_id}/file")
