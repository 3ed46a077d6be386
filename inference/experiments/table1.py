"""Table 1 of the paper: our network against an SDM baseline and a Kasten-style direct regression.

Rows, all trained on one data set (table2's: ``hipatlas synth`` phantoms of TLEM2 and MC22,
orthogonal views, the same seed) and scored on the same held-out test pairs as ``table2``
(orthogonal views of JIA_MRI phantoms, by specimen, never in training):

``ours``                  our network trained with ``hipatlas train`` (the shipped configuration),
                          the same run as table2's ``ours`` row
``ours (reference model)`` the shipped model (or ``--model``) as it is: trained longer, on more data
``SDM``                   PCA of 3D/3D atlas-to-subject deformations (SimpleITK affine + demons,
                          :mod:`inference.experiments.baselines`), PCA weights regressed from the
                          two views by a small CNN; the atlas warped by the reconstructed field
``Kasten-style``          a CNN regressing the femur label map directly from the two views
                          (2D encoders -> 3D decoder, Dice + BCE), at half the grid's resolution

Metrics: Dice, Jaccard, ASSD, HD95 of the femur label and SSIM of the femur intensity where a
volume is produced (ours and the SDM warp the atlas CT; the Kasten-style network produces only a
label map: SSIM n/a); two-sided paired t-tests (scipy) against ``ours``. The baselines' networks
train in :func:`inference.experiments.baselines.train_baseline` (seeded, checkpointed, resumable);
our network trains through ``hipatlas train``. Below the table, each baseline's upper bound on
the same test femurs, from their true labels (no radiographs): the atlas warped by the femur's own
3D/3D registration and by that field's projection on the SDM's components (filed with the SDM's
ledger entry), and the true label carried to the Kasten-style output grid and back. The paper column holds the paper's stated numbers
(Van Houtte et al., IJCARS 2022, abstract: Dice 0.94, ASSD 0.84 mm); its baseline numbers were not
found in the text available here.

Budget (``BUDGET``): quick = table2's data set (240 phantoms, compact grid) and 20 test pairs; ours
2000 steps through ``hipatlas train`` (the table2 row itself, ~37 min); one SDM registration ~1.2 CPU s
per training phantom; the SDM regressor 3000 steps (~0.015 CPU s a step) and the Kasten-style
network 3000 steps (batch 4, ~0.6 CPU s a step, ~30 CPU min), measured on a loaded 2-core machine
(on session 13's idle one: registrations 2 min, regressor 20 s, Kasten-style network 2.4 min).
full = 1200 phantoms, 30000 steps, 60 test pairs. Everything resumes: the data set, ours (``hipatlas
train`` checkpoints), each registration (``OUT/sdm/``), the baselines' checkpoints (``OUT/runs/``)
and each scored test pair (``OUT/units/``).
"""

from __future__ import annotations

import functools
import math
import pathlib
from typing import Any

import numpy as np

from inference.experiments import baselines
from inference.experiments.common import (METRICS, ExperimentContext, fmt, held_out_phantoms, pyplot,
                                          register_metrics, render_pair, save_figure, summary, test_pairs_spec,
                                          write_results)

ROWS = ("ours", "ours (reference model)", "SDM", "Kasten-style")
#: table2's data and test pairs; the baselines' own steps (batch 4) and SDM size.
BUDGET = {"quick": {"subjects": 240, "steps": 2000, "validate_every": 250, "val_limit": 8, "test": 20,
                    "baseline_steps": 3000, "batch": 4, "sdm_components": 20},
          "full": {"subjects": 1200, "steps": 30000, "validate_every": 1000, "val_limit": 40, "test": 60,
                   "baseline_steps": 30000, "batch": 8, "sdm_components": 40}}
PAPER = {"ours": {"dice": 0.94, "assd_mm": 0.84}}
TESTED = ("dice", "jaccard", "assd_mm", "hd95_mm", "ssim")


