"""inference.imageio_numpy: NIfTI-1 and MetaImage without SimpleITK, as SimpleITK reads and writes them.

The runtime installer has no SimpleITK (issue 20), so these check that (1) files written here read
back in SimpleITK with the same array, spacing, origin and direction and (2) files SimpleITK
writes, the shipped atlas and hand-made headers (qform/sform precedence, scaling, byte order,
units) read here exactly as SimpleITK reads them, and (3) with SimpleITK unimportable the
registration, the self-test's reader and the workstation's loaders give what they give with it.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from inference import imageio_numpy as inp
from inference import io as hio
from inference.errors import InputFileError, OutputError
from inference.geometry import VolumeGeometry

ROOT = pathlib.Path(__file__).resolve().parents[1]
SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd")
DTYPES = (np.uint8, np.int16, np.uint16, np.int32, np.float32, np.float64)
# NIfTI keeps spacing, origin and direction in float32 (relative to the value's size); MetaImage
# writes 17 significant digits, which read back exactly.
NIFTI_RTOL = 2e-7


def _rotation(rng: np.random.Generator, dimension: int) -> np.ndarray:
    """A random rotation, with a reflection half of the time (left-handed index axes)."""
    q, r = np.linalg.qr(rng.normal(size=(dimension, dimension)))
    q = q * np.sign(np.diag(r))[None, :]
    if rng.random() < 0.5:
        q[:, -1] *= -1.0
    return q


def _random_image(rng: np.random.Generator, dimension: int, dtype) -> inp.ImageData:
    shape = tuple(int(n) for n in rng.integers(2, 6, size=dimension))
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        array = rng.integers(max(info.min, -100_000), min(info.max, 100_000), size=shape, endpoint=True).astype(dtype)
    else:
        array = (rng.normal(size=shape) * 1000.0).astype(dtype)
    return inp.ImageData(array, tuple(rng.uniform(0.2, 3.0, size=dimension)), tuple(rng.uniform(-300, 300, dimension)),
                         tuple(_rotation(rng, dimension).reshape(-1)))


def _sitk_image(image: inp.ImageData) -> sitk.Image:
    out = sitk.GetImageFromArray(image.array, isVector=image.components > 1)
    out.SetSpacing(image.spacing)
    out.SetOrigin(image.origin)
    out.SetDirection(image.direction)
    return out


def _assert_same_as_sitk(ours: inp.ImageData, theirs: sitk.Image, rtol: float = 0.0) -> None:
    expected = sitk.GetArrayFromImage(theirs)
    assert ours.array.dtype == expected.dtype and ours.array.shape == expected.shape
    assert np.array_equal(ours.array, expected)
    for mine, its in ((ours.spacing, theirs.GetSpacing()), (ours.origin, theirs.GetOrigin()),
                      (ours.direction, theirs.GetDirection())):
        if rtol == 0.0:
            assert mine == tuple(its)
        else:
            np.testing.assert_allclose(mine, its, rtol=rtol, atol=rtol)


# --------------------------------------------------------------------------------------------
# Round trips with SimpleITK
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("dimension", (2, 3))
def test_our_files_read_in_simpleitk_as_written(tmp_path, suffix, dimension):
    rng = np.random.default_rng(100 + dimension + 10 * SUFFIXES.index(suffix))
    rtol = NIFTI_RTOL if suffix.startswith(".nii") else 0.0
    for dtype in DTYPES:
        image = _random_image(rng, dimension, dtype)
        path = tmp_path / f"ours_{np.dtype(dtype).name}{suffix}"
        inp.write_image(path, image)
        theirs = sitk.ReadImage(str(path))
        assert theirs.GetDimension() == dimension
        # what SimpleITK reads is what was written (to float32 precision for NIfTI) ...
        assert np.array_equal(sitk.GetArrayFromImage(theirs), image.array)
        assert sitk.GetArrayFromImage(theirs).dtype == image.array.dtype
        for written, read in ((image.spacing, theirs.GetSpacing()), (image.origin, theirs.GetOrigin()),
                              (image.direction, theirs.GetDirection())):
            np.testing.assert_allclose(read, written, rtol=rtol, atol=rtol * 300 if rtol else 0.0)
        # ... and reading it back here gives exactly what SimpleITK reads
        _assert_same_as_sitk(inp.read_image(path), theirs)


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("dimension", (2, 3))
def test_simpleitk_files_read_here_as_simpleitk_reads_them(tmp_path, suffix, dimension):
    rng = np.random.default_rng(200 + dimension + 10 * SUFFIXES.index(suffix))
    for dtype in DTYPES:
        image = _random_image(rng, dimension, dtype)
        path = tmp_path / f"sitk_{np.dtype(dtype).name}{suffix}"
        sitk.WriteImage(_sitk_image(image), str(path), suffix in (".nii.gz", ".mha"))
        _assert_same_as_sitk(inp.read_image(path), sitk.ReadImage(str(path)))


def test_multi_component_metaimage_both_ways(tmp_path):
    rng = np.random.default_rng(7)
    colour = inp.ImageData(rng.integers(0, 255, size=(5, 6, 3), dtype=np.uint8), (0.3, 0.4), (1.5, -2.0),
                           tuple(_rotation(rng, 2).reshape(-1)))
    inp.write_image(tmp_path / "ours.mha", colour)
    _assert_same_as_sitk(colour, sitk.ReadImage(str(tmp_path / "ours.mha")))
    sitk.WriteImage(_sitk_image(colour), str(tmp_path / "sitk.mha"))
    back = inp.read_image(tmp_path / "sitk.mha")
    assert back.components == 3
    _assert_same_as_sitk(back, sitk.ReadImage(str(tmp_path / "sitk.mha")))


@pytest.mark.parametrize("name", sorted(str(p.relative_to(ROOT / "resources" / "atlas"))
                                        for p in (ROOT / "resources" / "atlas").glob("*/*.nii.gz")))
def test_shipped_atlas_reads_as_in_simpleitk(name):
    path = ROOT / "resources" / "atlas" / name
    _assert_same_as_sitk(inp.read_image(path), sitk.ReadImage(str(path)))


# --------------------------------------------------------------------------------------------
# NIfTI headers other software writes: which transform, scaling, byte order, units
# --------------------------------------------------------------------------------------------

def _nifti(path: pathlib.Path, array: np.ndarray, order: str = "<", **fields) -> pathlib.Path:
    header = np.zeros((), dtype=inp._NIFTI1_HEADER)
    header["sizeof_hdr"] = 348
    header["magic"] = b"n+1"
    header["vox_offset"] = 352
    sizes = array.shape[::-1]
    header["dim"] = [len(sizes), *sizes, *([1] * (7 - len(sizes)))]
    header["datatype"] = inp._NIFTI_CODES[array.dtype]
    header["bitpix"] = 8 * array.dtype.itemsize
    header["pixdim"] = [1.0, 0.8, 1.2, 1.7, 0, 0, 0, 0]
    header["xyzt_units"] = 2
    for key, value in fields.items():
        header[key] = value
    path.write_bytes(header.astype(inp._NIFTI1_HEADER.newbyteorder(order)).tobytes() + b"\0" * 4
                     + array.astype(array.dtype.newbyteorder(order)).tobytes())
    return path


def _header_cases(rng: np.random.Generator) -> dict[str, dict]:
    rotation = _rotation(rng, 3)
    if np.linalg.det(rotation) < 0:
        rotation[:, 2] *= -1
    affine = np.eye(4)
    affine[:3, :3] = rotation
    b, c, d, _ = inp._mat44_to_quatern(affine)
    qform = dict(quatern_b=b, quatern_c=c, quatern_d=d, qoffset_x=5.0, qoffset_y=-7.0, qoffset_z=9.0)
    scales = np.diag([0.8, 1.2, 1.7])
    other = _rotation(rng, 3) @ scales

    def sform(matrix, offset):
        return dict(srow_x=[*matrix[0], offset[0]], srow_y=[*matrix[1], offset[1]], srow_z=[*matrix[2], offset[2]])

    sheared = other.copy()
    sheared[0, 1] += 0.5
    return {
        "no transform": {},
        "qform only": dict(qform_code=1, **qform),
        "sform only": dict(sform_code=2, **sform(other, (1, 2, 3))),
        "both, sform scanner wins": dict(qform_code=1, sform_code=1, **qform, **sform(other, (1, 2, 3))),
        "both differ, sform aligned: qform wins": dict(qform_code=1, sform_code=2, **qform, **sform(other, (1, 2, 3))),
        "both alike, sform mni": dict(qform_code=2, sform_code=4, **qform, **sform(rotation @ scales, (5, -7, 9.00001))),
        "sheared sform: qform wins": dict(qform_code=1, sform_code=1, **qform, **sform(sheared, (1, 2, 3))),
        "left-handed qform (qfac -1)": dict(qform_code=1, pixdim=[-1, 0.8, 1.2, 1.7, 0, 0, 0, 0], **qform),
        "unnormalised quaternion": dict(qform_code=1, quatern_b=0.9, quatern_c=0.5, quatern_d=0.3),
        "metres": dict(qform_code=1, xyzt_units=1, **qform),
        "zero and NaN spacing": dict(qform_code=1, pixdim=[1, 0, 1.2, np.nan, 0, 0, 0, 0], **qform),
        "int16 with slope and intercept": dict(qform_code=1, scl_slope=2.5, scl_inter=-3.0, **qform),
        "big-endian": dict(order=">", qform_code=1, **qform),
    }


def test_nifti_headers_read_as_in_simpleitk(tmp_path):
    rng = np.random.default_rng(11)
    array = rng.integers(-1000, 1000, size=(3, 4, 5)).astype(np.int16)
    for index, (name, fields) in enumerate(_header_cases(rng).items()):
        path = _nifti(tmp_path / f"case{index}.nii", array, **fields)
        ours = inp.read_image(path)
        # "both alike": ITK's own test of whether the two transforms agree is decided by rounding
        # noise (imageio_numpy._same_grid); either answer is within the 1e-4 they agree to
        _assert_same_as_sitk(ours, sitk.ReadImage(str(path)), rtol=2e-5 if "alike" in name else 0.0)
        if "slope" in name:
            assert ours.array.dtype == np.float32
            np.testing.assert_allclose(ours.array, array * 2.5 - 3.0)


@pytest.mark.parametrize("dtype", (np.uint8, np.int32, np.float32, np.float64))
def test_scaled_nifti_types_as_in_simpleitk(tmp_path, dtype):
    rng = np.random.default_rng(12)
    array = (rng.normal(size=(2, 3, 4)) * 100).astype(dtype) if np.dtype(dtype).kind == "f" \
        else rng.integers(0, 200, size=(2, 3, 4)).astype(dtype)
    path = _nifti(tmp_path / "scaled.nii", array, scl_slope=0.3, scl_inter=1.0)
    _assert_same_as_sitk(inp.read_image(path), sitk.ReadImage(str(path)))


def test_nifti_layouts_as_in_simpleitk(tmp_path):
    rng = np.random.default_rng(13)
    volume = rng.integers(0, 9, size=(3, 4, 5)).astype(np.uint8)
    # a 3D volume stored as 4D with one time point, a one-slice "3D" radiograph, RGB pixels
    paths = [_nifti(tmp_path / "t1.nii", volume[None], qform_code=1),
             _nifti(tmp_path / "slice.nii", volume[:1], qform_code=1)]
    header = np.zeros((), dtype=inp._NIFTI1_HEADER)
    header["sizeof_hdr"], header["magic"], header["vox_offset"] = 348, b"n+1", 352
    header["dim"], header["datatype"], header["bitpix"] = [2, 5, 4, 1, 1, 1, 1, 1], 128, 24
    header["pixdim"] = [1, 0.5, 0.25, 1, 0, 0, 0, 0]
    rgb = rng.integers(0, 255, size=(4, 5, 3)).astype(np.uint8)
    (tmp_path / "rgb.nii").write_bytes(header.tobytes() + b"\0" * 4 + rgb.tobytes())
    paths.append(tmp_path / "rgb.nii")
    for path in paths:
        _assert_same_as_sitk(inp.read_image(path), sitk.ReadImage(str(path)))


def test_unreadable_files_say_why(tmp_path):
    rng = np.random.default_rng(14)
    array = rng.integers(0, 9, size=(3, 4, 5)).astype(np.int16)
    good = _nifti(tmp_path / "good.nii", array, qform_code=1).read_bytes()
    cases = {
        "short.nii": (good[:200], "inside the 348-byte NIfTI header", True),
        "cut.nii": (good[:-7], "voxel data ends after 113 of 120 bytes", True),
        "cut.nii.gz": (gzip.compress(good)[:-20], "gzip stream is damaged", True),
        "two.nii": (good[:344] + b"ni1\0" + good[348:], "two-file NIfTI", False),
        "nifti2.nii": ((540).to_bytes(4, "little") + good[4:], "NIfTI-2", False),
        "junk.nii": (b"\x07" * 400, "not a NIfTI-1 file", True),
        "cut.mha": (b"ObjectType = Image\nNDims = 2\nDimSize = 4 4\nElementType = MET_SHORT\n"
                    b"ElementDataFile = LOCAL\n" + b"\0" * 10, "pixel data end after 10 of 32 bytes", True),
        "ascii.mha": (b"NDims = 2\nDimSize = 2 2\nBinaryData = False\nElementType = MET_UCHAR\n"
                      b"ElementDataFile = LOCAL\n1 2 3 4\n", "ASCII data", False),
    }
    for name, (content, reason, corrupt) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(inp.ImageFileError, match=reason) as caught:
            inp.read_image(tmp_path / name)
        assert isinstance(caught.value, InputFileError) and caught.value.corrupt is corrupt, name
        assert str(caught.value).startswith(str(tmp_path / name))
    vector = _nifti(tmp_path / "vector.nii", np.zeros((3, 1, 1, 4, 5), np.float32), intent_code=1007)
    with pytest.raises(inp.ImageFileError, match="vector images .* 3 values per voxel"):
        inp.read_image(vector)
    with pytest.raises(OutputError, match="cannot write pixels of type float16"):
        inp.write_image(tmp_path / "half.nii", inp.ImageData(np.zeros((2, 2), np.float16), (1, 1), (0, 0), (1, 0, 0, 1)))
    with pytest.raises(OutputError, match="unsupported image file type"):
        inp.write_image(tmp_path / "x.png", inp.ImageData(np.zeros((2, 2), np.uint8), (1, 1), (0, 0), (1, 0, 0, 1)))


# --------------------------------------------------------------------------------------------
# inference.io without SimpleITK
# --------------------------------------------------------------------------------------------

@pytest.fixture
def no_simpleitk(monkeypatch):
    """``import SimpleITK`` fails, as in the runtime installer (restored after the test)."""
    monkeypatch.setitem(sys.modules, "SimpleITK", None)
    assert hio._simpleitk() is None


def test_volumes_without_simpleitk_match_simpleitk(tmp_path, no_simpleitk):
    rng = np.random.default_rng(21)
    geometry = VolumeGeometry((6, 5, 4), (0.7, 1.3, 2.1), (12.5, -40.25, 7.0),
                              tuple(map(tuple, _rotation(rng, 3))))
    labels = rng.integers(0, 3, size=geometry.shape_zyx).astype(bool)
    written = hio.write_volume(tmp_path / "labels.nii.gz", labels, geometry, np.uint8)
    array, back = hio.read_volume(written)
    assert array.dtype == np.uint8 and np.array_equal(array, labels)
    np.testing.assert_allclose(back.index_to_world(), geometry.index_to_world(), atol=1e-4)
    # SimpleITK (imported before the fixture) reads the file the same way
    _assert_same_as_sitk(inp.read_image(written), sitk.ReadImage(str(written)))
    assert [p.name for p in tmp_path.iterdir()] == ["labels.nii.gz"]

    with pytest.raises(InputFileError, match=r"v\.nrrd: cannot read the volume: NRRD files .* need SimpleITK"):
        (tmp_path / "v.nrrd").write_bytes(b"NRRD0004\n")
        hio.read_volume(tmp_path / "v.nrrd")
    with pytest.raises(OutputError, match=r"w\.nrrd: cannot write the volume: NRRD files"):
        hio.write_volume(tmp_path / "w.nrrd", labels, geometry, np.uint8)
    (tmp_path / "cut.nii.gz").write_bytes(written.read_bytes()[:40])
    with pytest.raises(InputFileError, match=r"cut\.nii\.gz: cannot read the volume \(.*\); is it truncated"):
        hio.read_volume(tmp_path / "cut.nii.gz")


def test_radiographs_and_masks_without_simpleitk_match_simpleitk(tmp_path, monkeypatch):
    rng = np.random.default_rng(22)
    pixels = rng.normal(size=(1, 12, 16)).astype(np.float32)
    radiograph = sitk.GetImageFromArray(pixels)
    radiograph.SetSpacing((0.4, 0.6, 1.0))
    sitk.WriteImage(radiograph, str(tmp_path / "r.mha"), True)
    mask = np.zeros((12, 16), np.uint8)
    mask[3:8, 4:9] = 1
    sitk.WriteImage(sitk.GetImageFromArray(mask), str(tmp_path / "m.nii.gz"))
    with_sitk = hio.load_radiograph(tmp_path / "r.mha"), hio.load_mask(tmp_path / "m.nii.gz", (12, 16))
    monkeypatch.setitem(sys.modules, "SimpleITK", None)
    without = hio.load_radiograph(tmp_path / "r.mha"), hio.load_mask(tmp_path / "m.nii.gz", (12, 16))
    assert np.array_equal(without[0].pixels, with_sitk[0].pixels)
    assert without[0].pixel_spacing_mm == with_sitk[0].pixel_spacing_mm == pytest.approx((0.6, 0.4))
    assert np.array_equal(without[1], with_sitk[1])
    # a case written as NIfTI images without SimpleITK reads back in SimpleITK
    hio._write_image(tmp_path / "ap.nii.gz", pixels[0], "nifti")
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "ap.nii.gz"))), pixels[0])


_NO_SIMPLEITK = "import sys\nsys.modules['SimpleITK'] = None\n"


def test_runtime_modules_do_not_import_simpleitk():
    code = ("import sys\n"
            "import inference.io, inference.pipeline, inference.selftest, inference.mask_proposal, "
            "inference.data.atlas, inference.templating.plan, inference.dicom_results, app.session, app.cli\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'SimpleITK'))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_registration_without_simpleitk_gives_the_same_outputs(tmp_path):
    """The demo case without its masks (so the mask proposal runs too), ONNX backend: registered in a
    process where SimpleITK cannot be imported, then read back as the workstation and the
    templating read it; the outputs equal those of a registration with SimpleITK."""
    pytest.importorskip("onnxruntime")
    from inference.cli import run

    case = tmp_path / "case"
    case.mkdir()
    raw = json.loads((ROOT / "resources" / "demo" / "case.json").read_text())
    for view in raw["views"]:
        view.pop("mask", None)
        (case / view["image"]).write_bytes((ROOT / "resources" / "demo" / view["image"]).read_bytes())
    (case / "case.json").write_text(json.dumps(raw))

    out_without = tmp_path / "without"
    code = _NO_SIMPLEITK + (
        "import json\n"
        "from inference.cli import run\n"
        "from app.session import load_result\n"
        "from inference.templating.plan import native_hip_from_case_out\n"
        f"status = run(['register', {str(case)!r}, '--out', {str(out_without)!r}, '--backend', 'onnx', '--quiet'])\n"
        f"out = {str(out_without)!r}\n"
        "measurements = json.load(open(out + '/measurements.json'))\n"
        "loaded = load_result(out, measurements=measurements, landmarks_mm={}, warnings=[], report={}, files=None,\n"
        "                     view_names=['AP', 'LAT'])\n"
        "native = native_hip_from_case_out(out)\n"
        "print(json.dumps({'status': status, 'labels': int(loaded.labels.sum()),\n"
        "                  'volume': float(loaded.volume.sum()), 'grid': loaded.grid.index_to_world().tolist(),\n"
        "                  'sitk': sorted(m for m, mod in sys.modules.items() if mod is not None and m.split('.')[0] == 'SimpleITK')}))\n")
    env = {k: v for k, v in os.environ.items() if k != "HIPATLAS_BACKEND"}
    env.update(PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["status"] == 0 and answer["sitk"] == []

    out_with = tmp_path / "with"
    assert run(["register", str(case), "--out", str(out_with), "--backend", "onnx", "--quiet"]) == 0
    for name in ("measurements.json", "femur_surface.stl", "overlay_AP.png", "overlay_LAT.png",
                 "silhouette_AP.json", "silhouette_LAT.json"):
        assert (out_without / name).read_bytes() == (out_with / name).read_bytes(), name
    report = json.loads((out_without / "report.json").read_text())
    assert report["model"]["backend"] == "onnx" and "mask_proposal" in report
    for name in ("femur_labels.nii.gz", "warped_atlas.nii.gz"):
        ours = inp.read_image(out_without / name)
        theirs = sitk.ReadImage(str(out_with / name))
        # the same voxels and the same geometry (both files hold it in float32)
        _assert_same_as_sitk(ours, theirs)
        _assert_same_as_sitk(ours, sitk.ReadImage(str(out_without / name)))
    labels, grid = hio.read_volume(out_with / "femur_labels.nii.gz")
    volume, _ = hio.read_volume(out_with / "warped_atlas.nii.gz")
    assert answer["labels"] == int(labels.sum())
    assert answer["volume"] == pytest.approx(float(volume.sum()), rel=1e-12)
    np.testing.assert_array_equal(answer["grid"], grid.index_to_world())


def test_quaternion_round_trip_matches_niftilib():
    # _mat44_to_quatern then niftilib's _quatern_to_mat44 gives the rotation back (both handednesses)
    rng = np.random.default_rng(31)
    for _ in range(20):
        rotation = _rotation(rng, 3)
        affine = np.eye(4)
        affine[:3, :3] = rotation
        b, c, d, qfac = inp._mat44_to_quatern(affine)
        back = inp._quatern_to_mat44(b, c, d, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, qfac)
        np.testing.assert_allclose(back[:3, :3], rotation, atol=1e-6)
        assert qfac == (1.0 if np.linalg.det(rotation) > 0 else -1.0)
    assert math.isclose(float(np.linalg.det(inp._quatern_to_mat44(0, 0, 1, 0, 0, 0, 1, 1, 1, 1)[:3, :3])), 1.0)


def test_a_command_that_needs_simpleitk_stops_with_one_line(monkeypatch, capsys, tmp_path):
    from inference import cli
    from inference.data import ct_import

    def no_simpleitk(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'SimpleITK'", name="SimpleITK")

    monkeypatch.setattr(ct_import, "prepare_ct", no_simpleitk)
    argv = ["prepare-ct", "--ct", "ct.nii.gz", "--labels", "labels.nii.gz", "--side", "right", "--out", str(tmp_path)]
    assert cli.run(argv) == cli.EXIT_BAD_INPUT
    assert capsys.readouterr().err.strip().splitlines() == [
        "hipatlas: error: prepare-ct needs the package SimpleITK, which this installation does not have "
        "(registration reads and writes NIfTI/MetaImage without it)"]
