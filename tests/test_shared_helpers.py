"""The one way to do each small thing: atomic file and folder writes, sha256, safe file names."""

from __future__ import annotations

import hashlib
import os
import pathlib
import stat

import numpy as np
import pytest

from inference import io
from inference.checksums import sha256_bytes, sha256_file
from inference.errors import DataError, OutputError


def _listing(folder: pathlib.Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------------------------
# atomic_file
# --------------------------------------------------------------------------------------------

def test_atomic_file_replaces_whole_with_plain_permissions(tmp_path):
    target = tmp_path / "sub" / "out.bin"
    with io.atomic_file(target, ".bin") as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".out.bin.") and tmp.suffix == ".bin"
        tmp.write_bytes(b"new")
        assert not target.exists()  # nothing visible before the end
    assert target.read_bytes() == b"new" and _listing(target.parent) == ["out.bin"]
    assert stat.S_IMODE(target.stat().st_mode) == io.plain_mode()


def test_atomic_file_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with io.atomic_file(target, ".json") as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old" and _listing(tmp_path) == ["out.json"]


def test_writers_built_on_atomic_file_leave_nothing_half_written(tmp_path):
    from inference.data.dataset import write_npz
    from inference.mesh import Mesh, read_stl, write_stl

    good = {"a": np.arange(6, dtype=np.float32).reshape(2, 3)}
    path = write_npz(tmp_path / "sample.npz", good)
    before = path.read_bytes()
    # The second array is refused after the first one was written into the temporary file.
    with pytest.raises(DataError, match="dtype object"):
        write_npz(path, {"a": good["a"], "b": np.array([None, 1], dtype=object)})
    assert path.read_bytes() == before and _listing(tmp_path) == ["sample.npz"]
    with np.load(path) as loaded:
        np.testing.assert_array_equal(loaded["a"], good["a"])

    tetra = Mesh(np.array([[0, 0, 0], [10, 0, 0], [0, 10, 0], [0, 0, 10]], float),
                 np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]]))
    stl = write_stl(tmp_path / "surface.stl", tetra)
    np.testing.assert_allclose(read_stl(stl).volume_mm3(), tetra.volume_mm3())
    assert tetra.volume_mm3() == pytest.approx(1000 / 6)
    assert _listing(tmp_path) == ["sample.npz", "surface.stl"]


def test_atomic_output_dir_replaces_a_folder_whole_or_not_at_all(tmp_path):
    final = tmp_path / "model"
    final.mkdir()
    (final / "old.keras").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with io.atomic_output_dir(final, overwrite=True) as staging:
            (staging / "new.keras").write_text("half")
            raise KeyboardInterrupt
    assert _listing(final) == ["old.keras"] and _listing(tmp_path) == ["model"]
    with io.atomic_output_dir(final, overwrite=True) as staging:
        (staging / "new.keras").write_text("new")
    assert _listing(final) == ["new.keras"] and _listing(tmp_path) == ["model"]
    with pytest.raises(OutputError, match="not empty"):
        with io.atomic_output_dir(final) as staging:
            pass


# --------------------------------------------------------------------------------------------
# sha256
# --------------------------------------------------------------------------------------------

def test_sha256_of_files_and_bytes_match_hashlib(tmp_path):
    data = np.random.default_rng(4).bytes(3 * (1 << 20) + 17)  # spans several read blocks
    path = tmp_path / "blob"
    path.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert sha256_file(path) == sha256_bytes(data) == expected
    assert sha256_bytes(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    with pytest.raises(FileNotFoundError):
        sha256_file(tmp_path / "missing")


def test_every_module_uses_the_one_sha256_helper():
    """No second file-hashing helper comes back: hashlib.sha256 over a file lives in checksums only."""
    root = pathlib.Path(__file__).resolve().parents[1]
    offenders = []
    for path in sorted([*root.glob("inference/**/*.py"), *root.glob("app/**/*.py"), *root.glob("tools/*.py")]):
        text = path.read_text(encoding="utf-8")
        if path.name == "checksums.py":
            continue
        if "def sha256" in text or "def file_sha256" in text or "def _sha256" in text:
            offenders.append(str(path.relative_to(root)))
    assert not offenders, offenders


# --------------------------------------------------------------------------------------------
# safe names
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("AP", "AP"),
    ("lateral", "lateral"),
    ("AP  view/1", "AP_view_1"),
    ("  oblique (30°) ", "oblique_30"),
    ("Schrägaufnahme", "Schr_gaufnahme"),
    ("left-hip_2", "left-hip_2"),
    ("../../etc", "etc"),
    ("///", "view"),
    ("", "view"),
])
def test_safe_name_rule(name, expected):
    assert io.safe_name(name) == expected
    assert os.sep not in io.safe_name(name) and not io.safe_name(name).startswith(".")


def test_safe_name_fallback_and_case_files_agree(tmp_path):
    assert io.safe_name("***", "view2") == "view2"
    views = [{"name": "AP  view", "image": np.zeros((8, 8), np.uint16), "P": np.eye(3, 4)},
             {"name": "***", "image": np.zeros((8, 8), np.uint16), "P": np.eye(3, 4)[[1, 0, 2]]}]
    case_dir = io.write_case(tmp_path / "case", "right", views)
    names = sorted(p.stem for p in pathlib.Path(case_dir).glob("*.png"))
    assert names == ["ap_view", "view1"]