def _training_set(ctx: ExperimentContext, data: pathlib.Path, atlas_mask: np.ndarray, spacing) -> dict[str, Any]:
    """Images, masks, Kasten targets and the SDM fields (each registration cached as a unit)."""
    from inference.data.dataset import iter_samples
    from inference.model import FEMUR_LABEL

    images, masks, targets, fields = [], [], [], []
    samples = list(iter_samples(data, "train"))
    for number, sample in enumerate(samples):
        ctx.report(number, len(samples), f"SDM registration {number + 1}/{len(samples)}")
        key = f"sdm_field_{int(sample['sample_index']):05d}"
        path = ctx.out / "sdm" / f"{key}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.is_file():
            field = baselines.register_atlas_to_subject(atlas_mask, sample["labels"] == FEMUR_LABEL, spacing)
            tmp = path.with_name(f".{key}.tmp.npy")
            np.save(tmp, field)
            tmp.replace(path)
        fields.append(np.load(path, allow_pickle=False))
        images.append(np.asarray(sample["images"], np.float32))
        masks.append(np.asarray(sample["masks"], np.float32))
        targets.append(baselines.kasten_target(sample["labels"]))
    return {"inputs": {"images": np.stack(images), "masks": np.stack(masks)}, "targets": np.stack(targets),
            "fields": np.stack(fields)}


def _reporter(ctx: ExperimentContext, what: str):
    return lambda step, steps, loss: ctx.report(step, steps, f"{what}: step {step}/{steps}, loss {loss:.4f}")


