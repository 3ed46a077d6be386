"""Several trained models averaged (inference.backends.EnsembleBackend): resources/models/DEFAULT
naming several folders, the mean of the members' fields, and registration through them."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from inference import backends, ensemble as ensemble_lib
from inference.errors import ModelError
from inference.model_config import ModelConfig
from inference.resources import (RESOURCES_ENV, check_models, default_model_file, default_model_files,
                                 models_dir)

ROOT = pathlib.Path(__file__).resolve().parents[1]


class _FixedBackend(backends.InferenceBackend):
    """A member that answers every input with one constant displacement (voxels, z y x)."""

    name = "fixed"

    def __init__(self, shift_zyx, config=ModelConfig(), affine=0.0):
        super().__init__(config, {"name": f"fixed{tuple(shift_zyx)}", "sha256": f"sha{shift_zyx[0]}"}, None)
        self.shift = np.asarray(shift_zyx, np.float32)
        self.affine = affine
        self.calls = 0

    def run(self, inputs):
        self.calls += 1
        shape = tuple(self.config.shape_zyx)
        psi = np.broadcast_to(self.shift, (1, *shape, 3)).copy()
        return {"psi": psi, "affine_params": np.full((1, 7), self.affine, np.float32),
                "warped_labels": np.zeros((1, *shape, 1), np.float32)}


def test_members_fields_are_averaged_and_the_labels_follow_the_mean():
    from inference.registration import atlas_for

    up, down = _FixedBackend((2, 0, 0), affine=1.0), _FixedBackend((-2, 0, 0), affine=3.0)
    pair = backends.EnsembleBackend([up, down])
    out = pair.run({})
    assert up.calls == down.calls == 1
    assert np.allclose(out["psi"], 0.0) and np.allclose(out["affine_params"], 2.0)
    atlas = atlas_for(pair)
    # a zero mean field leaves the atlas labels where they are
    assert np.array_equal(out["warped_labels"][0, ..., 0].astype(np.uint8), np.asarray(atlas.labels, np.uint8))
    # unequal members: the labels are those of the mean field (one voxel up)
    out = backends.EnsembleBackend([_FixedBackend((2, 0, 0)), _FixedBackend((0, 0, 0))]).run({})
    assert np.allclose(out["psi"][..., 0], 1.0)
    expected = ensemble_lib.warped_labels(atlas.labels, out["psi"][0])
    assert np.array_equal(out["warped_labels"][0, ..., 0], expected)
    assert (expected[:-1] == np.asarray(atlas.labels)[1:]).all()
    identity = pair.identity()
    assert identity["sha256"] == "sha2 + sha-2" and [m["name"] for m in identity["members"]] == \
        ["fixed(2, 0, 0)", "fixed(-2, 0, 0)"]


def test_members_of_different_grids_are_refused():
    other = ModelConfig(grid="paper", shape_zyx=(192, 128, 192), detector_hw=(160, 224),
                        spacing_xyz_mm=(0.664, 0.664, 1.0))
    with pytest.raises(ModelError, match="cannot be averaged"):
        backends.EnsembleBackend([_FixedBackend((0, 0, 0)), _FixedBackend((0, 0, 0), config=other)])
    with pytest.raises(Exception, match="at least two"):
        backends.EnsembleBackend([_FixedBackend((0, 0, 0))])


def _fake_model(folder: pathlib.Path, name: str) -> pathlib.Path:
    model = folder / name
    model.mkdir(parents=True)
    (model / "m.keras").write_bytes(name.encode())
    (model / "model_card.json").write_text(json.dumps({"model_file": "m.keras"}))
    return model / "m.keras"


def test_default_names_several_folders_one_per_line(tmp_path, monkeypatch):
    from inference import registration

    monkeypatch.setenv(RESOURCES_ENV, str(tmp_path))
    folder = models_dir()
    a, b, _ = _fake_model(folder, "a"), _fake_model(folder, "b"), _fake_model(folder, "c")
    (folder / "DEFAULT").write_text("b\n\na\n")
    assert default_model_files() == [b, a] and default_model_file() == b
    assert registration.default_model_paths() == [b, a]
    (folder / "DEFAULT").write_text("b\nmissing\n")
    assert any("'missing'" in problem.message for problem in check_models()[0])
    with pytest.raises(ModelError, match="missing"):
        default_model_files()
    (folder / "DEFAULT").unlink()
    assert default_model_files() == [a]


def test_load_backend_averages_two_shipped_models_and_registration_reports_both(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from inference import pipeline
    from inference.resources import demo_dir

    folders = sorted(p.parent for p in models_dir().glob("*/*.onnx"))
    if len(folders) < 2:
        pytest.skip("fewer than two shipped models with an ONNX export")
    pair = backends.load_backend(folders[:2], "onnx")
    assert isinstance(pair, backends.EnsembleBackend) and [m.path.parent for m in pair.members] == folders[:2]
    seen: dict[str, list] = {"pair": [], "members": []}

    def recording(run, into):
        return lambda inputs: seen[into].append(run(inputs)) or seen[into][-1]

    for member in pair.members:  # cached backends: monkeypatch puts their run back
        monkeypatch.setattr(member, "run", recording(member.run, "members"))
    monkeypatch.setattr(pair, "run", recording(pair.run, "pair"))
    for _ in pipeline.register_case(demo_dir(), tmp_path / "out", model=pair, ensemble=False, refine=False):
        pass
    first, second = seen["members"][-2:]
    assert not np.allclose(first["psi"], second["psi"], atol=0.05)  # two different networks
    assert np.allclose(seen["pair"][-1]["psi"], (first["psi"] + second["psi"]) / 2, atol=1e-5)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    model = report["model"]
    assert report["ensemble"] == {"passes": 1, "models": 2}
    assert model["name"] == " + ".join(folder.name for folder in folders[:2])
    assert [m["sha256"] for m in model["members"]] == [m.identity()["sha256"] for m in pair.members]
    assert model["sha256"] == " + ".join(m.identity()["sha256"] for m in pair.members)


def test_about_box_names_every_model_of_the_default(tmp_path, monkeypatch):
    from app.session import describe_model

    monkeypatch.setenv(RESOURCES_ENV, str(tmp_path))
    folder = models_dir()
    for name in ("one", "two"):
        keras_file = _fake_model(folder, name)
        (keras_file.parent / "model_card.json").write_text(json.dumps(
            {"model_file": "m.keras", "name": f"model-{name}", "sha256": f"{name}-sha"}))
    (folder / "DEFAULT").write_text("two\none\n")
    described = describe_model(None)
    assert described["id"] == "model-two + model-one"
    assert [m["sha256"] for m in described["members"]] == ["two-sha", "one-sha"]
    alone = describe_model(folder / "one")
    assert alone["id"] == "model-one" and alone["sha256"] == "one-sha" and "members" not in alone


def test_report_provenance_records_every_averaged_model(tmp_path):
    from inference.checksums import sha256_file
    from inference.provenance import provenance, provenance_markdown

    a, b = _fake_model(tmp_path, "a"), _fake_model(tmp_path, "b")
    pair = provenance([a, b], command=["bench"])
    assert [m["sha256"] for m in pair["models"]] == [sha256_file(a), sha256_file(b)]
    assert pair["model_sha256"] == sha256_file(a)  # the first, where readers expect one model
    text = provenance_markdown(pair)
    assert "`a/m.keras`" in text and "`b/m.keras`" in text and sha256_file(b) in text
    single = provenance(a, command=["bench"])
    assert "models" not in single and f"sha256 `{sha256_file(a)}`" in provenance_markdown(single)
