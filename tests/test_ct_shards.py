"""``prepare-ct --cases LIST [--shard I/N]`` and ``prepare-ct --merge``: a list of CTs made into one
data set, whole or in shards by CT; the merged shards are byte for byte the unsharded data set.

The CTs are small analytic femurs (:func:`test_ct_import.patient_ct`) placed by a seeded random
generator and written by the test as NIfTI.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import pytest

from inference.data import ct_import
from inference.data import dataset as ds
from inference.errors import ConfigError, DataError, InputFileError
from inference.io import write_volume
from test_ct_import import _config, _extra_commands, _tiny_grid, patient_ct
from test_shards import _files, _manifest

PAIRS = 2
LIST = "ct,labels,side,subject,split\n{rows}"


def _write_ct(folder: pathlib.Path, side: str, rng: np.random.Generator) -> None:
    hu, labels, geometry, _ = patient_ct(side, angle_deg=float(rng.uniform(-15, 15)),
                                         shift_mm=tuple(rng.uniform(-8, 8, 3)))
    folder.mkdir(parents=True)
    write_volume(folder / "ct.nii.gz", hu, geometry, dtype=np.int16)
    write_volume(folder / "labels.nii.gz", labels, geometry, dtype=np.uint8)


def _make(cases, out, shard=None, **kwargs):
    return ct_import.prepare_ct_list(cases, out, grid=_tiny_grid(), pairs=PAIRS, geometry="generalised", seed=5,
                                     config=_config(), shard=shard, **kwargs)


@pytest.fixture(scope="module")
def cts(tmp_path_factory):
    """Three CTs (two patients' left femurs, one right) and their case list; p3 is a val subject."""
    root = tmp_path_factory.mktemp("cts")
    rng = np.random.default_rng(11)
    for name, side in (("p1", "left"), ("p2", "right"), ("p3", "left")):
        _write_ct(root / name, side, rng)
    rows = ("p1/ct.nii.gz,p1/labels.nii.gz,left,,\n"
            "p2/ct.nii.gz, p2/labels.nii.gz, right,,train\n"
            "# a comment line\n\n"
            "p3/ct.nii.gz,p3/labels.nii.gz,left,patient3,val\n")
    (root / "cases.csv").write_text(LIST.format(rows=rows))
    return root


@pytest.fixture(scope="module")
def made(cts, tmp_path_factory):
    root = tmp_path_factory.mktemp("made")
    _make(cts / "cases.csv", root / "whole")
    for index in range(2):
        _make(cts / "cases.csv", root / f"shard{index}", shard=(index, 2))
    return root


def test_case_list_is_read_with_default_subjects_and_splits(cts):
    cases = ct_import.read_case_list(cts / "cases.csv")
    assert [(c.ct, c.labels, c.side, c.subject, c.split, c.line) for c in cases] == [
        ("p1/ct.nii.gz", "p1/labels.nii.gz", "left", "p1-ct", "train", 2),
        ("p2/ct.nii.gz", "p2/labels.nii.gz", "right", "p2-ct", "train", 3),
        ("p3/ct.nii.gz", "p3/labels.nii.gz", "left", "patient3", "val", 6)]


def test_sharded_prepare_ct_and_merge_equal_an_unsharded_run(made, tmp_path):
    whole = ds.load_manifest(made / "whole")
    assert whole["complete"] and whole["num_samples"] == 3 * PAIRS and whole["samples_per_ct"] == PAIRS
    assert [(e["index"], e["subject"], e["split"], e["side"]) for e in whole["samples"]] == [
        (0, "p1-ct", "train", "left"), (1, "p1-ct", "train", "left"), (2, "p2-ct", "train", "right"),
        (3, "p2-ct", "train", "right"), (4, "patient3", "val", "left"), (5, "patient3", "val", "left")]
    assert whole["split_counts"] == {"train": 4, "val": 2, "test": 0}
    assert [e["source"]["list_line"] for e in whole["samples"]] == [2, 2, 3, 3, 6, 6]
    # Each CT's pairs differ (own draws) and each sample is a usable one.
    samples = [ds.load_sample(made / "whole" / e["file"], verify_sha256=e["sha256"]) for e in whole["samples"]]
    assert len({e["sha256"] for e in whole["samples"]}) == 3 * PAIRS
    assert all(s["masks"].reshape(2, -1).sum(axis=1).min() > 0 and (s["labels"] == 1).any() for s in samples)

    # Shards by CT: shard 0 reads CTs 0 and 2, shard 1 CT 1, with all the pairs of each.
    assert [e["index"] for e in ds.load_manifest(made / "shard0")["samples"]] == [0, 1, 4, 5]
    assert [e["index"] for e in ds.load_manifest(made / "shard1")["samples"]] == [2, 3]
    assert ds.load_manifest(made / "shard1")["shard"] == {"index": 1, "count": 2}

    ds.merge_shards(tmp_path / "merged", [made / "shard1", made / "shard0"])  # any order
    files = _files(made / "whole")
    assert len(files) == 3 * PAIRS and _files(tmp_path / "merged") == files  # byte for byte
    assert _manifest(tmp_path / "merged") == _manifest(made / "whole")


def test_a_list_of_one_ct_gives_the_samples_of_prepare_ct(cts, made, tmp_path):
    single = ct_import.prepare_ct(cts / "p1" / "ct.nii.gz", cts / "p1" / "labels.nii.gz", "left", tmp_path / "one",
                                  grid=_tiny_grid(), pairs=PAIRS, geometry="generalised", seed=5, subject="p1-ct",
                                  config=_config())
    assert _files(single.parent) == {k: v for k, v in _files(made / "whole").items() if "p1-ct" in k}


def test_a_resumed_list_run_remakes_missing_and_damaged_samples_only(cts, made, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(made / "shard0", out)
    manifest = ds.load_manifest(out)
    gone, damaged = (out / manifest["samples"][i]["file"] for i in (1, 2))
    gone.unlink()
    damaged.write_bytes(b"not a sample")
    kept = out / manifest["samples"][0]["file"]
    kept_mtime = kept.stat().st_mtime_ns
    _make(cts / "cases.csv", out, shard=(0, 2))
    assert _files(out) == _files(made / "shard0") and _manifest(out) == _manifest(made / "shard0")
    assert kept.stat().st_mtime_ns == kept_mtime
    with pytest.raises(DataError, match="holds shard 0/2, not shard 1/2"):
        _make(cts / "cases.csv", out, shard=(1, 2))
    with pytest.raises(DataError, match="other parameters"):
        ct_import.prepare_ct_list(cts / "cases.csv", out, grid=_tiny_grid(), pairs=PAIRS, geometry="generalised",
                                  seed=6, config=_config(), shard=(0, 2))
    with pytest.raises(DataError, match="made from a list of CTs"):
        ct_import.prepare_ct(cts / "p1" / "ct.nii.gz", cts / "p1" / "labels.nii.gz", "left", out,
                             grid=_tiny_grid(), geometry="generalised", config=_config())


def test_merge_refuses_missing_and_foreign_prepare_ct_shards(made, tmp_path):
    with pytest.raises(DataError, match="shard.s. 1/2 missing"):
        ds.merge_shards(tmp_path / "a", [made / "shard0"])
    with pytest.raises(DataError, match="not a shard .made without prepare-ct --shard"):
        ds.merge_shards(tmp_path / "b", [made / "whole", made / "shard0"])
    unfinished = tmp_path / "unfinished"
    shutil.copytree(made / "shard1", unfinished)
    manifest = json.loads((unfinished / "manifest.json").read_text())
    manifest.update(complete=False, samples=manifest["samples"][:1])
    (unfinished / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="not finished .1 of 2 samples.; run its prepare-ct command again"):
        ds.merge_shards(tmp_path / "c", [made / "shard0", unfinished])


@pytest.mark.parametrize("text, message", [
    ("", "empty"),
    ("ct,labels\n", "missing side"),
    ("ct,labels,side,age\n", "unknown age"),
    ("ct,labels,side\n", "names no CT"),
    ("ct,labels,side\na.nii,b.nii,up\n", "line 2: side must be left or right"),
    ("ct,labels,side,split\na.nii,b.nii,left,holdout\n", "line 2: split must be one of"),
    ("ct,labels,side\na.nii,,left\n", "line 2: no labels"),
    ("ct,labels,side\na.nii,b.nii,left,extra\n", "line 2: more values than columns"),
    ("ct,labels,side,subject,split\na.nii,b.nii,left,x,train\n# c\nc.nii,d.nii,right,x,val\n",
     "lines 2 and 4: subject 'x' is in the train and the val split"),
])
def test_bad_case_lists_are_refused_with_their_line(tmp_path, text, message):
    (tmp_path / "cases.csv").write_text(text)
    with pytest.raises(ConfigError, match=message):
        ct_import.read_case_list(tmp_path / "cases.csv")


def test_an_unusable_ct_names_its_line_and_keeps_the_others(cts, tmp_path):
    root = tmp_path / "list"
    shutil.copytree(cts / "p1", root / "p1")
    (root / "empty").mkdir()
    data = np.zeros((8, 8, 8), np.uint8)
    from inference.geometry import VolumeGeometry

    geometry = VolumeGeometry.centered((8, 8, 8), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    write_volume(root / "empty" / "ct.nii.gz", data.astype(np.int16), geometry, dtype=np.int16)
    write_volume(root / "empty" / "labels.nii.gz", data, geometry, dtype=np.uint8)
    (root / "cases.csv").write_text("ct,labels,side\np1/ct.nii.gz,p1/labels.nii.gz,left\n"
                                    "empty/ct.nii.gz,empty/labels.nii.gz,right\n")
    with pytest.raises(DataError, match=r"line 3 of the case list \(empty/ct.nii.gz\): .*no voxel with the femur"):
        ct_import.prepare_ct_list(root / "cases.csv", tmp_path / "out", grid=_tiny_grid(), config=_config())
    manifest = ds.load_manifest(tmp_path / "out")
    assert not manifest["complete"] and [e["index"] for e in manifest["samples"]] == [0]
    assert sorted(p.name for p in (tmp_path / "out").rglob("*.npz")) == ["sp1-ct_000000.npz"]
    (root / "cases.csv").write_text("ct,labels,side\np1/ct.nii.gz,p1/labels.nii.gz,left\nnope.nii.gz,x.nii.gz,left\n")
    with pytest.raises(InputFileError, match="line 3 of the case list: ct nope.nii.gz not found"):
        ct_import.prepare_ct_list(root / "cases.csv", tmp_path / "out2", grid=_tiny_grid(), config=_config())


def test_prepare_ct_command_line_shards_and_merges(cts, made, tmp_path, capsys):
    from inference import cli

    extra = _extra_commands()
    common = ["--cases", str(cts / "cases.csv"), "--pairs", "1", "--no-realism", "--quiet", "--shard"]
    assert cli.run(["prepare-ct", "--out", str(tmp_path / "s1"), *common, "1/3"], extra=extra) == 0
    manifest = ds.load_manifest(tmp_path / "s1")
    assert manifest["grid"]["name"] == "compact" and [e["index"] for e in manifest["samples"]] == [1]
    assert manifest["shard"] == {"index": 1, "count": 3}
    assert cli.run(["prepare-ct", "--out", str(tmp_path / "m"), "--merge", str(tmp_path / "s1"), "--quiet"],
                   extra=extra) == 2
    assert "shard(s) 0/3, 2/3 missing" in capsys.readouterr().err
    assert cli.run(["prepare-ct", "--out", str(tmp_path / "x"), "--ct", "a.nii", "--labels", "b.nii", "--side", "left",
                    "--shard", "0/2"], extra=extra) == 2
    assert "--shard splits a list of CTs" in capsys.readouterr().err
    assert cli.run(["prepare-ct", "--out", str(tmp_path / "x"), "--ct", "a.nii"], extra=extra) == 2
    assert "missing --labels, --side" in capsys.readouterr().err
    assert cli.run(["prepare-ct", "--out", str(tmp_path / "x"), "--cases", str(cts / "cases.csv"), "--split", "val"],
                   extra=extra) == 2
    assert "--split with --cases" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_worker_processes_do_not_change_the_bytes(cts, made, tmp_path):
    _make(cts / "cases.csv", tmp_path / "parallel", workers=2)
    assert _files(tmp_path / "parallel") == _files(made / "whole")
    assert _manifest(tmp_path / "parallel") == _manifest(made / "whole")
