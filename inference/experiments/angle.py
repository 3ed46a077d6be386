"""Fig. 3 of the paper: how a wrongly recorded C-arm angle costs accuracy, and what self-calibration recovers.

Network curves: orthogonal pairs (AP 0 deg, LAT 90 deg LAO) of held-out phantoms; the network is
told the nominal angles while the radiographs were taken with the AP view, the LAT view or both
rotated by 0, 1, 2, 3, 5, 7 or 10 deg about the patient's long axis through the isocentre. Each
phantom keeps its isocentre and radiograph realism across errors, so the curves are paired. The
paper loses 0.04 Dice at 5 deg (LAT).

Registration curves (the issue's "with and without self-calibration"): simulated case folders of
the same held-out specimen (:mod:`inference.experiments.simcases`, as ``tools/eval_cases.py`` makes
them) registered as ``hipatlas register`` does at full resolution, with the LAT view's matrix
recorded rotated by the same errors (the radiographs unchanged), once without refinement
(``fullres``) and once with refinement and self-calibration (``selfcal``), both on the same
perturbed case folder (paired).
"""

from __future__ import annotations

import logging
import math
import os
import pathlib
import shutil
from typing import Any

import numpy as np

from inference import backends
from inference.errors import Cancelled, HipAtlasError
from inference.experiments import simcases
from inference.experiments.common import (HELD_OUT_FEMURS, ExperimentContext, fmt, held_out_phantoms, pyplot,
                                          register_metrics, render_pair, save_figure, summary, write_results)

log = logging.getLogger(__name__)

ERRORS_DEG = (0.0, 1.0, 2.0, 3.0, 5.0, 7.0, 10.0)
AFFECTED = {"AP": (1.0, 0.0), "LAT": (0.0, 1.0), "both": (1.0, 1.0)}
PHANTOMS = {"quick": 6, "full": 20}
PAPER = {"LAT 5 deg Dice drop": 0.04}

#: Simulated held-out cases registered through the pipeline, per scale.
SELFCAL_CASES = {"quick": 4, "full": 20}
#: The pipeline steps compared (:data:`inference.experiments.simcases.VARIANTS`): without, with self-calibration.
SELFCAL_VARIANTS = ("fullres", "selfcal")
SELFCAL_LABELS = {"fullres": "register, LAT off", "selfcal": "register + self-calibration, LAT off"}
#: Phantom CT voxel size of the simulated cases (tools/eval_cases.py's default, as its reports were measured).
SELFCAL_CT_SPACING_MM = 1.5
SELFCAL_SIDES = ["right", "left"]


