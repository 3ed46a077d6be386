"""``hipatlas pacs ...``, ``hipatlas dicom-export`` and ``hipatlas case-to-dicom`` (see docs/hospital-it.md)."""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys

log = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    pacs = subparsers.add_parser(
        "pacs", help="query, retrieve from and store to a PACS (DICOM C-FIND/C-GET/C-STORE)",
        description="Talk to a PACS. Settings (host, port, AE titles, TLS, timeout) come from the settings "
        "file (`hipatlas pacs configure` writes it); options given here override it for one call.")
    pacs.add_argument("--settings", help="PACS settings file (default: ~/.config/HipAtlas/pacs.json)")
    pacs.add_argument("--host")
    pacs.add_argument("--port", type=int)
    pacs.add_argument("--aet", dest="called_ae", help="the PACS's AE title")
    pacs.add_argument("--calling-aet", dest="calling_ae", help="our AE title")
    pacs.add_argument("--timeout", dest="timeout_s", type=float, help="network timeout in seconds")
    actions = pacs.add_subparsers(dest="pacs_command", metavar="ACTION", required=True)

    configure = actions.add_parser("configure", help="save the given options to the settings file")
    configure.add_argument("--tls", choices=("on", "off"))
    configure.add_argument("--tls-ca-file")
    configure.add_argument("--tls-cert-file")
    configure.add_argument("--tls-key-file")
    configure.set_defaults(handler=_configure)

    actions.add_parser("echo", help="C-ECHO: check that the PACS answers").set_defaults(handler=_echo)

    find = actions.add_parser("find", help="C-FIND studies (or the series of one study)")
    find.add_argument("--patient-id", default="")
    find.add_argument("--patient-name", default="", help="DICOM name, wildcards allowed (DOE^J*)")
    find.add_argument("--date", default="", help="study date YYYYMMDD or range YYYYMMDD-YYYYMMDD")
    find.add_argument("--accession", default="")
    find.add_argument("--study", help="list the series of this Study Instance UID instead")
    find.add_argument("--json", action="store_true", help="print JSON")
    find.set_defaults(handler=_find)

    get = actions.add_parser("get", help="C-GET a study and make it a case folder")
    get.add_argument("study_uid")
    get.add_argument("--out", required=True, help="case folder to create")
    get.add_argument("--series", nargs=2, metavar="SERIES_UID", help="the two series (views) to use")
    get.add_argument("--side", choices=("right", "left"), help="default: from ImageLaterality")
    get.add_argument("--overwrite", action="store_true")
    get.set_defaults(handler=_get)

    send = actions.add_parser("send", help="C-STORE DICOM files or folders (e.g. a --dicom-out folder)")
    send.add_argument("paths", nargs="+")
    send.set_defaults(handler=_send)

    export = subparsers.add_parser(
        "dicom-export", help="write a registration's results as DICOM (SR, PDF, overlays, STL)",
        description="Write the results of `hipatlas register` as DICOM objects in the source study: a TID 1500 "
        "measurement SR, the planning report PDF (if any), overlays as Secondary Capture and the femur "
        "surface as Encapsulated STL.")
    export.add_argument("results_dir", help="output folder of hipatlas register")
    export.add_argument("--out", required=True, help="folder for the DICOM files (must not exist or be empty)")
    export.add_argument("--source", help="case folder with the DICOM radiographs (default: from report.json)")
    export.add_argument("--pdf", help="planning report PDF to encapsulate")
    export.add_argument("--anonymise", action="store_true",
                        help="de-identify (PS3.15 Basic Profile, see docs/hospital-it.md)")
    export.add_argument("--overwrite", action="store_true")
    export.set_defaults(handler=_export)

    to_dicom = subparsers.add_parser(
        "case-to-dicom", help="write a case folder as a DICOM DX study with its geometry tags",
        description="Write a case's two radiographs as a DICOM DX study (one series per view) whose geometry "
        "tags reproduce the case's projection matrices, e.g. to load a PACS.")
    to_dicom.add_argument("case_dir")
    to_dicom.add_argument("--out", required=True)
    to_dicom.add_argument("--patient-id", default="HIPATLAS-DEMO")
    to_dicom.add_argument("--patient-name", default="HIPATLAS^DEMO")
    to_dicom.add_argument("--accession", default="")
    to_dicom.add_argument("--study-date", default="20260101")
    to_dicom.add_argument("--sdd-mm", type=float, help="physical source-to-detector distance")
    to_dicom.add_argument("--overwrite", action="store_true")
    to_dicom.set_defaults(handler=_case_to_dicom)


