"""``hipatlas synth``, ``shape-model``, ``prepare-ct`` and ``simulate`` (see :mod:`inference.cli`).

:func:`add_parser` declares the four subcommands; handlers import their implementation (and
TensorFlow) lazily so that ``hipatlas --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from inference.validate import cli_int

log = logging.getLogger(__name__)

__all__ = ["add_parser", "add_subcommands", "parse_split"]


def parse_split(items: list[str] | None) -> dict[str, list[str]] | None:
    """``["train=TLEM2,MC22", "val=JIA", "test="]`` -> ``{"train": [...], "val": [...], "test": []}``."""
    if not items:
        return None
    from inference.errors import ConfigError

    split: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for item in items:
        for part in item.split(";"):
            if not part.strip():
                continue
            name, sep, specimens = part.partition("=")
            name = name.strip()
            if not sep or name not in split:
                raise ConfigError(f"--split {part!r}: expected NAME=SPECIMEN[,SPECIMEN...] with NAME one of "
                                  "train, val, test (e.g. --split train=TLEM2,MC22 --split val=JIA)")
            split[name] = [s.strip() for s in specimens.split(",") if s.strip()]
    return split


def _counter_progress(quiet: bool, unit: str):
    """progress(done, total) for the data commands: a tqdm bar on a terminal, else log lines."""
    if quiet or not sys.stderr.isatty():
        return lambda done, total: log.info("%d/%d %s", done, total, unit)
    from tqdm import tqdm

    bar: dict[str, Any] = {}

    def show(done: int, total: int) -> None:
        if "bar" not in bar:
            bar["bar"] = tqdm(total=total, initial=done, unit=unit, file=sys.stderr)
        else:
            bar["bar"].update(done - bar["bar"].n)
        if done >= total:
            bar["bar"].close()

    return show


def _fraction_progress(quiet: bool):
    if quiet or not sys.stderr.isatty():
        return lambda fraction, message: log.info("%3.0f%% %s", 100 * fraction, message)
    from tqdm import tqdm

    bar = tqdm(total=100, unit="%", leave=False, file=sys.stderr)

    def show(fraction: float, message: str) -> None:
        bar.n = round(100 * fraction)
        bar.set_description(message)
        bar.refresh()
        if fraction >= 1.0:
            bar.close()

    return show


# ----------------------------------------------------------------------------------------------
def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``synth``, ``shape-model``, ``prepare-ct`` and ``simulate`` to the ``hipatlas`` parser."""
    synth = subparsers.add_parser(
        "synth", help="generate a synthetic DRR training data set",
        description="Generate N CT phantoms of the shared bones (shape, pose and tissue augmented), each with "
        "one calibrated view pair of realistic DRRs and femur masks, split by specimen into train/val/test "
        "(docs/architecture.md, 'Data set on disk'). Resumable: run the same command again to continue.")
    synth.add_argument("--out", required=True, help="data set folder (created; resumed if it holds the same set)")
    synth.add_argument("--subjects", type=cli_int(1), help="number of samples (phantoms) N (required unless --merge)")
    synth.add_argument("--grid", choices=("compact", "paper"), default="compact", help="atlas grid (default compact)")
    synth.add_argument("--geometry", choices=("orthogonal", "generalised"), default="orthogonal",
                       help="orthogonal: AP + lateral; generalised: each angle within +-30 deg of those "
                       "(--angle-range-deg)")
    synth.add_argument("--angle-range-deg", type=float, default=None,
                       help="with --geometry generalised: half-width of each view's angle range around AP and "
                       "lateral, deg (default 30, the paper's; 50 also covers pairs 40 to 140 deg apart)")
    synth.add_argument("--max-skew-deg", type=float, default=None,
                       help="with --geometry generalised: keep each pair's separation within this of 90 deg "
                       "(the lateral angle's draw is mirrored otherwise); default no limit")
    synth.add_argument("--seed", type=cli_int(0), default=0, help="random seed (default 0)")
    synth.add_argument("--workers", type=cli_int(0), default=2, help="parallel processes (default 2)")
    synth.add_argument("--split", action="append", metavar="NAME=SPECIMENS",
                       help="specimens of a split, e.g. --split train=TLEM2,MC22 --split val=JIA (default: "
                       "train TLEM2+MC22, val JIA)")
    synth.add_argument("--no-realism", action="store_true", help="clean DRRs (no noise, scatter, blur, gamma)")
    synth.add_argument("--calibration-error", nargs=3, type=float, metavar=("DEG", "MM", "PX"),
                       help="render with a random calibration error up to DEG rotation, MM translation and PX "
                       "detector shift (stored matrices stay nominal); default none")
    synth.add_argument("--max-translation-mm", type=float, default=None,
                       help="largest random shift of the femur from the grid's nominal place, mm "
                       "(default 5; the shipped models used 10)")
    synth.add_argument("--shaft-width-range", nargs=2, type=float, default=None, metavar=("LOW", "HIGH"),
                       help="scale each phantom's shaft cross-sections below the lesser trochanter by a factor "
                       "drawn uniformly from [LOW, HIGH] (within 0.8-1.25; e.g. 0.9 1.1); default off")
    synth.add_argument("--oversample", type=cli_int(1), default=2,
                       help="render DRRs this many times finer than the network detector (default 2)")
    synth.add_argument("--step-mm", type=float, help="ray-marching step (default: the grid's smallest spacing)")
    synth.add_argument("--shape-model", metavar="PATH",
                       help="deform each femur by a draw of this statistical deformation model (hipatlas "
                       "shape-model) before the shape modes; it must be built from the train split only")
    synth.add_argument("--shape-model-sd", type=float, default=None, metavar="K",
                       help="with --shape-model: weights from a normal truncated to +-K sd (default 1)")
    _add_shard_options(synth, "make only shard I of N (I = 0..N-1; samples i with i %% N == I)", "synth --shard")
    synth.add_argument("--quiet", action="store_true", help="no progress bar")
    synth.set_defaults(handler=_synth)

    shape = subparsers.add_parser(
        "shape-model", help="build a statistical deformation model of the train split's femurs",
        description="Register one femur of the train split to each other one (SimpleITK affine + demons on "
        "their masks in the canonical femur frame) and save a PCA of the displacement fields, for 'synth "
        "--shape-model'. Only the train split's specimens are read.")
    shape.add_argument("--out", required=True, help="model file (.npz) to write")
    shape.add_argument("--split", action="append", metavar="NAME=SPECIMENS",
                       help="as for synth (default: train TLEM2+MC22, val JIA); only train is used")
    shape.add_argument("--spacing-mm", type=float, default=2.0,
                       help="mask voxel size (default 2; the fields keep every 4th voxel)")
    shape.add_argument("--components", type=cli_int(1), help="PCA components (default: femurs - 1)")
    shape.add_argument("--quiet", action="store_true", help="no progress bar")
    shape.set_defaults(handler=_shape_model)

    prep = subparsers.add_parser(
        "prepare-ct", help="make training samples from your own CT and femur labels",
        description="Read a CT (DICOM series folder, NIfTI or MHA, in HU) and its label map, find the femur's "
        "frame from the label, resample to the atlas grid and render calibrated DRR pairs in the data set "
        "format of 'synth'. One CT (--ct, --labels, --side) is appended to a data set made by prepare-ct; a "
        "list of CTs (--cases LIST.csv) makes one data set, resumably, on one machine or in shards on many "
        "(--shard I/N, then --merge).")
    prep.add_argument("--ct", help="CT: DICOM series folder, .nii(.gz), .mha or .nrrd")
    prep.add_argument("--labels", help="label map (any grid overlapping the CT)")
    prep.add_argument("--side", choices=("left", "right"), help="which femur")
    prep.add_argument("--cases", metavar="LIST.csv",
                      help="instead of --ct/--labels/--side: a CSV list of CTs with the header ct,labels,side"
                      "[,subject][,split] (paths relative to the list's folder), made into one data set")
    prep.add_argument("--out", required=True, help="data set folder")
    prep.add_argument("--grid", choices=("compact", "paper", "both"), default="compact",
                      help="atlas grid; 'both' writes OUT/compact and OUT/paper")
    prep.add_argument("--pairs", type=cli_int(1), default=1, help="view pairs (samples) per CT (default 1)")
    prep.add_argument("--geometry", choices=("orthogonal", "generalised"), default="orthogonal")
    prep.add_argument("--seed", type=cli_int(0), default=0)
    prep.add_argument("--subject", help="subject name in the manifest (default: the CT's file name)")
    prep.add_argument("--split", choices=("train", "val", "test"),
                      help="split of the CT (default train; with --cases, the list's split column)")
    prep.add_argument("--femur-label", type=int, default=1, help="label value of the femur (default 1)")
    prep.add_argument("--pelvis-label", type=int, help="label value of the pelvis (optional)")
    prep.add_argument("--no-realism", action="store_true", help="clean DRRs")
    prep.add_argument("--workers", type=cli_int(0), default=1,
                      help="with --cases: CTs imported side by side, one process each (default 1)")
    _add_shard_options(prep, "with --cases: import only the CTs k (0-based list rows) with k %% N == I",
                       "prepare-ct --cases --shard")
    prep.add_argument("--quiet", action="store_true", help="no progress bar")
    prep.set_defaults(handler=_prepare_ct)

    sim = subparsers.add_parser(
        "simulate", help="simulate a biplanar case from a CT or a phantom",
        description="Render the two radiographs of a case folder (docs/case-format) from a CT and a geometry "
        "file (a case.json whose views have projection_matrix, rows and cols but no images), or from a "
        "phantom of a shared bone subject. With --write-geometry only, write a standard AP + lateral "
        "geometry file.")
    source = sim.add_mutually_exclusive_group()
    source.add_argument("--ct", help="CT in HU: DICOM series folder, .nii(.gz), .mha or .nrrd")
    source.add_argument("--phantom", metavar="SUBJECT", help="shared femur, e.g. MC22:left (see 'synth')")
    sim.add_argument("--labels", help="label map of the CT (gives masks and checks the femur is in view)")
    sim.add_argument("--femur-label", type=int, default=1)
    sim.add_argument("--geometry", help="geometry file (case.json with matrices, rows, cols)")
    sim.add_argument("--out", help="case folder to write")
    sim.add_argument("--truth-out", help="with --phantom: folder for the ground truth (CT, labels, landmarks)")
    sim.add_argument("--seed", type=cli_int(0), default=0, help="phantom, placement, views and noise")
    sim.add_argument("--side", choices=("left", "right"), help="with --phantom: side of the simulated femur")
    sim.add_argument("--format", choices=("png", "nifti", "tiff"), default="png", help="image files (default png)")
    sim.add_argument("--realism", action=argparse.BooleanOptionalAction, default=None,
                     help="noise, scatter, blur and contrast (default: on for --phantom, off for --ct)")
    sim.add_argument("--step-mm", type=float, help="ray-marching step (default: the CT's smallest spacing)")
    sim.add_argument("--overwrite", action="store_true", help="replace existing output folders")
    sim.add_argument("--write-geometry", metavar="PATH", help="write a standard geometry file")
    sim.add_argument("--isocentre", nargs=3, type=float, metavar=("X", "Y", "Z"), default=(0.0, 0.0, 0.0),
                     help="isocentre of --write-geometry views, world LPS mm")
    sim.add_argument("--angles", nargs=2, type=float, metavar=("A1", "A2"),
                     help="LAO angles of --write-geometry views (default 0 and +-90 for the side)")
    sim.add_argument("--rows", type=cli_int(1), default=768)
    sim.add_argument("--cols", type=cli_int(1), default=768)
    sim.add_argument("--pixel-mm", type=float, default=0.4)
    sim.add_argument("--quiet", action="store_true", help="no progress bar")
    sim.set_defaults(handler=_simulate)


