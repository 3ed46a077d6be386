"""Sharded data set generation (``synth --shard I/N``) and ``synth --merge``: the merged data set
is byte for byte the one an unsharded run with the same seed makes; damaged, missing or foreign
shards are refused."""

from __future__ import annotations

import json
import pathlib

import pytest

from inference.data import dataset as ds
from inference.errors import ConfigError, DataError, InputFileError
from test_dataset import FEMURS, _config, _extra_commands, _models, _tiny_grid, femur_model  # noqa: F401

N = 5


def _make(out, model, shard=None, seed=7):
    return ds.generate_dataset(out, N, _tiny_grid(), "generalised", seed=seed, workers=1, femurs=FEMURS,
                               models=_models(model), config=_config(), shard=shard)


def _files(folder: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}


def _manifest(folder: pathlib.Path) -> dict:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.pop("updated")
    return manifest


@pytest.fixture(scope="module")
def made(tmp_path_factory, femur_model):
    root = tmp_path_factory.mktemp("shards")
    _make(root / "whole", femur_model)
    for index in range(2):
        _make(root / f"shard{index}", femur_model, shard=(index, 2))
    return root


def test_sharded_synth_and_merge_equal_an_unsharded_run(made, tmp_path):
    shard0 = ds.load_manifest(made / "shard0")
    assert shard0["shard"] == {"index": 0, "count": 2} and shard0["complete"]
    assert [e["index"] for e in shard0["samples"]] == [0, 2, 4]
    assert [e["index"] for e in ds.load_manifest(made / "shard1")["samples"]] == [1, 3]

    ds.merge_shards(tmp_path / "merged", [made / "shard1", made / "shard0"])  # any order
    whole, merged = _files(made / "whole"), _files(tmp_path / "merged")
    assert len(whole) == N and whole == merged  # the same sample files, byte for byte
    assert _manifest(tmp_path / "merged") == _manifest(made / "whole")

    # Merging again into the same folder keeps what is there (resume) and changes nothing.
    ds.merge_shards(tmp_path / "merged", [made / "shard0", made / "shard1"])
    assert _files(tmp_path / "merged") == whole


def test_merge_refuses_missing_foreign_unfinished_and_damaged_shards(made, tmp_path, femur_model):
    with pytest.raises(DataError, match="shard.s. 1/2 missing"):
        ds.merge_shards(tmp_path / "a", [made / "shard0"])
    with pytest.raises(DataError, match="both shard 0/2"):
        ds.merge_shards(tmp_path / "b", [made / "shard0", made / "shard0"])
    with pytest.raises(DataError, match="not a shard"):
        ds.merge_shards(tmp_path / "c", [made / "whole", made / "shard0"])
    _make(tmp_path / "other_seed", femur_model, shard=(1, 2), seed=8)
    with pytest.raises(DataError, match="different data sets .parameters differs"):
        ds.merge_shards(tmp_path / "d", [made / "shard0", tmp_path / "other_seed"])

    # an unfinished shard (its manifest says so, as after a cancelled or killed run)
    unfinished = tmp_path / "unfinished"
    _copy_tree(made / "shard1", unfinished)
    manifest = json.loads((unfinished / "manifest.json").read_text())
    manifest.update(complete=False, samples=manifest["samples"][:1])
    (unfinished / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="not finished .1 of 2 samples.; run its synth command again"):
        ds.merge_shards(tmp_path / "e", [made / "shard0", unfinished])

    # a damaged sample file: refused by its checksum, and no partial file is left in the output
    damaged = tmp_path / "damaged"
    _copy_tree(made / "shard1", damaged)
    victim = damaged / ds.load_manifest(damaged)["samples"][0]["file"]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(InputFileError, match="checksum differs from its shard's manifest"):
        ds.merge_shards(tmp_path / "f", [made / "shard0", damaged])
    left = [p for p in (tmp_path / "f").rglob("*") if p.is_file()]
    assert not [p for p in left if ".tmp-" in p.name]
    assert not (tmp_path / "f" / victim.relative_to(damaged)).exists()
    assert ds.load_manifest(tmp_path / "f")["complete"] is False

    # a shard folder cannot be resumed as another shard
    with pytest.raises(DataError, match="holds shard 0/2, not shard 1/2"):
        _make(made / "shard0", femur_model, shard=(1, 2))


def test_shard_text_is_checked():
    assert ds.parse_shard("3/8") == (3, 8) and ds.parse_shard((0, 1)) == (0, 1)
    for bad in ("8/8", "1", "a/b", "-1/4", "0/0"):
        with pytest.raises(ConfigError, match="--shard"):
            ds.parse_shard(bad)


def test_synth_command_merges_and_refuses_bad_shards(made, tmp_path, capsys):
    from inference import cli

    status = cli.run(["synth", "--out", str(tmp_path / "m"), "--merge", str(made / "shard0"), str(made / "shard1"),
                      "--quiet"], extra=_extra_commands())
    assert status == 0 and _files(tmp_path / "m") == _files(made / "whole")
    assert cli.run(["synth", "--out", str(tmp_path / "x"), "--subjects", "4", "--shard", "4/4"],
                   extra=_extra_commands()) == 2
    assert "I must be 0..N-1" in capsys.readouterr().err
    assert cli.run(["synth", "--out", str(tmp_path / "y")], extra=_extra_commands()) == 2
    assert "--subjects" in capsys.readouterr().err


def _copy_tree(source: pathlib.Path, target: pathlib.Path) -> None:
    import shutil

    shutil.copytree(source, target)