def run(ctx: ExperimentContext) -> dict[str, Any]:
    count = PHANTOMS[ctx.scale]
    units = _network_units(count)
    total = len(units) + len(_selfcal_units(ctx))
    rows = []
    done = 0
    for phantom in held_out_phantoms(ctx, count):
        for which, weights in AFFECTED.items():
            for error in ERRORS_DEG:
                if error == 0 and which != "AP":
                    continue
                key = f"{phantom.key}_{which}_{error:g}"
                ctx.report(done, total, f"{key}")
                result = ctx.unit(key, lambda: register_metrics(ctx, render_pair(
                    ctx, phantom, (0.0, 90.0), angle_error_deg=(weights[0] * error, weights[1] * error))))
                done += 1
                targets = AFFECTED if error == 0 else (which,)
                rows += [{"phantom": phantom.key, "femur": phantom.femur, "view": t, "error_deg": error, **result}
                         for t in targets]
    selfcal_rows = _run_selfcal(ctx, done, total)
    table = {which: {f"{e:g}": {m: summary([r[m] for r in rows if r["view"] == which and r["error_deg"] == e])
                                for m in ("dice", "assd_mm")} for e in ERRORS_DEG} for which in AFFECTED}
    base = {r["phantom"]: r["dice"] for r in rows if r["error_deg"] == 0 and r["view"] == "AP"}
    drop = {which: {f"{e:g}": summary([base[r["phantom"]] - r["dice"] for r in rows
                                       if r["view"] == which and r["error_deg"] == e
                                       and r["dice"] is not None and base.get(r["phantom"]) is not None])
                    for e in ERRORS_DEG} for which in AFFECTED}
    selfcal_table, selfcal_drop = _selfcal_tables(selfcal_rows)
    _plot(ctx, table, selfcal_table)
    cases = SELFCAL_CASES[ctx.scale]
    lines = [f"{count} held-out phantoms (JIA_MRI left and right, never in training), orthogonal views; "
             "the network is told AP 0 deg / LAT 90 deg while the named view was taken rotated by the error. "
             "Paired: each phantom keeps its isocentre and radiograph realism across errors.", "",
             "| view off | error (deg) | Dice | ASSD (mm) | Dice drop vs 0 deg |", "|---|---|---|---|---|"]
    for which in AFFECTED:
        for e in ERRORS_DEG:
            lines.append(f"| {which} | {e:g} | {fmt(table[which][f'{e:g}']['dice'])} | "
                         f"{fmt(table[which][f'{e:g}']['assd_mm'], 2)} | {fmt(drop[which][f'{e:g}'])} |")
    lat5 = drop["LAT"]["5"]["mean"]
    lines += ["", f"LAT 5 deg off costs {lat5:.3f} Dice on average (paper: 0.04; our target: <= 0.02)."
              if lat5 is not None else "LAT 5 deg off: no result."]
    lines += ["", "## Through `hipatlas register`, LAT view off, without and with self-calibration", "",
              f"{cases} simulated held-out cases ({_specimen()} right and left alternating, seed {ctx.seed}, "
              f"phantom CT {SELFCAL_CT_SPACING_MM:g} mm) registered at full resolution; the LAT view's matrix is "
              "recorded rotated by the error about the patient's long axis (the radiographs are as taken). "
              "Without: no refinement; "
              "with: refinement and self-calibration of the LAT pose. Both run on the same perturbed case (paired); "
              "the drop is against the same step at 0 deg, paired per case. The last column is the LAT rotation "
              "about the long axis that self-calibration undid (it should equal the error).", "",
              "| LAT error (deg) | Dice without | Dice with self-calibration | ASSD without (mm) | ASSD with (mm) "
              "| drop without | drop with | LAT angle found by self-calibration (deg) |",
              "|---|---|---|---|---|---|---|---|"]
    without, with_ = (selfcal_table[v] for v in SELFCAL_VARIANTS)
    for e in ERRORS_DEG:
        k = f"{e:g}"
        lines.append(f"| {k} | {fmt(without[k]['dice'])} | {fmt(with_[k]['dice'])} | {fmt(without[k]['assd_mm'], 2)} "
                     f"| {fmt(with_[k]['assd_mm'], 2)} | {fmt(selfcal_drop['fullres'][k])} "
                     f"| {fmt(selfcal_drop['selfcal'][k])} | {fmt(with_[k]['selfcal_lat_deg'], 2)} |")
    failed = [r for r in selfcal_rows if r.get("error")]
    lat5_without, lat5_with = (selfcal_drop[v].get("5", {}).get("mean") for v in SELFCAL_VARIANTS)
    if lat5_without is not None and lat5_with is not None:
        lines += ["", f"On {cases} case{'s' if cases != 1 else ''}, LAT 5 deg off costs {lat5_without:.3f} Dice "
                  f"through `hipatlas register` without self-calibration and {lat5_with:.3f} with it."]
    if failed:
        lines += ["", f"{len(failed)} registrations failed (left out of the table): "
                  + "; ".join(f"case {r['case']} {r['variant']} {r['error_deg']:g} deg: {r['error']}" for r in failed)]
    lines += ["", "![Dice against angle error](angle_sensitivity.png)"]
    results = {"errors_deg": list(ERRORS_DEG), "phantoms": count, "table": table, "dice_drop": drop,
               "lat_5deg_dice_drop": lat5, "paper": PAPER, "rows": rows,
               "register": {"cases": cases, "specimen": _specimen(), "sides": SELFCAL_SIDES, "seed": ctx.seed,
                            "ct_spacing_mm": SELFCAL_CT_SPACING_MM, "variants": list(SELFCAL_VARIANTS),
                            "table": selfcal_table, "dice_drop": selfcal_drop,
                            "lat_5deg_dice_drop": {"fullres": lat5_without, "selfcal": lat5_with},
                            "rows": selfcal_rows}}
    write_results(ctx, results, "\n".join(lines))
    return results


def describe_plan(ctx: ExperimentContext) -> str:
    """The units as text, ``[done]`` or ``[todo]`` each (``hipatlas experiment angle-sensitivity --dry-run``)."""
    network, register = _network_units(PHANTOMS[ctx.scale]), _selfcal_units(ctx)
    lines = [f"# angle sensitivity ({ctx.scale}): {PHANTOMS[ctx.scale]} phantoms x {len(_network_units(1))} "
             f"network pairs; {SELFCAL_CASES[ctx.scale]} cases x {len(ERRORS_DEG)} LAT errors x "
             f"{', '.join(SELFCAL_VARIANTS)} through hipatlas register"]
    for key in network + [key for key, *_ in register]:
        lines.append(f"[{'done' if _unit_done(ctx, key) else 'todo'}] {key}")
    return "\n".join(lines)