def _add_shard_options(parser: argparse.ArgumentParser, shard_help: str, command: str) -> None:
    """``--shard I/N`` and ``--merge SHARD_DIR...`` (synth, prepare-ct)."""
    parser.add_argument("--shard", metavar="I/N", help=f"{shard_help} into --out, e.g. one Slurm array task each; "
                        "join the shards with --merge")
    parser.add_argument("--merge", nargs="+", metavar="SHARD_DIR",
                        help=f"join the N shard folders of one {command} command into --out (checksums verified; "
                        "the same files as an unsharded run)")


#: The name the task brief uses.
add_subcommands = add_parser


# ----------------------------------------------------------------------------------------------
def _synth(args: argparse.Namespace) -> int:
    import dataclasses

    from inference.data import dataset as ds
    from inference.data.augment import CalibrationErrorRanges, RealismRanges
    from inference.errors import ConfigError

    if args.merge:
        return _merge(args)
    if args.subjects is None:
        raise ConfigError("synth needs --subjects N (the number of samples), or --merge SHARD_DIR...")
    config = ds.SynthConfig()
    if args.no_realism:
        config = dataclasses.replace(config, realism=RealismRanges(enabled=False))
    if args.calibration_error:
        deg, mm, px = args.calibration_error
        config = dataclasses.replace(config, calibration_error=CalibrationErrorRanges(deg, mm, px))
    config = dataclasses.replace(config, render=ds.RenderSettings(oversample=args.oversample, step_mm=args.step_mm))
    if (args.angle_range_deg is not None or args.max_skew_deg is not None) and args.geometry != "generalised":
        raise ConfigError("--angle-range-deg and --max-skew-deg need --geometry generalised")
    views = {name: value for name, value in (("angle_range_deg", args.angle_range_deg),
                                             ("max_skew_deg", args.max_skew_deg)) if value is not None}
    config = dataclasses.replace(config, views=dataclasses.replace(config.views, **views))
    if args.max_translation_mm is not None:
        config = dataclasses.replace(config, phantom=dataclasses.replace(
            config.phantom, max_translation_mm=args.max_translation_mm))
    if args.shaft_width_range is not None:
        config = dataclasses.replace(config, phantom=dataclasses.replace(
            config.phantom, shaft_width_range=tuple(args.shaft_width_range)))
    split = parse_split(args.split)
    if args.shape_model_sd is not None and not args.shape_model:
        raise ConfigError("--shape-model-sd needs --shape-model PATH")
    if args.shape_model:
        from inference.data.shape_model import ShapeModelSampling

        config = dataclasses.replace(config, split=split or config.split,
                                     shape_model=ShapeModelSampling(args.shape_model, args.shape_model_sd or 1.0))
    manifest = ds.generate_dataset(args.out, args.subjects, args.grid, args.geometry, args.seed, args.workers,
                                   config=config, split=split,
                                   progress=_counter_progress(args.quiet, "samples"),
                                   shard=ds.parse_shard(args.shard) if args.shard else None)
    print(f"data set written: {manifest}")
    return 0


