"""The sample decoder of the streaming input (:func:`inference.data.dataset.read_npz_bytes`):
the arrays ``np.load`` gives, for the npz files HipAtlas writes and those numpy writes, with zlib
and with ISA-L (when installed); damaged files are refused, not misread.

That the streaming batches equal the sequential reader's, in order, is
``tests/test_distributed.py::test_streaming_input_gives_the_batches_of_the_sequential_reader``.
"""

from __future__ import annotations

import io
import zipfile
import zlib

import numpy as np
import pytest

from inference.data import dataset as ds
from inference.errors import InputFileError


def _inflaters():
    found = [pytest.param((zlib.decompress, (zlib.error,)), id="zlib")]
    try:
        from isal import isal_zlib
    except ImportError:
        found.append(pytest.param((None, None), id="isal", marks=pytest.mark.skip(reason="isal is not installed")))
    else:
        found.append(pytest.param((isal_zlib.decompress, (isal_zlib.error, zlib.error)), id="isal"))
    return found


@pytest.fixture(params=_inflaters())
def inflate(request, monkeypatch):
    function, errors = request.param
    monkeypatch.setattr(ds, "_inflate", function)
    monkeypatch.setattr(ds, "_INFLATE_ERRORS", errors)
    return function


def _arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    volume = np.round(rng.normal(0, 300, (12, 10, 14)).astype(np.float32) * 4) / 4
    return {
        "volume": volume,                                    # compressible float32 (as quantise_hu leaves it)
        "labels": (volume > 100).astype(np.uint8),
        "projection": rng.normal(size=(2, 3, 4)),            # float64
        "fortran": np.asfortranarray(rng.normal(size=(3, 5)).astype(np.float32)),
        "empty": np.zeros((0, 3), np.float32),
        "big": np.arange(300_000, dtype=np.int32).reshape(600, 500),  # > 1 MB: written at level 1
    }


def _np_load(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def _same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_hipatlas_and_numpy_npz_files_read_as_np_load_reads_them(tmp_path, inflate):
    arrays = _arrays()
    written = ds.write_npz(tmp_path / "a.npz", arrays).read_bytes()
    _same(ds.read_npz_bytes(written), arrays)
    _same(ds.read_npz_bytes(written), _np_load(written))
    arrays["scalar"] = np.array(7, np.int64)  # 0-d (write_npz stores it as (1,), as np.ascontiguousarray does)
    for save in (np.savez_compressed, np.savez):  # deflated with zip64 extras; stored
        buffer = io.BytesIO()
        save(buffer, **arrays)
        read = ds.read_npz_bytes(buffer.getvalue())
        _same(read, arrays)
        assert read["fortran"].flags.f_contiguous and not read["fortran"].flags.c_contiguous

    writable = ds.read_npz_bytes(written)["volume"]
    writable[0, 0, 0] = 1.0
    views = ds.read_npz_bytes(written, writable=False)
    assert not views["volume"].flags.writeable


def test_damaged_or_pickled_files_are_refused(tmp_path, inflate):
    data = ds.write_npz(tmp_path / "a.npz", _arrays()).read_bytes()
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        info = archive.getinfo("big.npy")
    middle = info.header_offset + 30 + len(info.filename) + info.compress_size // 2
    for damaged in (data[:middle],                                                 # truncated
                    data[:middle] + bytes([data[middle] ^ 0x55]) + data[middle + 1:],  # a flipped byte
                    b"not a zip"):
        with pytest.raises(InputFileError, match="x.npz: cannot read the sample"):
            ds.decode_sample(damaged, "x.npz")

    buffer = io.BytesIO()
    np.savez(buffer, names=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="object array"):
        ds.read_npz_bytes(buffer.getvalue())


def test_load_sample_reads_a_sample_through_the_same_decoder(tmp_path, inflate):
    rng = np.random.default_rng(3)
    volume = np.round(rng.normal(0, 200, (8, 6, 8)).astype(np.float32) * 4) / 4
    sample = {"volume": volume, "labels": (volume > 0).astype(np.uint8),
              "images": rng.random((2, 6, 8), dtype=np.float32), "masks": np.ones((2, 6, 8), np.uint8),
              "projection": rng.normal(size=(2, 3, 4)), "index_to_world": np.eye(4),
              "landmarks_mm": rng.normal(size=(5, 3)).astype(np.float32), "view_angles_deg": np.array([0.0, 90.0])}
    path = ds.write_npz(tmp_path / "s.npz", sample)
    _same(ds.load_sample(path), sample)
    path.write_bytes(path.read_bytes()[:-40])  # the central directory cut off
    with pytest.raises(InputFileError, match="s.npz: cannot read the sample"):
        ds.load_sample(path)