def _baselines(ctx: ExperimentContext, data: pathlib.Path, budget: dict, atlas) -> dict[str, Any]:
    from inference.data.dataset import dataset_grid
    from inference.evaluate import spacing_zyx_of
    from inference.model import FEMUR_LABEL

    grid = dataset_grid(ctx.config.grid)
    spacing = spacing_zyx_of(grid.geometry.index_to_world())
    train = _training_set(ctx, data, atlas.labels == FEMUR_LABEL, spacing)
    sdm_path = ctx.out / "sdm" / "sdm.npz"
    if sdm_path.is_file():
        sdm = baselines.StatisticalDeformationModel.load(sdm_path)
    else:
        sdm = baselines.StatisticalDeformationModel.fit(train["fields"], budget["sdm_components"])
        sdm.save(sdm_path)
    weights = np.stack([sdm.weights(f) for f in train["fields"]])
    common = {"steps": budget["baseline_steps"], "batch": budget["batch"], "seed": ctx.seed,
              "checkpoint_every": max(1, budget["baseline_steps"] // 20)}
    regressor = baselines.train_baseline(
        lambda: baselines.build_sdm_regressor(grid.detector_hw, sdm.n_components, seed=ctx.seed),
        train["inputs"], weights, ctx.out / "runs" / "sdm-regressor", report=_reporter(ctx, "SDM regressor"),
        **common)
    kasten = baselines.train_baseline(
        lambda: baselines.build_kasten_net(grid.detector_hw, train["targets"].shape[1:4], seed=ctx.seed,
                                           decoder=_decoder(train["targets"].shape[1:4])),
        train["inputs"], train["targets"], ctx.out / "runs" / "kasten", report=_reporter(ctx, "Kasten-style"),
        **common)
    return {"sdm": sdm, "regressor": regressor, "kasten": kasten}


def _decoder(label_shape_zyx) -> tuple[int, ...]:
    """Decoder widths so that the 3D decoder starts at about (6, 4, 6) voxels: (32, 16, 8) on the
    compact grid's half resolution (48, 32, 48), (64, 32, 16, 8) on the paper grid's."""
    levels = max(1, int(math.log2(min(label_shape_zyx) / 4)))
    return tuple(8 * 2 ** k for k in reversed(range(levels)))


def _warped_atlas_metrics(atlas, field: np.ndarray, sample) -> dict[str, float]:
    """Metrics of the atlas warped by a coarse SDM-space field against one sample's truth."""
    from inference.evaluate import sample_metrics
    from inference.model import femur_intensity

    labels = baselines.warp_with_coarse_field(atlas.labels, field, order=0)
    intensity = baselines.warp_with_coarse_field(femur_intensity(atlas.volume, atlas.labels), field, order=1)
    row = sample_metrics(labels, sample["labels"], sample["index_to_world"], warped_intensity=intensity,
                         fixed_intensity=femur_intensity(sample["volume"], sample["labels"]))
    return {m: row[m] for m in METRICS}


def score_sdm(sdm, regressor, atlas, sample) -> dict[str, float]:
    """Metrics of the SDM baseline on one sample: the atlas warped by the regressed field."""
    w = np.asarray(regressor.predict_on_batch(_inputs(sample)))[0]
    return _warped_atlas_metrics(atlas, sdm.field(w), sample)


def score_sdm_bounds(sdm, atlas, sample) -> dict[str, dict[str, float]]:
    """Upper bounds of the SDM on one test femur, from its true label (no radiographs): the atlas
    warped by its own 3D/3D registration (``registration``: what the SDM is built from) and by that
    field's projection on the SDM's components (``best_weights``: the best the regressor could output)."""
    from inference.evaluate import spacing_zyx_of
    from inference.model import FEMUR_LABEL

    field = baselines.register_atlas_to_subject(atlas.labels == FEMUR_LABEL, sample["labels"] == FEMUR_LABEL,
                                                spacing_zyx_of(sample["index_to_world"]))
    return {"registration": _warped_atlas_metrics(atlas, field, sample),
            "best_weights": _warped_atlas_metrics(atlas, sdm.field(sdm.weights(field)), sample)}


def score_kasten_bound(sample) -> dict[str, float]:
    """Upper bound of the Kasten-style network on one test femur: the true label carried to the
    network's output grid (half resolution) and back, as :func:`score_kasten` does with its output."""
    from inference.evaluate import sample_metrics

    labels = baselines.kasten_labels(baselines.kasten_target(sample["labels"]), sample["labels"].shape)
    row = sample_metrics(labels, sample["labels"], sample["index_to_world"])
    return {m: row[m] for m in METRICS}


def score_kasten(kasten, sample) -> dict[str, float]:
    """Metrics of the Kasten-style network on one sample (a label map only: SSIM n/a)."""
    from inference.evaluate import sample_metrics

    probability = np.asarray(kasten.predict_on_batch(_inputs(sample)))[0]
    labels = baselines.kasten_labels(probability, sample["labels"].shape)
    row = sample_metrics(labels, sample["labels"], sample["index_to_world"])
    return {m: row[m] for m in METRICS}


def _inputs(sample) -> dict[str, np.ndarray]:
    return {"images": np.asarray(sample["images"], np.float32)[None],
            "masks": np.asarray(sample["masks"], np.float32)[None]}


def paired_p_values(scores: dict[str, list[dict]], reference: str = "ours") -> dict[str, dict[str, float]]:
    """Two-sided paired t-test p-values of each row against ``reference``, per metric."""
    from scipy import stats

    out: dict[str, dict[str, float]] = {}
    for row, rows in scores.items():
        out[row] = {}
        for m in TESTED:
            a = np.array([r.get(m) if r.get(m) is not None else np.nan for r in scores[reference]], float)
            b = np.array([r.get(m) if r.get(m) is not None else np.nan for r in rows], float)
            keep = np.isfinite(a) & np.isfinite(b)
            out[row][m] = (float(stats.ttest_rel(a[keep], b[keep]).pvalue)
                           if row != reference and keep.sum() > 1 and np.any(a[keep] != b[keep]) else math.nan)
    return out


def _baseline_key(ctx: ExperimentContext, row: str, budget: dict) -> tuple[str, dict]:
    """Ledger label and inputs of one baseline's training (its data set, budget, seed, test pairs)."""
    from inference.experiments.table2 import _synth_args

    return f"table1-{row.split(' ')[0].rstrip('-')}", {
        "baseline": row, "grid": ctx.config.grid, "synth": _synth_args(ctx, budget),
        "budget": {k: budget[k] for k in ("baseline_steps", "batch", "sdm_components")}, "seed": ctx.seed,
        "test": test_pairs_spec(ctx, budget["test"])}


def describe_plan(ctx: ExperimentContext) -> str:
    """The plan as text: ours (table2's row), the two baselines and the reference model, each
    ``[ledger]``, ``[done]`` or ``[todo]``."""
    from inference.experiments.table2 import plan_lines

    budget = BUDGET[ctx.scale]
    baselines = {row: "ledger" if ctx.recorded(*_baseline_key(ctx, row, budget)) is not None else "todo"
                 for row in ("SDM", "Kasten-style")}
    lines = [f"# table1 ({ctx.scale}): ours {budget['steps']} steps, baselines {budget['baseline_steps']} steps, "
             f"{budget['test']} held-out test pairs" + (f"; ledger {ctx.ledger.folder}" if ctx.ledger else ""),
             *plan_lines(ctx, {"ours": {}}, budget, others_train="todo" in baselines.values())]
    for row, state in baselines.items():
        lines.append(f"[{state}] {row}: {budget['baseline_steps']} steps in this process"
                     + (" after the SDM registrations of the training set" if row == "SDM" else ""))
    lines.append("[each run] ours (reference model): the shipped model scored on the test pairs")
    return "\n".join(lines)


def run(ctx: ExperimentContext) -> dict[str, Any]:
    from inference.data.atlas import load_atlas
    from inference.experiments.table2 import _data, trained_row

    budget = BUDGET[ctx.scale]
    data = functools.cache(lambda: _data(ctx, budget))  # made only if something trains
    atlas = load_atlas(ctx.config.grid)
    phantoms = list(held_out_phantoms(ctx, budget["test"]))
    ctx.report(0, 4, "training ours (hipatlas train)")
    ours = [{m: r.get(m) for m in METRICS} for r in trained_row(ctx, "ours", {}, budget, data)["scores"]]
    scores: dict[str, list[dict]] = {"ours": ours}
    keys = {row: _baseline_key(ctx, row, budget) for row in ("SDM", "Kasten-style")}
    recorded = {row: ctx.recorded(*key) for row, key in keys.items()}
    nets = None if all(r is not None for r in recorded.values()) else _baselines(ctx, data(), budget, atlas)
    scorers = {"ours (reference model)": lambda s: register_metrics(ctx, s),
               "SDM": lambda s: score_sdm(nets["sdm"], nets["regressor"], atlas, s),
               "Kasten-style": lambda s: score_kasten(nets["kasten"], s),
               "SDM bounds": lambda s: score_sdm_bounds(nets["sdm"], atlas, s),
               "Kasten grid": score_kasten_bound}
    # The SDM's bounds need its model, so they are filed with its scores; the Kasten grid's need
    # only the truth and are computed by every run.
    rows = [row for row in ROWS if row != "ours" and recorded.get(row) is None]
    rows += ["SDM bounds"] * (recorded["SDM"] is None) + ["Kasten grid"]
    scores.update({row: [] for row in rows})
    for number, phantom in enumerate(phantoms):
        ctx.report(number, len(phantoms), f"scoring test pair {number + 1}/{len(phantoms)}")
        sample = None
        for row in rows:
            def compute(row=row):
                nonlocal sample
                sample = sample if sample is not None else render_pair(ctx, phantom, (0.0, 90.0))
                return scorers[row](sample)
            slug = row.split(" (")[0].replace(" ", "-") + ("-reference" if "reference" in row else "")
            scores[row].append(ctx.unit(f"{slug}_{phantom.key}", compute))
    sdm_bounds = scores.get("SDM bounds")
    for row, key in keys.items():
        if recorded[row] is None:
            ctx.record(*key, {"scores": scores[row]} | ({"bounds": sdm_bounds} if row == "SDM" else {}))
        else:
            scores[row] = recorded[row]["scores"]
            if row == "SDM":
                sdm_bounds = recorded[row].get("bounds")
    bounds = {key: [b[key] for b in sdm_bounds] if sdm_bounds else None for key in ("registration", "best_weights")}
    bounds["kasten_grid"] = scores["Kasten grid"]
    return report(ctx, {row: scores[row] for row in ROWS}, budget, len(phantoms), bounds)


#: The baselines' upper bounds (see :func:`score_sdm_bounds`, :func:`score_kasten_bound`): key, label.
BOUNDS = {"registration": "SDM: the atlas warped by each test femur's own 3D/3D registration (the SDM's input)",
          "best_weights": "SDM: that field projected on the SDM's components (the best weights a regressor "
                          "could output)",
          "kasten_grid": "Kasten-style: the true label at the network's output grid (half resolution) and back"}


def report(ctx: ExperimentContext, scores: dict[str, list[dict]], budget: dict, n_pairs: int,
           bounds: dict[str, list[dict] | None] | None = None) -> dict[str, Any]:
    """``results.json``, ``results.md`` (laid out like the paper's Table 1) and ``table1.png``.

    ``bounds``: per :data:`BOUNDS` key the test pairs' scores of that upper bound (None: not
    measured), reported below the table, outside the paired tests."""
    table = {row: {m: summary([r.get(m) for r in rows]) for m in METRICS} for row, rows in scores.items()}
    tests = paired_p_values(scores)
    lines = [f"Our network trained {budget['steps']} steps with `hipatlas train` (Adam 3e-4, seed 0); the "
             f"baselines' networks {budget['baseline_steps']} steps (batch {budget['batch']}, Adam 1e-3, seed "
             f"{ctx.seed}); all on one data set ({budget['subjects']} phantoms of TLEM2 and MC22, orthogonal "
             f"views; the SDM has {budget['sdm_components']} components). Scored on the same {n_pairs} held-out "
             "test pairs (JIA_MRI phantoms, orthogonal) as table2. p: two-sided paired t-test against ours. "
             "SSIM: femur intensity, only where a volume is produced.", "",
             "| method | Dice | Jaccard | ASSD (mm) | HD95 (mm) | SSIM | p (Dice) | p (ASSD) | p (HD95) | "
             "paper Dice | paper ASSD (mm) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in scores:
        t, p = table[row], tests[row]
        paper = PAPER.get(row, {})
        lines.append(f"| {row} | {fmt(t['dice'])} | {fmt(t['jaccard'])} | {fmt(t['assd_mm'], 2)} | "
                     f"{fmt(t['hd95_mm'], 2)} | {fmt(t['ssim'])} | {_p(p['dice'])} | {_p(p['assd_mm'])} | "
                     f"{_p(p['hd95_mm'])} | {paper.get('dice', 'not found')} | {paper.get('assd_mm', 'not found')} |")
    lines += ["", "Paper column: Van Houtte et al., Int J CARS 17(7):1333-1342 (2022), abstract (ours: Dice 0.94, "
              "ASSD 0.84 mm); the paper's baseline numbers were not found in the text available here.", ""]
    bound_table = {key: None if not rows else {m: summary([r.get(m) for r in rows]) for m in METRICS}
                   for key, rows in (bounds or {}).items()}
    if bound_table:
        lines += ["What limits the baselines: upper bounds on the same test femurs, from their true labels "
                  "(no radiographs involved; not in the paired tests).", "",
                  "| upper bound | Dice | ASSD (mm) | HD95 (mm) |", "|---|---|---|---|"]
        for key, t in bound_table.items():
            lines.append(f"| {BOUNDS[key]} | " + (f"{fmt(t['dice'])} | {fmt(t['assd_mm'], 2)} | {fmt(t['hd95_mm'], 2)} |"
                         if t else "not measured: the SDM's ledger entry predates the bounds (delete it to "
                                   "measure them) | | |"))
        lines.append("")
    lines.append("![Dice and ASSD per method](table1.png)")
    results = {"budget": budget, "rows": list(scores), "table": table, "p_values": tests, "scores": scores,
               "paper": PAPER, "test_pairs": n_pairs, "bounds": bound_table, "bound_scores": bounds}
    _plot(ctx, table)
    write_results(ctx, results, "\n".join(lines))
    return results


def _p(value: float) -> str:
    return "-" if value is None or not math.isfinite(value) else (f"{value:.3f}" if value >= 0.001 else "<0.001")


def _plot(ctx: ExperimentContext, table) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    names = list(table)
    for ax, (metric, label) in zip(axes, (("dice", "Dice"), ("assd_mm", "ASSD (mm)"))):
        ax.bar(np.arange(len(names)), [table[n][metric]["mean"] or 0 for n in names],
               yerr=[table[n][metric]["sd"] or 0 for n in names], capsize=3)
        ax.set_xticks(np.arange(len(names)), names, rotation=20, ha="right")
        ax.set_ylabel(f"{label} (mean +- sd)")
    fig.suptitle(f"Table 1 ({ctx.scale} scale, held-out test pairs)")
    save_figure(fig, ctx.out / "table1.png")
    plt.close(fig)
