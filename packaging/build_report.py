"""The record of one installer build: sizes, times, self-test, and what takes the space.

``packaging/build_linux.sh`` ends with ``build_report.py write``, which writes
``dist/build-report-<flavour>.json``; ``build_report.py publish`` turns that file into the
committed report ``docs/results/package_<flavour>.json`` and ``.md``:

    HIPATLAS_FLAVOUR=runtime GUI_SMOKE=1 packaging/build_linux.sh
    python packaging/build_report.py publish dist/build-report-runtime.json

The report compares the sizes with the full (TensorFlow) installer measured for docs/install.md
(:data:`FULL_REFERENCE`), against issue 20's target: a TensorFlow-free installer of at most 40 %
of it.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import platform
import sys

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
import bundle_manifest as bm  # noqa: E402

MIB = 1024 * 1024
#: The full flavour's .deb (zstd) and installed size as measured for docs/install.md ("Sizes").
FULL_REFERENCE = {"deb_mib": 553, "installed_mib": 2205,
                  "source": "docs/install.md (Sizes): the full flavour as first built, TensorFlow 2.21, zstd"}
#: Issue 20: the TensorFlow-free installer at most this share of the full one.
TARGET_SHARE = 0.40


def largest_parts(bundle: str | os.PathLike, count: int = 15) -> list[dict[str, object]]:
    """The biggest entries of the bundle's ``_internal`` folder (top level, files and folders), in MiB.

    Shared libraries that wheels put at the top (``libQt6*.so``) are grouped by their stem up to
    the first dot or digit run, so that Qt's thirty libraries show as one line.
    """
    internal = pathlib.Path(bundle) / "_internal"
    sizes: dict[str, int] = {}
    for entry in internal.iterdir() if internal.is_dir() else ():
        if entry.is_symlink():
            continue
        size = bm.bundle_size_bytes(entry) if entry.is_dir() else entry.stat().st_size
        key = entry.name if entry.is_dir() else _library_group(entry.name)
        sizes[key] = sizes.get(key, 0) + size
    ordered = sorted(sizes.items(), key=lambda item: -item[1])[:count]
    return [{"part": name, "mib": round(size / MIB, 1)} for name, size in ordered]


def _library_group(name: str) -> str:
    stem = name.split(".so")[0]
    for prefix in ("libQt6", "libvtk", "libicu", "libavcodec", "libav"):
        if stem.startswith(prefix):
            return prefix + "*"
    return name


def _installed_package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


#: Compressors compared by :func:`compression_estimate`: (name, command reading stdin), the first
#: being what the build used (dpkg-deb's default zstd level 3).
COMPRESSORS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("zstd", ("zstd", "-3", "-T2", "-c")),
    ("zstd-19", ("zstd", "-19", "-T2", "-c")),
    ("xz", ("xz", "-6", "-T2", "-c")),
)


def bundle_sample(bundle: str | os.PathLike, slice_fraction: int = 16) -> bytes:
    """A ~1/``slice_fraction`` sample of the bundle's bytes: from every file over 1 MiB a contiguous
    slice of 1/``slice_fraction`` of it (starting a third in), and every ``slice_fraction``-th
    smaller file whole (files in path order)."""
    chunks = []
    files = sorted(os.path.join(d, f) for d, _, names in os.walk(bundle) for f in names
                   if not os.path.islink(os.path.join(d, f)))
    for index, path in enumerate(files):
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            if size > MIB:
                handle.seek(size // 3)
                chunks.append(handle.read(size // slice_fraction))
            elif index % slice_fraction == 0:
                chunks.append(handle.read())
    return b"".join(chunks)


def compression_estimate(bundle: str | os.PathLike, deb_mib: float) -> dict[str, object]:
    """The .deb size with other compressors, estimated from a sample of the bundle: each
    compressor's size on the sample relative to the build's (zstd -3) times the real .deb size.

    An estimate (the sample is 1/16 of the bytes); it exists because compressing the whole bundle
    with xz or zstd -19 takes the better part of an hour on the shared 2-core build machine.
    """
    import subprocess
    import time

    sample = bundle_sample(bundle)
    sizes, seconds = {}, {}
    for name, command in COMPRESSORS:
        started = time.perf_counter()
        sizes[name] = len(subprocess.run(command, input=sample, capture_output=True, check=True).stdout)
        seconds[name] = round(time.perf_counter() - started, 1)
    reference = COMPRESSORS[0][0]
    return {"sample_mib": round(len(sample) / MIB, 1),
            "sample_compressed_mib": {k: round(v / MIB, 2) for k, v in sizes.items()},
            "sample_seconds": seconds,
            "estimated_deb_mib": {k: round(deb_mib * v / sizes[reference], 1) for k, v in sizes.items()}}


def build_record(args: argparse.Namespace) -> dict[str, object]:
    from inference.provenance import git_commit

    flavour = bm.flavour(args.flavour)
    bundle_bytes = bm.bundle_size_bytes(args.bundle)
    deb_bytes = os.path.getsize(args.deb)
    record: dict[str, object] = {
        "flavour": flavour,
        "package": bm.package_name(flavour),
        "version": bm.read_version(ROOT),
        **git_commit(ROOT),
        "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "machine": platform.machine(),
                    "cpu_count": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2)},
        "packages": {name: _installed_package_version(name) for name in
                     ("pyinstaller", "onnxruntime", "tensorflow", "vtk", "PySide6-Essentials", "SimpleITK",
                      "scipy", "numpy")},
        "deb": os.path.basename(args.deb),
        "deb_compression": args.compression,
        "deb_mib": round(deb_bytes / MIB, 1),
        "installed_mib": round(bundle_bytes / MIB, 1),
        "build_s": args.build_s,
        "pyinstaller_s": args.pyinstaller_s,
        "deb_s": args.deb_s,
        "self_test": args.self_test,
        "self_test_s": args.self_test_s,
        "self_test_backend": args.self_test_backend,
        "gui_smoke": "passed" if args.gui_smoke_s is not None else "not run",
        "gui_smoke_s": args.gui_smoke_s,
        "forbidden_in_bundle": bm.forbidden_in_bundle(files=bm.bundle_files(args.bundle), name=flavour),
        "largest_parts": largest_parts(args.bundle),
        "full_reference": FULL_REFERENCE,
        "target_share": TARGET_SHARE,
    }
    record["deb_share_of_full"] = round(record["deb_mib"] / FULL_REFERENCE["deb_mib"], 3)
    record["installed_share_of_full"] = round(record["installed_mib"] / FULL_REFERENCE["installed_mib"], 3)
    return record


def markdown(record: dict) -> str:
    """The committed report's text."""
    ref = record["full_reference"]
    target = f"{record['target_share']:.0%}"
    lines = [
        f"# Installer build: {record['package']} ({record['flavour']} flavour)",
        "",
        f"- command: `HIPATLAS_FLAVOUR={record['flavour']} DEB_COMPRESSION={record['deb_compression']} "
        f"GUI_SMOKE={1 if record['gui_smoke'] == 'passed' else 0} packaging/build_linux.sh`, then "
        f"`python packaging/build_report.py publish dist/build-report-{record['flavour']}.json`",
        f"- commit: `{record['commit']}`{' (with uncommitted changes)' if record.get('dirty') else ''}",
        f"- version {record['version']}, built {record['built_at']}",
        f"- machine: {record['machine']['machine']}, {record['machine']['cpu_count']} CPUs, Python "
        f"{record['machine']['python']}, load average {record['machine']['load_average_1min']} at the end "
        "(shared machine: times are pessimistic)",
        "- packages: " + ", ".join(f"{k} {v}" for k, v in record["packages"].items() if v),
        "",
        "| figure | this build | full flavour | share (target <= " + target + ") |",
        "| --- | --- | --- | --- |",
        f"| `.deb` ({record['deb_compression']}) | {record['deb_mib']} MiB | {ref['deb_mib']} MiB | "
        f"{record['deb_share_of_full']:.1%} |",
        f"| installed (`/opt/hipatlas`) | {record['installed_mib']} MiB | {ref['installed_mib']} MiB | "
        f"{record['installed_share_of_full']:.1%} |",
        "",
        "| step | result |",
        "| --- | --- |",
        f"| whole build | {record['build_s']} s |",
        f"| PyInstaller | {record['pyinstaller_s']} s |",
        f"| .deb | {record['deb_s']} s |",
        f"| self-test of the extracted package (clean HOME, unprivileged user) | {record['self_test']}"
        f"{' with the ' + record['self_test_backend'] + ' backend' if record.get('self_test_backend') else ''} |",
        f"| GUI smoke test (demo, register, quit; Xvfb) | {record['gui_smoke']}"
        f"{' in ' + str(record['gui_smoke_s']) + ' s' if record.get('gui_smoke_s') is not None else ''} |",
        f"| forbidden packages in the bundle | {', '.join(record['forbidden_in_bundle']) or 'none'} |",
        "",
        *_estimate_lines(record),
        f"Full-flavour figures: {ref['source']}.",
        "",
        "Largest parts of `_internal/`:",
        "",
        "| part | MiB |",
        "| --- | --- |",
        *[f"| `{p['part']}` | {p['mib']} |" for p in record["largest_parts"]],
        "",
    ]
    return "\n".join(lines)