def _network_units(count: int) -> list[str]:
    return [f"p{p:03d}_{which}_{e:g}" for p in range(count) for which in AFFECTED for e in ERRORS_DEG
            if e > 0 or which == "AP"]  # the 0-deg pair is one pair for all three


# --------------------------------------------------------------------------------------------
# Through the registration pipeline, with and without self-calibration
# --------------------------------------------------------------------------------------------

def _specimen() -> str:
    """The held-out specimen of the phantoms (``JIA_MRI``), whose femurs the simulated cases use."""
    return HELD_OUT_FEMURS[0].split(":")[0]


def _selfcal_plans(ctx: ExperimentContext) -> list[dict[str, Any]]:
    # The case seeds follow from the context's seed (case i: seed * 1000 + i), as the phantoms' do.
    return [simcases.case_plan(index, ctx.seed, False, SELFCAL_SIDES) for index in range(SELFCAL_CASES[ctx.scale])]


def _selfcal_key(index: int, error: float, variant: str) -> str:
    return f"case{index:03d}_LAT_{error:g}_{variant}"


def _selfcal_units(ctx: ExperimentContext) -> list[tuple[str, dict[str, Any], float, str]]:
    """(key, plan, LAT error, variant) per unit, case by case."""
    return [(_selfcal_key(plan["index"], error, variant), plan, error, variant) for plan in _selfcal_plans(ctx)
            for error in ERRORS_DEG for variant in SELFCAL_VARIANTS]


def _unit_done(ctx: ExperimentContext, key: str) -> bool:
    return (ctx.out / "units" / f"{key}.json").is_file()


def _run_selfcal(ctx: ExperimentContext, done: int, total: int) -> list[dict[str, Any]]:
    """One unit per (case, LAT error, variant); each case is simulated once into ``OUT/cases`` (only
    when one of its units has no result yet) and removed when all have one."""
    rows = []
    units = _selfcal_units(ctx)
    for plan in _selfcal_plans(ctx):
        mine = [u for u in units if u[1]["index"] == plan["index"]]
        made: dict[str, Any] = {}  # simulated when the first unit without a result needs it, then reused

        def case_folders(plan=plan, made=made):
            if "folders" not in made:
                try:
                    made["folders"] = _simulated_case(ctx, plan)
                except Cancelled:
                    raise
                except HipAtlasError as failure:
                    made["folders"] = failure
            if isinstance(made["folders"], HipAtlasError):
                raise made["folders"]
            return made["folders"]

        for key, _, error, variant in mine:
            ctx.report(done, total, key)
            result = ctx.unit(key, lambda error=error, variant=variant: _register_unit(
                ctx, plan, case_folders, error, variant))
            done += 1
            rows.append({"case": plan["index"], "side": plan["side"], "subject": f"{_specimen()}:{plan['side']}",
                         "seed": plan["seed"], "error_deg": error, "variant": variant, **result})
        # every unit of the case has its result: the case (about 17 MB) is not needed again
        shutil.rmtree(_case_folder(ctx, plan), ignore_errors=True)
    return rows


def _case_folder(ctx: ExperimentContext, plan: dict[str, Any]) -> pathlib.Path:
    return ctx.out / "cases" / f"case{plan['index']:03d}"


def _simulated_case(ctx: ExperimentContext, plan: dict[str, Any]) -> tuple[pathlib.Path, pathlib.Path]:
    """(case folder, truth folder) of ``plan`` in ``OUT/cases/caseNNN``: reused when complete (a run
    interrupted within the case), else simulated into a ``.partial`` folder first so that an
    interrupted simulation is never reused."""
    folder = _case_folder(ctx, plan)
    name = f"{plan['index']:03d}"
    if (folder / f"case_{name}" / "case.json").is_file() and (folder / f"truth_{name}" / "truth.json").is_file():
        return folder / f"case_{name}", folder / f"truth_{name}"
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)
    partial.mkdir(parents=True)
    simcases.simulate_case(plan, f"{_specimen()}:{plan['side']}", partial, SELFCAL_CT_SPACING_MM)
    partial.replace(folder)
    return folder / f"case_{name}", folder / f"truth_{name}"


