"""Accuracy of ``hipatlas register`` on held-out simulated cases (issue 5 targets).

Generates N cases of a validation specimen with :func:`inference.data.simulate.simulate_phantom_case`
(default JIA_MRI, left and right alternating; the phantom's pose varies within +-10 deg and its
shape, tissue and radiograph realism with the seed), registers each with the given model exactly
as ``hipatlas register`` does (:func:`inference.pipeline.register_case`), and reports per case and
mean +- sd:

* ``dice``: femur Dice within the atlas field of view (the truth label map resampled by physical
  coordinates onto the output grid, nearest neighbour);
* ``dice_surface``: the same against the phantom's femur surface sampled on the output grid (the
  truth a CT label at the output's resolution gives; the phantom CT is 1.5 mm), and
  ``truth_label_dice``, the resampled label map against that surface (what a perfect result
  would score on ``dice``);
* ``hip_centre_error_mm``: distance between the measured and the true head centre (phantom truth);
* ``head_radius_error_mm``: measured - true head radius (phantom truth);
* ``<measurement>_error_<unit>`` for every scalar measurement of the descriptor table
  :data:`inference.measure.MEASUREMENTS` but the head radius (``femoral_offset_error_mm``,
  ``neck_shaft_angle_error_deg``, ``vertical_offset_error_mm``, ...): measured - truth, where the
  truth is measured by the same method (:func:`inference.measure.measure_femur`) on the true femur
  label within the same field of view, so that only the registration differs; and
  ``<measurement>_covered``: 1 when the error is within two of the stated standard uncertainties;
* ``time_s``: wall time of the registration (model loaded once, first case included);
* with ``--no-masks``: ``proposed_mask_dice`` (mean over the two views) of the proposed masks
  against the true masks, inside the rows the proposal covers (a proposal spans the atlas field of
  view, the true mask the whole visible shaft), and ``proposed_mask_dice_full`` over the image.

``--vary`` adds cheap variety per case: radiograph size (512-1024 px) and pitch (0.25-0.5 mm),
image format and intensity scale (float TIFF scaled by 10^U(-2, 2)), a random scale and sign of
each P (the same camera), and oblique views (each view turned by U(-30, 30) deg).

Steps (issue 13): ``--variants`` registers every case several times, once per step of the
pipeline, so that each step's effect is measured on the same cases:

* ``network``: the network's output on its own grid (as before issue 13);
* ``fullres``: + outputs from the paper-grid atlas warped by the upsampled field;
* ``refine``: + test-time refinement on the radiographs;
* ``selfcal``: + self-calibration of the second view's pose;
* ``auto``: ``fullres``, refined only where an outline disagrees with its mask (``register --auto-refine``).

The case machinery (plans, simulation, scoring, one registration per step) lives in
:mod:`inference.experiments.simcases`, shared with ``hipatlas experiment angle-sensitivity``.

``--lat-angle-errors 0,2,5,10`` records the lateral view's matrix rotated by that many degrees
about the patient's long axis through the hip (the radiograph is unchanged): the paper's Fig. 3
experiment. ``--assd`` adds ASSD and HD95 (mm) of the femur against both truths.

``--renderer xray`` draws each case's radiographs with a second renderer that shares no code with
the training data's (:mod:`inference.experiments.xray`: polychromatic beam, two materials, scatter,
heel effect, quantum noise): a network that learnt the first renderer's habits shows it there.

Targets (issue 5): mean Dice >= 0.90, hip centre <= 2 mm, head radius <= 1 mm, offset <= 3 mm.

    .venv/bin/python tools/eval_cases.py --model resources/models/<name> --cases 10 --out eval_out
    .venv/bin/python tools/eval_cases.py --untrained --cases 2 --ct-spacing 3 --out /tmp/e  # smoke test

Writes ``OUT/eval_cases.md`` and ``OUT/eval_cases.json`` (and keeps the cases with ``--keep``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import pathlib
import shutil
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from inference.errors import HipAtlasError  # noqa: E402
from inference.experiments.simcases import (COMPARED, RENDERERS, VARIANTS, case_plan, covered_name,  # noqa: E402
                                            dice, error_name, lateral_perturbed_copy, register_variant, simulate_case)
from inference.io import write_text_atomic  # noqa: E402

log = logging.getLogger("eval_cases")

ERROR_METRICS = ("head_radius_error_mm", *(error_name(m) for m in COMPARED))
ASSD_METRICS = ("assd_mm", "hd95_mm", "assd_surface_mm", "hd95_surface_mm")
METRICS = ("dice", "dice_surface", "truth_label_dice", *ASSD_METRICS, "volume_ratio", "shaft_volume_ratio",
           "shaft_dice", "hip_centre_error_mm", *ERROR_METRICS,
           *(covered_name(m) for m in COMPARED),
           "time_s")
PROPOSAL_METRICS = ("proposed_mask_dice", "proposed_mask_dice_full")
TARGETS = {"dice": ">= 0.90 (mean)", "hip_centre_error_mm": "<= 2 mm", "head_radius_error_mm": "<= 1 mm (|error|)",
           "femoral_offset_error_mm": "<= 3 mm (|error|) or covered by the stated uncertainty"}


@contextlib.contextmanager
def work_folder(out: pathlib.Path, keep: bool, prefix: str) -> Iterator[pathlib.Path]:
    """``OUT/work`` when the work is kept, else a temporary folder removed at the end."""
    work = out / "work" if keep else pathlib.Path(tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    try:
        yield work
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def _without_masks(case_dir: pathlib.Path, dest: pathlib.Path) -> pathlib.Path:
    shutil.copytree(case_dir, dest)
    raw = json.loads((dest / "case.json").read_text())
    for view in raw["views"]:
        mask = view.pop("mask", None)
        if mask:
            (dest / mask).unlink()
    (dest / "case.json").write_text(json.dumps(raw, indent=2))
    return dest


def _proposal_dice(out_dir: pathlib.Path, case_dir: pathlib.Path) -> tuple[float, float]:
    from inference import io

    report = json.loads((out_dir / "report.json").read_text())
    case = io.load_case(case_dir)
    inside, full = [], []
    for entry, view in zip(report["views"], case.views):
        proposed = io.load_mask(out_dir / entry["mask"], expected_shape=view.image.shape)
        truth = np.asarray(view.mask, bool)
        full.append(dice(proposed, truth))
        # the same rows as the proposal (along the image's vertical; the shaft runs off the bottom)
        rows = np.nonzero(proposed.any(axis=1))[0]
        window = np.zeros_like(truth)
        window[rows.min(): rows.max() + 1] = True
        inside.append(dice(proposed, truth & window))
    return float(np.mean(inside)), float(np.mean(full))


def evaluation_model(model: str | None, subject: str, allow_trained: bool = False) -> pathlib.Path:
    """The model to evaluate on phantoms of ``subject``: ``model`` (a folder, ``.keras`` or
    ``.onnx``), else the shipped model that never learnt from the subject's specimen. A model whose
    card says it learnt from that specimen is refused (SystemExit) unless ``allow_trained``: its
    figures would not be held-out ones."""
    from inference.data.bones import specimen_of
    from inference.registration import model_file_in
    from inference.errors import ModelError
    from inference.resources import held_out_model_file, require_held_out

    specimen = specimen_of(subject)
    if model is None:
        return held_out_model_file(specimen)
    path = pathlib.Path(model)
    keras_file = model_file_in(path.parent if path.suffix == ".onnx" else path)
    if not allow_trained:
        try:
            require_held_out(keras_file, specimen)
        except ModelError as err:
            raise SystemExit(f"{err}, another --subject, or pass --allow-trained-specimen") from None
    return path


def _load_model(args):
    from inference import registration

    if args.untrained:
        import keras

        from inference import model as model_lib
        from inference.data import atlas as atlas_lib

        keras.utils.set_random_seed(0)
        net = model_lib.build_model(model_lib.preset(args.untrained), atlas_lib.load_atlas(args.untrained))
        return net, f"untrained {args.untrained}"
    if args.model and len(args.model) > 1:
        from inference import backends

        members = [backends.TensorFlowBackend(registration.load_registration_model(
            evaluation_model(m, args.subject, args.allow_trained_specimen))) for m in args.model]
        return backends.EnsembleBackend(members), " + ".join(args.model)
    model = evaluation_model(args.model[0] if args.model else None, args.subject, args.allow_trained_specimen)
    net = registration.load_registration_model(model)
    return net, str(args.model[0] if args.model else f"shipped model {model.parent.name}")


def _provenance(net) -> dict[str, Any]:
    """Commit of the code and sha256 of the model, for the report."""
    from inference import registration
    from inference.provenance import git_commit

    checkout = git_commit()
    commit = (checkout["commit"] or "unknown") + ("+uncommitted changes" if checkout.get("dirty") else "")
    identity = net.identity() if hasattr(net, "identity") else registration.model_identity(net)
    members = identity.get("members") or [identity]
    return {"commit": commit, "model": identity.get("name"),
            "model_sha256": ", ".join(str(m.get("sha256")) for m in members)}


def _summary_table(rows: list[dict[str, Any]], metrics: tuple[str, ...], group_keys: tuple[str, ...]) -> str:
    """One line per group (e.g. angle error x variant): mean +- sd of each metric."""
    from inference import evaluate

    groups: dict[tuple, list] = {}
    for row in rows:
        if "error" not in row:
            groups.setdefault(tuple(row[k] for k in group_keys), []).append(row)
    lines = ["| " + " | ".join(group_keys + metrics) + " |", "|" + "---|" * (len(group_keys) + len(metrics))]
    summary = {}
    for key, members in groups.items():
        stats = evaluate.summarise(members, metrics)
        summary[" / ".join(str(k) for k in key)] = stats
        cells = [f"{stats[m]['mean']:.3f} +- {stats[m]['sd']:.3f}" if stats[m]["n"] > 1 else
                 f"{stats[m]['mean']:.3f}" for m in metrics]
        lines.append("| " + " | ".join([str(k) for k in key] + cells) + " |")
    return "\n".join(lines) + "\n", summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append",
                        help="model folder or .keras (default: the shipped model that never learnt from "
                        "--subject's specimen); more than once: the models' fields averaged, as when "
                        "resources/models/DEFAULT names several")
    parser.add_argument("--allow-trained-specimen", action="store_true",
                        help="accept a --model that learnt from --subject's specimen (figures not held out)")
    parser.add_argument("--untrained", nargs="?", const="compact", choices=["compact", "paper"],
                        help="an untrained model of this grid instead (smoke test)")
    parser.add_argument("--out", required=True, help="folder for eval_cases.md / .json")
    parser.add_argument("--name", default="eval_cases", help="report file name (without .md / .json)")
    parser.add_argument("--cases", type=int, default=10, help="number of cases (default 10)")
    parser.add_argument("--start", type=int, default=0, help="index of the first case (to re-run one case)")
    parser.add_argument("--subject", default="JIA_MRI",
                        help="shared bone subject (default JIA_MRI, the validation specimen)")
    parser.add_argument("--sides", default="right,left", help="sides, cycled over the cases")
    parser.add_argument("--femur", choices=("own", "other"), default="own",
                        help="which of the subject's femurs a case shows: that of the case's side (default) or "
                             "the other one, mirrored (to tell a bone's shape from its side)")
    parser.add_argument("--seed", type=int, default=2024, help="base seed (case i uses seed*1000+i)")
    parser.add_argument("--vary", action="store_true", help="vary sizes, pitch, format, intensity, P scale, angles")
    parser.add_argument("--no-masks", action="store_true", help="register without masks (proposals) and score them")
    parser.add_argument("--ct-spacing", type=float, default=1.5, help="phantom CT voxel size, mm (3 = quick)")
    parser.add_argument("--renderer", choices=RENDERERS, default="drr",
                        help="drr: the training data's renderer (default); xray: an independent, polychromatic "
                             "one with scatter and quantum noise (inference.experiments.xray)")
    parser.add_argument("--variants", default="fullres",
                        help=f"comma-separated steps to compare, of {', '.join(VARIANTS)} (default fullres: "
                             "what register does without refinement)")
    parser.add_argument("--lat-angle-errors", default="0",
                        help="comma-separated errors (deg) of the lateral view's recorded angle, e.g. 0,2,5,10")
    parser.add_argument("--assd", action="store_true", help="also ASSD and HD95 of the femur (mm)")
    parser.add_argument("--view-separation-deg", type=float, default=None, metavar="DEG",
                        help="angle between the two views (90 = orthogonal; e.g. 40 or 140 for pairs far from "
                             "orthogonal); the AP stays at 0 deg")
    parser.add_argument("--shaft-mm", type=float, default=None, metavar="MM",
                        help="cut the radiographs so only MM of shaft below the true lesser trochanter shows "
                             "(short-shaft views)")
    parser.add_argument("--keep", action="store_true", help="keep the cases and outputs under OUT/work")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    if args.cases < 1:
        parser.error(f"--cases must be >= 1, not {args.cases}")
    if args.view_separation_deg is not None and not 10.0 <= args.view_separation_deg <= 170.0:
        parser.error(f"--view-separation-deg must be between 10 and 170, not {args.view_separation_deg:g}")
    if args.view_separation_deg is not None and args.vary:
        parser.error("--view-separation-deg fixes the view angles; it cannot be combined with --vary")
    if args.shaft_mm is not None and not args.shaft_mm > 0:
        parser.error(f"--shaft-mm must be > 0, not {args.shaft_mm:g}")
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if not sides or any(s not in ("right", "left") for s in sides):
        parser.error(f"--sides must list right and/or left, not {args.sides!r}")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants or any(v not in VARIANTS for v in variants):
        parser.error(f"--variants must list some of {', '.join(VARIANTS)}, not {args.variants!r}")
    try:
        angle_errors = [float(a) for a in args.lat_angle_errors.split(",") if a.strip()]
    except ValueError:
        parser.error(f"--lat-angle-errors must be numbers, not {args.lat_angle_errors!r}")

    from inference import evaluate, io

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with work_folder(out, args.keep, "eval_cases_") as work:
        net, model_name = _load_model(args)
        provenance = _provenance(net)  # the code that runs, not what HEAD is when it ends
        for index in range(args.start, args.start + args.cases):
            plan = case_plan(index, args.seed, args.vary, sides, args.view_separation_deg)
            bone_side = plan["side"] if args.femur == "own" else {"right": "left", "left": "right"}[plan["side"]]
            subject = f"{args.subject}:{bone_side}"
            base: dict[str, Any] = {"subject": subject, "sample_index": index, **{k: plan[k] for k in (
                "seed", "side", "detector", "angles_offset_deg", "image_format", "intensity_scale")}}
            try:
                case_dir, truth_dir = simulate_case(plan, subject, work, args.ct_spacing, args.shaft_mm,
                                                    renderer=args.renderer)
            except HipAtlasError as error:
                log.error("case %d: %s", index, error)
                rows.append({**base, "error": str(error)})
                continue
            for angle_error in angle_errors:
                run_dir = lateral_perturbed_copy(case_dir, work, index, angle_error)
                if args.no_masks:
                    run_dir = _without_masks(run_dir, work / f"nomask_{index:03d}_lat{angle_error:g}")
                for variant in variants:
                    row = {**base, "variant": variant, "lat_angle_error_deg": angle_error}
                    result_dir = work / f"out_{index:03d}_lat{angle_error:g}_{variant}"
                    try:
                        row.update(register_variant(net, run_dir, result_dir, variant, truth_dir=truth_dir,
                                                    side=plan["side"], assd=args.assd))
                        if args.no_masks:
                            row["proposed_mask_dice"], row["proposed_mask_dice_full"] = _proposal_dice(
                                result_dir, case_dir)
                    except HipAtlasError as error:
                        log.error("case %d (%s, LAT error %g deg): %s", index, variant, angle_error, error)
                        row["error"] = str(error)
                    rows.append(row)
                    log.info("case %d (%d of %d) %s, LAT error %g deg, %s: %s", index, index - args.start + 1,
                             args.cases, subject, angle_error, variant,
                             ", ".join(f"{m} {row[m]:.3g}" for m in METRICS + PROPOSAL_METRICS
                                       if isinstance(row.get(m), float)))

    metrics = tuple(m for m in METRICS if args.assd or m not in ASSD_METRICS) \
        + (PROPOSAL_METRICS if args.no_masks else ())
    # absolute errors for the summary of signed metrics: the targets are on magnitudes
    for row in rows:
        for key in ERROR_METRICS:
            if isinstance(row.get(key), float):
                row[f"abs_{key}"] = abs(row[key])
    summary_metrics = metrics + tuple(f"abs_{key}" for key in ERROR_METRICS)
    title = f"hipatlas register on {args.cases} simulated {args.subject} cases ({model_name})"
    table, summary = _summary_table(rows, summary_metrics, ("lat_angle_error_deg", "variant"))
    command = "tools/eval_cases.py " + " ".join(argv if argv is not None else sys.argv[1:])
    markdown = (f"# {title}\n\n- command: `{command}`\n- commit: {provenance['commit']}\n"
                f"- model: {provenance['model']} (sha256 {provenance['model_sha256']})\n"
                f"- seed {args.seed}, vary {args.vary}, sides {','.join(sides)}, CT spacing {args.ct_spacing} mm, "
                f"renderer {args.renderer}, femur {args.femur}"
                + (f", views {args.view_separation_deg:g} deg apart" if args.view_separation_deg is not None else "")
                + (f", {args.shaft_mm:g} mm of shaft below the lesser trochanter" if args.shaft_mm is not None else "")
                + "\n\n"
                "## Summary: mean +- sd per LAT angle error and step\n\n" + table)
    per_case = [f"| {r['sample_index']} | {r['side']} | {r.get('lat_angle_error_deg')} | {r.get('variant')} | "
                + " | ".join(evaluate._fmt(r.get(m, math.nan)) for m in summary_metrics)
                + f" | {r.get('refinement_used', '')} |" for r in rows if "error" not in r]
    markdown += ("\n## Per case\n\n| case | side | LAT error deg | step | " + " | ".join(summary_metrics)
                 + " | refinement used |\n|" + "---|" * (len(summary_metrics) + 5) + "\n" + "\n".join(per_case) + "\n")
    markdown += "\n## Targets (issue 5)\n\n" + "\n".join(f"- {k}: {v}" for k, v in TARGETS.items()) + "\n"
    failures = [r for r in rows if "error" in r]
    if failures:
        markdown += "\n## Failed cases\n\n" + "\n".join(f"- case {r['sample_index']} ({r.get('variant')}): "
                                                         f"{r['error']}" for r in failures) + "\n"
    io.write_json_atomic(out / f"{args.name}.json", evaluate._json_safe({
        "command": command, **provenance, "model_path": model_name, "subject": args.subject, "cases": args.cases,
        "seed": args.seed, "vary": args.vary, "no_masks": args.no_masks, "ct_spacing_mm": args.ct_spacing,
        "view_separation_deg": args.view_separation_deg, "shaft_mm": args.shaft_mm,
        "variants": variants, "lat_angle_errors_deg": angle_errors, "rows": rows, "summary": summary}))
    write_text_atomic(out / f"{args.name}.md", markdown)
    print(markdown)
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