def _estimate_lines(record: dict) -> list[str]:
    estimate = record.get("compression_estimate")
    if not estimate:
        return []
    full = record["full_reference"]["deb_mib"]
    lines = [f"Other compressions of the same bundle, **estimated** from a {estimate['sample_mib']} MiB sample "
             "(`python packaging/build_report.py estimate REPORT --bundle BUNDLE`; not a built .deb):", "",
             "| compression | estimated .deb | share of the full flavour | compressing the sample |",
             "| --- | --- | --- | --- |"]
    for name, mib in estimate["estimated_deb_mib"].items():
        lines.append(f"| {name} | {mib} MiB | {mib / full:.1%} | {estimate['sample_seconds'][name]} s |")
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Record (write) or publish an installer build's figures")
    sub = parser.add_subparsers(dest="what", required=True)
    write = sub.add_parser("write", help="write dist/build-report-<flavour>.json (build_linux.sh calls it)")
    write.add_argument("--flavour", choices=bm.FLAVOURS, default=None)
    write.add_argument("--bundle", required=True)
    write.add_argument("--deb", required=True)
    write.add_argument("--compression", default="zstd")
    write.add_argument("--out", required=True)
    for name in ("build-s", "pyinstaller-s", "deb-s", "self-test-s", "gui-smoke-s"):
        write.add_argument(f"--{name}", type=int, default=None)
    write.add_argument("--self-test", default="skipped")
    write.add_argument("--self-test-backend", default=None)
    estimate = sub.add_parser("estimate", help="add a compression estimate (xz, zstd -19) to a build report")
    estimate.add_argument("report", help="dist/build-report-<flavour>.json (rewritten)")
    estimate.add_argument("--bundle", required=True, help="the bundle the report describes")
    publish = sub.add_parser("publish", help="docs/results/package_<flavour>.json and .md from a build report")
    publish.add_argument("report", help="dist/build-report-<flavour>.json")
    publish.add_argument("--out-dir", default=str(ROOT / "docs" / "results"))
    args = parser.parse_args(argv)

    from inference.io import read_json_object, write_json_atomic, write_text_atomic

    if args.what == "write":
        record = build_record(args)
        write_json_atomic(args.out, record)
        print(markdown(record))
        print(args.out)
        return 1 if record["forbidden_in_bundle"] else 0
    record = read_json_object(args.report, "installer build report")
    if args.what == "estimate":
        record["compression_estimate"] = compression_estimate(args.bundle, record["deb_mib"])
        write_json_atomic(args.report, record)
        print("\n".join(_estimate_lines(record)))
        return 0
    out = pathlib.Path(args.out_dir) / f"package_{record['flavour']}"
    write_json_atomic(out.with_suffix(".json"), record)
    write_text_atomic(out.with_suffix(".md"), markdown(record))
    print(out.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