def _settings(args: argparse.Namespace):
    from inference import pacs

    return pacs.load_settings(args.settings, host=args.host, port=args.port, called_ae=args.called_ae,
                              calling_ae=args.calling_ae, timeout_s=args.timeout_s)


def _configure(args: argparse.Namespace) -> int:
    import dataclasses

    from inference import pacs

    settings = _settings(args)
    changes = {k: v for k, v in {"tls": None if args.tls is None else args.tls == "on",
                                 "tls_ca_file": args.tls_ca_file, "tls_cert_file": args.tls_cert_file,
                                 "tls_key_file": args.tls_key_file}.items() if v is not None}
    settings = dataclasses.replace(settings, **changes)
    path = pacs.save_settings(settings, args.settings)
    print(f"PACS settings saved to {path}: {settings.describe()}, our AE title {settings.calling_ae}")
    return 0


def _echo(args: argparse.Namespace) -> int:
    from inference import pacs

    settings = _settings(args)
    seconds = pacs.echo(settings)
    print(f"{settings.describe()} answered C-ECHO in {seconds * 1000:.0f} ms")
    return 0


def _find(args: argparse.Namespace) -> int:
    from inference import pacs

    settings = _settings(args)
    if args.study:
        rows = pacs.find_series(settings, args.study)
        columns = ("SeriesNumber", "Modality", "SeriesDescription", "NumberOfSeriesRelatedInstances", "SeriesInstanceUID")
    else:
        rows = pacs.find_studies(settings, patient_id=args.patient_id, patient_name=args.patient_name,
                                 study_date=args.date, accession_number=args.accession)
        columns = ("PatientID", "PatientName", "StudyDate", "AccessionNumber", "ModalitiesInStudy",
                   "StudyDescription", "StudyInstanceUID")
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print("\t".join(columns))
        for row in rows:
            print("\t".join(row.get(c, "") for c in columns))
    if not rows:
        print("no matches", file=sys.stderr)
    return 0


def _progress(quiet: bool = False):
    from inference.cli_commands import _progress_printer

    return _progress_printer(quiet)


def _get(args: argparse.Namespace) -> int:
    from inference import pacs
    from inference.pipeline import run_to_completion

    settings = _settings(args)
    case = run_to_completion(pacs.retrieve_case(settings, args.study_uid, args.out, series_uids=args.series or (),
                                                side=args.side, overwrite=args.overwrite), _progress())
    sources = json.loads((pathlib.Path(case) / "dicom_source.json").read_text())
    for view in sources["views"]:
        print(f"{view['view']}: {view['image']}, calibration from {view['calibration']['source']}")
    print(f"case written to {pathlib.Path(case).resolve()}", file=sys.stderr)
    return 0


def _send(args: argparse.Namespace) -> int:
    from inference import pacs
    from inference.pipeline import run_to_completion

    settings = _settings(args)
    stored = run_to_completion(pacs.send(settings, args.paths), _progress())
    print(f"stored {len(stored)} object(s) in {settings.describe()}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from inference import dicom_results

    written = dicom_results.export_results(args.results_dir, args.out, source=args.source, pdf=args.pdf,
                                           overwrite=args.overwrite, anonymise=args.anonymise)
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0


def _case_to_dicom(args: argparse.Namespace) -> int:
    from inference import dicom_case

    patient = dicom_case.PatientInfo(patient_id=args.patient_id, patient_name=args.patient_name,
                                     accession_number=args.accession, study_date=args.study_date)
    for path in dicom_case.case_to_dicom(args.case_dir, args.out, patient=patient, sdd_mm=args.sdd_mm,
                                         overwrite=args.overwrite):
        print(path)
    return 0