def _shape_model(args: argparse.Namespace) -> int:
    from inference.data import dataset as ds
    from inference.data.shape_model import build_shape_model

    model = build_shape_model(args.out, parse_split(args.split) or ds.DEFAULT_SPLIT, spacing_mm=args.spacing_mm,
                              n_components=args.components, progress=_counter_progress(args.quiet, "femurs"))
    print(f"shape model of {', '.join(model.meta['femurs'])} written: {args.out}")
    return 0


def _merge(args: argparse.Namespace) -> int:
    """``synth --merge`` and ``prepare-ct --merge``: join shard folders into ``--out``."""
    from inference.data import dataset as ds
    from inference.errors import ConfigError

    if args.shard:
        raise ConfigError("give --shard (make one shard) or --merge (join shards), not both")
    manifest = ds.merge_shards(args.out, args.merge, progress=_counter_progress(args.quiet, "samples"))
    print(f"data set written: {manifest}")
    return 0


def _prepare_ct(args: argparse.Namespace) -> int:
    import dataclasses
    import pathlib

    from inference.data import ct_import
    from inference.data import dataset as ds
    from inference.data.augment import RealismRanges
    from inference.errors import ConfigError

    single = [f"--{name}" for name in ("ct", "labels", "side") if getattr(args, name)]
    if args.merge:
        if single or args.cases:
            raise ConfigError("--merge joins shard folders; give it without --ct, --labels, --side or --cases")
        return _merge(args)
    if args.cases:
        given = single + [f"--{name}" for name in ("subject", "split") if getattr(args, name)]
        if given:
            raise ConfigError(f"give --cases LIST or --ct, --labels and --side, not both ({', '.join(given)} with "
                              "--cases; the list names each CT's labels, side, subject and split)")
    else:
        missing = [f"--{name}" for name in ("ct", "labels", "side") if not getattr(args, name)]
        if missing:
            raise ConfigError(f"prepare-ct needs --ct, --labels and --side (missing {', '.join(missing)}), or a "
                              "list of CTs with --cases LIST.csv")
        if args.shard:
            raise ConfigError("--shard splits a list of CTs (--cases LIST.csv); one CT is one command")
    config = ds.SynthConfig()
    if args.no_realism:
        config = dataclasses.replace(config, realism=RealismRanges(enabled=False))
    grids = ("compact", "paper") if args.grid == "both" else (args.grid,)
    kwargs = dict(pairs=args.pairs, geometry=args.geometry, seed=args.seed, femur_label=args.femur_label,
                  pelvis_label=args.pelvis_label, config=config, progress=_counter_progress(args.quiet, "pairs"))
    if args.cases:
        cases = ct_import.read_case_list(args.cases)
        paths = [ct_import.prepare_ct_list(cases, pathlib.Path(args.out) / name if args.grid == "both" else args.out,
                                           grid=name, workers=args.workers,
                                           shard=ds.parse_shard(args.shard) if args.shard else None,
                                           root=pathlib.Path(args.cases).parent, **kwargs)
                 for name in grids]
    elif args.grid == "both":
        paths = ct_import.prepare_ct_grids(args.ct, args.labels, args.side, args.out, grids, subject=args.subject,
                                           split=args.split or "train", **kwargs)
    else:
        paths = [ct_import.prepare_ct(args.ct, args.labels, args.side, args.out, grid=grids[0], subject=args.subject,
                                      split=args.split or "train", **kwargs)]
    for path in paths:
        print(f"data set {'written' if args.cases else 'updated'}: {path}")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from inference.data import simulate
    from inference.errors import ConfigError

    if args.write_geometry:
        side = args.side or "right"
        geometry = simulate.standard_geometry(args.isocentre, side, angles_deg=args.angles, rows=args.rows,
                                              cols=args.cols, pixel_mm=args.pixel_mm)
        simulate.write_geometry_file(args.write_geometry, geometry)
        print(f"geometry written: {args.write_geometry}")
        if not (args.ct or args.phantom):
            return 0
    if not (args.ct or args.phantom):
        raise ConfigError("simulate needs --ct CT (with --geometry) or --phantom SUBJECT, or --write-geometry PATH")
    if not args.out:
        raise ConfigError("simulate needs --out CASE_DIR")
    geometry_file = args.geometry or args.write_geometry
    progress = _fraction_progress(args.quiet)
    if args.ct:
        if not geometry_file:
            raise ConfigError("simulate --ct needs --geometry GEOM.json (write one with --write-geometry)")
        if args.truth_out:
            raise ConfigError("--truth-out is for --phantom; a CT's truth is the CT itself")
        realism_seed = args.seed if args.realism else None
        path = simulate.simulate_case(args.ct, geometry_file, args.out, labels=args.labels,
                                      femur_label=args.femur_label, image_format=args.format, step_mm=args.step_mm,
                                      realism_seed=realism_seed, overwrite=args.overwrite, progress=progress)
    else:
        if args.labels:
            raise ConfigError("--labels is for --ct; a phantom brings its own labels")
        path = simulate.simulate_phantom_case(args.phantom, args.seed, args.out, side=args.side,
                                              geometry_file=geometry_file, truth_out=args.truth_out,
                                              image_format=args.format,
                                              realism=True if args.realism is None else args.realism,
                                              step_mm=args.step_mm, overwrite=args.overwrite, progress=progress)
    print(f"case written: {path}")
    if args.truth_out:
        print(f"ground truth written: {args.truth_out}")
    return 0
