"""``make pacs-demo``: the hospital round trip against a real (local) Orthanc PACS.

1. start Orthanc on free localhost ports (its own folder under OUT/orthanc);
2. load it with the demo case and simulated cases, written as DICOM DX studies with geometry tags;
3. find the demo study by patient ID and retrieve it (C-GET) as a case folder;
4. register it (the shipped model) and make the planning report PDF as the workstation does;
5. write SR + PDF + overlays (Secondary Capture and presentation states) + STL as DICOM in the patient's study and store them (C-STORE);
6. read the SR back from the PACS and print its measurements.

Usage: python tools/pacs_demo.py [--out work/pacs-demo] [--simulated N] [--keep-running]
"""

from __future__ import annotations

import argparse
import io as stdio
import json
import logging
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow start-up chatter is noise here
sys.path.insert(0, str(ROOT))

from inference import dicom_case, dicom_results, pacs  # noqa: E402
from inference.orthanc_local import LocalOrthanc  # noqa: E402
from inference.pipeline import run_to_completion  # noqa: E402

log = logging.getLogger("pacs-demo")


def step(message: str) -> None:
    print(f"[pacs-demo] {message}", flush=True)


def results_with_pdf(case_dir: pathlib.Path, result, folder: pathlib.Path) -> pathlib.Path:
    """The results plus the planning report PDF, made as the workstation's "Send to PACS" makes them."""
    from app.pacs_dialog import results_for_sending
    from app.session import Session, load_result

    session = Session(work_root=folder.parent, isolate=False)
    try:
        session.open_case(case_dir)
        session.set_result(load_result(result.out_dir, measurements=result.measurements,
                                       landmarks_mm=result.landmarks_mm, warnings=result.warnings,
                                       report=result.report, files=result.files,
                                       view_names=[v.name for v in session.views]))
        return results_for_sending(session, folder)
    finally:
        session.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "work" / "pacs-demo"))
    parser.add_argument("--simulated", type=int, default=1, help="simulated cases to load besides the demo")
    parser.add_argument("--keep-running", action="store_true", help="leave Orthanc running at the end")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out = pathlib.Path(args.out).resolve()
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    started = time.perf_counter()
    server = LocalOrthanc(out / "orthanc").start()
    try:
        settings = pacs.PacsSettings(port=server.dicom_port, called_ae=server.ae_title, timeout_s=10.0)
        step(f"Orthanc up: DICOM 127.0.0.1:{server.dicom_port} AE {server.ae_title}, web {server.url}")
        step(f"C-ECHO {pacs.echo(settings) * 1000:.0f} ms")

        studies = [(ROOT / "resources" / "demo", dicom_case.PatientInfo(accession_number="DEMO-1"))]
        for index in range(args.simulated):
            from inference.recipe import run_hipatlas

            case_dir = out / f"simulated_{index + 1}"
            step(f"simulating case {index + 1} (phantom MC22, seed {index + 1})")
            # In its own process: the DRR renderer loads TensorFlow, and this process later renders
            # the report's 3D pictures with VTK, which crashes where TensorFlow is loaded (Mesa
            # llvmpipe; see tests/gui/conftest.py).
            run_hipatlas(["simulate", "--phantom", "MC22:left", "--side", "left", "--seed", str(index + 1),
                          "--out", str(case_dir), "--truth-out", str(out / f"simulated_{index + 1}_truth")],
                         f"simulating case {index + 1}")
            studies.append((case_dir, dicom_case.PatientInfo(patient_id=f"HIPATLAS-SIM-{index + 1}",
                                                             patient_name=f"SIMULATED^CASE{index + 1}",
                                                             accession_number=f"SIM-{index + 1}")))
        for case_dir, patient in studies:
            files = dicom_case.case_to_dicom(case_dir, out / "dicom_in" / patient.patient_id, patient=patient)
            run_to_completion(pacs.send(settings, files))
            step(f"stored {case_dir.name} as patient {patient.patient_id} ({len(files)} DX images)")

        found = pacs.find_studies(settings, patient_id="HIPATLAS-DEMO")
        study_uid = found[0]["StudyInstanceUID"]
        series = pacs.find_series(settings, study_uid)
        step(f"C-FIND: {len(pacs.find_studies(settings))} studies; demo study {study_uid} has "
             f"{', '.join(s['SeriesDescription'] for s in series)}")
        case_dir = run_to_completion(pacs.retrieve_case(settings, study_uid, out / "retrieved_case"))
        sources = json.loads((case_dir / "dicom_source.json").read_text())
        for view in sources["views"]:
            step(f"retrieved view {view['view']}: calibration from {view['calibration']['source']}")

        from inference import pipeline

        step("registering the retrieved case (shipped model, ONNX Runtime: no TensorFlow in this process)")
        result = run_to_completion(pipeline.register_case(case_dir, out / "register", backend="onnx"))
        if "tensorflow" in sys.modules:
            raise RuntimeError("TensorFlow was loaded; the report's off-screen 3D rendering would crash")
        results = results_with_pdf(case_dir, result, out / "results_with_pdf")
        written = dicom_results.export_results(results, out / "dicom_out", source=case_dir)
        stored = run_to_completion(pacs.send(settings, [out / "dicom_out"]))
        step(f"stored {len(stored)} result objects: {', '.join(written)}")
        run_to_completion(pacs.send(settings, [out / "dicom_out"]))
        step(f"sent again: the PACS still holds {len(server.instances())} instances (no duplicates)")

        import highdicom as hd
        import pydicom

        sr_uid = str(pydicom.dcmread(written["sr"]).SOPInstanceUID)
        for orthanc_id in server.instances():
            ds = pydicom.dcmread(stdio.BytesIO(server.instance_file(orthanc_id)))
            if str(ds.SOPInstanceUID) == sr_uid:
                ds.save_as(out / "sr_from_pacs.dcm")
                sr = hd.sr.srread(out / "sr_from_pacs.dcm")
                (head,) = sr.content.get_planar_roi_measurement_groups()
                (femur,) = sr.content.get_image_measurement_groups()
                step(f"SR read back from the PACS: hip centre {[round(float(x), 1) for x in head.roi.value[0]]} mm")
                for m in head.get_measurements() + femur.get_measurements():
                    step(f"  {m.name.meaning}: {m.value:.1f} {m.unit.value}")
        step(f"done in {time.perf_counter() - started:.0f} s; files in {out}")
        if args.keep_running:
            step(f"Orthanc keeps running (web {server.url}); Ctrl-C stops it")
            while True:
                time.sleep(3600)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