def _register_unit(ctx: ExperimentContext, plan: dict[str, Any], case_folders, error: float,
                   variant: str) -> dict[str, Any]:
    """Register the case with its LAT matrix recorded ``error`` deg off, one step; the outputs are removed."""
    try:
        case_dir, truth_dir = case_folders()
    except Cancelled:
        raise
    except HipAtlasError as failure:
        log.error("case %d: %s", plan["index"], failure)
        return {"error": f"simulation: {failure}"}
    work = case_dir.parent
    run_dir = case_dir
    if error:
        run_dir = work / f"lat{error:g}_{variant}"
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.copytree(case_dir, run_dir)
        simcases.perturb_lateral(run_dir, error)
    result_dir = work / f"out_lat{error:g}_{variant}"
    try:
        # a loaded Keras model runs through its TensorFlow backend whatever HIPATLAS_BACKEND says:
        # self-calibration needs gradients, and both steps use the same network
        net = ctx.model if isinstance(ctx.model, (str, os.PathLike)) else backends.as_backend(ctx.model)
        row = simcases.register_variant(net, run_dir, result_dir, variant, truth_dir=truth_dir,
                                        side=plan["side"], assd=True)
    except Cancelled:
        raise
    except HipAtlasError as failure:
        log.error("case %d (%s, LAT error %g deg): %s", plan["index"], variant, error, failure)
        row = {"error": str(failure)}
    finally:
        shutil.rmtree(result_dir, ignore_errors=True)
        if run_dir != case_dir:
            shutil.rmtree(run_dir, ignore_errors=True)
    row["selfcal_lat_deg"] = _lat_angle_found(row.get("self_calibration"), case_dir)
    return row


def _lat_angle_found(self_calibration: dict[str, Any] | None, case_dir: pathlib.Path) -> float | None:
    """The LAT error self-calibration found: the rotation about the long axis (world z) that its
    correction ``M`` undoes. The recorded matrix is ``P @ T(error)`` (:func:`simcases.perturb_lateral`)
    and the corrected one ``P @ T(error) @ M``, so a perfect correction is ``M = T(-error)``."""
    import json

    if not self_calibration:
        return None
    lateral = json.loads((case_dir / "case.json").read_text())["views"][1]["name"]
    correction = self_calibration.get(lateral)
    if not correction:
        return None
    matrix = np.asarray(correction["matrix"], float)
    return -math.degrees(math.atan2(matrix[1, 0], matrix[0, 0]))


def _selfcal_tables(rows: list[dict[str, Any]]):
    """Per variant and LAT error: Dice, ASSD (and the LAT angle self-calibration found) summaries,
    and the Dice drop against the same variant at 0 deg, paired per case."""
    ok = [r for r in rows if not r.get("error")]
    table = {v: {f"{e:g}": {m: summary([r.get(m) for r in ok if r["variant"] == v and r["error_deg"] == e])
                            for m in ("dice", "assd_mm", "selfcal_lat_deg")} for e in ERRORS_DEG}
             for v in SELFCAL_VARIANTS}
    base = {(r["case"], r["variant"]): r["dice"] for r in ok if r["error_deg"] == 0}
    drop = {v: {f"{e:g}": summary([base[(r["case"], v)] - r["dice"] for r in ok
                                   if r["variant"] == v and r["error_deg"] == e and r.get("dice") is not None
                                   and base.get((r["case"], v)) is not None])
                for e in ERRORS_DEG} for v in SELFCAL_VARIANTS}
    return table, drop


# --------------------------------------------------------------------------------------------
# The figure
# --------------------------------------------------------------------------------------------

def _plot(ctx: ExperimentContext, table, selfcal_table) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, metric in zip(axes, ("dice", "assd_mm")):
        for which, marker in zip(AFFECTED, "osd"):
            _curve(ax, [table[which][f"{e:g}"][metric] for e in ERRORS_DEG], 0.0, marker=marker,
                   label=f"network, {which} view off")
        for variant, marker, colour in zip(SELFCAL_VARIANTS, "^v", ("tab:red", "tab:purple")):
            # shifted a little sideways so that the error bars of the paired curves do not hide each other
            _curve(ax, [selfcal_table[variant][f"{e:g}"][metric] for e in ERRORS_DEG],
                   -0.12 if variant == "fullres" else 0.12, marker=marker, color=colour, linestyle="--",
                   label=SELFCAL_LABELS[variant])
    axes[0].set_ylabel("Dice (mean +- sd)")
    axes[1].set_ylabel("ASSD (mm, mean +- sd)")
    for ax in axes:
        ax.set_xlabel("angle error (deg)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small", loc="lower left")
    fig.suptitle(f"Angle sensitivity ({ctx.scale} scale, held-out phantoms; dashed: through hipatlas register)")
    save_figure(fig, ctx.out / "angle_sensitivity.png")
    plt.close(fig)


def _curve(ax, stats, shift_deg: float, **style) -> None:
    """mean +- sd against the error, leaving out errors without a result."""
    points = [(e + shift_deg, s["mean"], s["sd"] or 0.0) for e, s in zip(ERRORS_DEG, stats) if s["mean"] is not None]
    if points:
        x, means, sds = zip(*points)
        ax.errorbar(x, means, yerr=sds, capsize=3, **style)
