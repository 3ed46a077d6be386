"""Tests for inference.io: case round trips, radiograph formats, DICOM, errors, NIfTI, atomic writes."""

from __future__ import annotations

import json
import logging
import pathlib

import numpy as np
import pytest
import SimpleITK as sitk
import tifffile
from PIL import Image

from inference import geometry as g
from inference import io as hio
from inference.checksums import sha256_file
from inference.errors import CalibrationError, CaseFormatError, InputFileError, OutputError

ROWS, COLS = 24, 32


def _carm(lao_deg: float, **kw) -> g.CArmView:
    base = dict(sdd_mm=1000.0, sid_mm=925.0, lao_deg=lao_deg, cranial_deg=0.0, rows=ROWS, cols=COLS, pixel_mm=0.5)
    base.update(kw)
    return g.CArmView(**base)


def _views(rng: np.random.Generator, image_dtype=np.float32) -> list[dict]:
    views = []
    for name, lao in (("AP", 0.0), ("LAT", 90.0)):
        image = rng.uniform(-3.0, 7.0, size=(ROWS, COLS)).astype(image_dtype)
        mask = np.zeros((ROWS, COLS), dtype=np.uint8)
        mask[5:15, 8:20] = 1
        # Offsets and an odd principal point give P entries with many significant digits.
        P = g.projection_matrix(_carm(lao, principal_point_px=(15.123456789, 11.987654321),
                                      isocentre_mm=(1.0 / 3.0, -2.0 / 7.0, 5.5)))
        views.append({"name": name, "image": image, "mask": mask, "P": P})
    return views


def _write_json(path: pathlib.Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1), encoding="utf-8")


@pytest.fixture()
def case_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    """A valid PNG case written by write_case (tests then damage it)."""
    return hio.write_case(tmp_path / "case", "right", _views(np.random.default_rng(0)))


def _edit_case(case: pathlib.Path, edit) -> None:
    raw = json.loads((case / "case.json").read_text())
    edit(raw)
    _write_json(case / "case.json", raw)


# ------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("image_format", ["png", "tiff", "nifti"])
def test_write_case_load_case_round_trip(tmp_path, image_format):
    views = _views(np.random.default_rng(1))
    out = hio.write_case(tmp_path / "c", "left", views, image_format=image_format)
    case = hio.load_case(out)
    assert case.side == "left"
    assert [v.name for v in case.views] == ["AP", "LAT"]
    assert case.raw["format"] == "hipatlas-case/1"
    for written, view in zip(views, case.views):
        # Bit-identical P: json writes repr() of each double.
        assert view.P.dtype == np.float64 and np.array_equal(view.P, written["P"])
        assert view.projection is view.P
        assert view.calibration.source == "case.json projection_matrix"
        assert view.image.pixels.dtype == np.float32 and view.image.shape == (ROWS, COLS)
        assert np.array_equal(view.mask, written["mask"] != 0)
        assert view.mask_path is not None and view.mask_path.name.endswith(".png")
        image = written["image"].astype(np.float64)
        if image_format == "png":
            # float images are scaled linearly to the full 16-bit range.
            expected = (image - image.min()) * 65535.0 / (image.max() - image.min())
            assert np.max(np.abs(view.image.pixels - expected)) <= 0.5 + 1e-3
            assert view.image.pixels.min() == 0 and view.image.pixels.max() == 65535
        else:
            assert np.array_equal(view.image.pixels, written["image"])
        assert view.image.source_format == {"png": "png", "tiff": "tiff", "nifti": "nifti"}[image_format]
        assert view.image.sha256 == sha256_file(view.image_path)
    # The atomic writer leaves no temporary siblings behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_png_uint16_image_is_stored_unchanged(tmp_path):
    views = _views(np.random.default_rng(2))
    ints = np.random.default_rng(3).integers(0, 65536, size=(ROWS, COLS)).astype(np.uint16)
    views[0]["image"] = ints
    case = hio.load_case(hio.write_case(tmp_path / "c", "right", views))
    assert np.array_equal(case.views[0].image.pixels, ints.astype(np.float32))
    with Image.open(case.views[0].image_path) as im:
        assert im.mode.startswith("I;16") or im.mode == "I"


def test_load_radiograph_8bit_png_and_grey_rgb(tmp_path, caplog):
    arr = np.arange(ROWS * COLS, dtype=np.uint8).reshape(ROWS, COLS)
    Image.fromarray(arr).save(tmp_path / "g8.png")
    radio = hio.load_radiograph(tmp_path / "g8.png")
    assert np.array_equal(radio.pixels, arr.astype(np.float32)) and radio.pixel_spacing_mm is None
    Image.fromarray(np.stack([arr] * 3, axis=2)).save(tmp_path / "rgb_grey.png")
    with caplog.at_level(logging.WARNING, logger="inference.io"):
        radio = hio.load_radiograph(tmp_path / "rgb_grey.png")
    assert np.array_equal(radio.pixels, arr.astype(np.float32))
    assert "3 channels" in caplog.text


def test_colour_png_radiograph_is_refused(tmp_path):
    rgb = np.zeros((ROWS, COLS, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb).save(tmp_path / "colour.png")
    with pytest.raises(InputFileError, match=r"colour\.png: colour image"):
        hio.load_radiograph(tmp_path / "colour.png")


def test_tiff_miniswhite_is_inverted(tmp_path):
    arr = np.arange(ROWS * COLS, dtype=np.uint16).reshape(ROWS, COLS) * 7
    tifffile.imwrite(tmp_path / "w.tif", arr, photometric="miniswhite")
    radio = hio.load_radiograph(tmp_path / "w.tif")
    assert np.array_equal(radio.pixels, (65535.0 - arr).astype(np.float32))


def test_mha_one_slice_3d_and_spacing(tmp_path):
    arr = np.random.default_rng(4).normal(size=(1, ROWS, COLS)).astype(np.float32)
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing((0.4, 0.6, 1.0))  # x = column pitch, y = row pitch
    sitk.WriteImage(image, str(tmp_path / "r.mha"))
    radio = hio.load_radiograph(tmp_path / "r.mha")
    assert radio.source_format == "mha"
    assert np.array_equal(radio.pixels, arr[0])
    assert radio.pixel_spacing_mm == pytest.approx((0.6, 0.4))


def test_mask_any_nonzero_is_femur_tiff(tmp_path):
    mask = np.zeros((ROWS, COLS), dtype=np.uint8)
    mask[2:4, 3:9] = 1
    mask[10, 10] = 255
    tifffile.imwrite(tmp_path / "m.tif", mask)
    loaded = hio.load_mask(tmp_path / "m.tif", (ROWS, COLS))
    assert loaded.dtype == bool and np.array_equal(loaded, mask != 0)


# ------------------------------------------------------------------------------------ DICOM
def _write_dicom(path, stored, *, photometric="MONOCHROME2", bits_stored=12, slope=None, intercept=None,
                 geometry=None, frames=1, modality="DX"):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sop_class = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PatientName = "Test^Patient"
    ds.PatientID = "secret-id"
    ds.Rows, ds.Columns = stored.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    if slope is not None:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
        ds.RescaleType = "US"
    for key, value in (geometry or {}).items():
        setattr(ds, key, value)
    ds.PixelData = np.ascontiguousarray(stored, dtype="<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_dicom_monochrome1_rescale_and_meta(tmp_path):
    stored = np.random.default_rng(5).integers(0, 4096, size=(ROWS, COLS)).astype(np.uint16)
    path = _write_dicom(tmp_path / "a.dcm", stored, photometric="MONOCHROME1", slope="2", intercept="-100",
                        geometry={"ImagerPixelSpacing": [0.5, 0.25]})
    radio = hio.load_radiograph(path)
    # MONOCHROME1 low = bright: reflected within the rescaled 12-bit range so that larger = more
    # attenuation: out = lo + hi - (2 s - 100) with lo = -100, hi = 2 * 4095 - 100.
    expected = 2.0 * (4095.0 - stored.astype(np.float64)) - 100.0
    assert np.array_equal(radio.pixels, expected.astype(np.float32))
    assert radio.source_format == "dicom"
    assert radio.pixel_spacing_mm == (0.5, 0.25)
    assert radio.dicom_meta["PhotometricInterpretation"] == "MONOCHROME1"
    assert radio.dicom_meta["RescaleSlope"] == 2.0
    assert "PatientName" not in radio.dicom_meta and "PatientID" not in radio.dicom_meta
    json.dumps(radio.dicom_meta)  # report.json-ready
    # Higher stored value = less attenuation in MONOCHROME1, so the order must reverse.
    flat = stored.ravel()
    i, j = int(np.argmin(flat)), int(np.argmax(flat))
    assert radio.pixels.ravel()[i] > radio.pixels.ravel()[j]


def test_dicom_monochrome2_rescale(tmp_path):
    stored = np.random.default_rng(6).integers(0, 4096, size=(ROWS, COLS)).astype(np.uint16)
    path = _write_dicom(tmp_path / "b.dcm", stored, slope="0.5", intercept="10")
    radio = hio.load_radiograph(path)
    assert np.allclose(radio.pixels, 0.5 * stored + 10.0)


def test_dicom_multiframe_uses_first_frame(tmp_path, caplog):
    stored = np.random.default_rng(7).integers(0, 4096, size=(3, ROWS, COLS)).astype(np.uint16)
    path = _write_dicom(tmp_path / "mf.dcm", stored, modality="XA", frames=3)
    with caplog.at_level(logging.WARNING, logger="inference.io"):
        radio = hio.load_radiograph(path)
    assert np.array_equal(radio.pixels, stored[0].astype(np.float32))
    assert "3 frames" in caplog.text


def test_dicom_ct_modality_is_refused(tmp_path):
    path = _write_dicom(tmp_path / "ct.dcm", np.ones((ROWS, COLS), np.uint16), modality="CT")
    with pytest.raises(InputFileError, match="ct.dcm: DICOM modality CT"):
        hio.load_radiograph(path)


@pytest.mark.parametrize("primary_deg, source_mm", [(0.0, (0.0, 800.0, 0.0)), (90.0, (-800.0, 0.0, 0.0))])
def test_dicom_geometry_tags_define_P(tmp_path, primary_deg, source_mm):
    tags = {"ImagerPixelSpacing": [0.6, 0.4], "DistanceSourceToDetector": "1000",
            "DistanceSourceToPatient": "800", "PositionerPrimaryAngle": str(primary_deg),
            "PositionerSecondaryAngle": "0"}
    case = tmp_path / "case"
    case.mkdir()
    stored = np.random.default_rng(8).integers(0, 4096, size=(ROWS, COLS)).astype(np.uint16)
    _write_dicom(case / "ap.dcm", stored, geometry=tags)
    P_lat = g.projection_matrix(_carm(90.0))
    _write_json(case / "case.json", {
        "format": "hipatlas-case/1", "side": "right",
        "views": [{"name": "AP", "image": "ap.dcm"},
                  {"name": "LAT", "image": "ap.dcm", "projection_matrix": P_lat.tolist()}]})
    loaded = hio.load_case(case)
    view = loaded.views[0]
    assert view.calibration.source == "dicom-tags"
    # The same C-arm parameters through geometry.projection_matrix (DICOM detector angle alpha =
    # source at alpha + 180, image seen from the detector), equal up to scale.
    expected = g.projection_matrix(g.CArmView(
        sdd_mm=1000.0, sid_mm=800.0, lao_deg=primary_deg + 180.0, cranial_deg=0.0, rows=ROWS, cols=COLS,
        pixel_mm=0.4, pixel_v_mm=0.6, viewed_from="detector"))
    scale = np.linalg.norm(expected) / np.linalg.norm(view.P)
    assert np.allclose(view.P * scale, expected, rtol=0, atol=1e-12 * np.abs(expected).max())
    # Known answers independent of that mapping: DICOM primary angle 0 = detector anterior
    # (source posterior, +y); +90 = LAO, detector at the patient's left, source at the right (-x).
    assert np.allclose(g.source_position(view.P), source_mm, atol=1e-6)
    uv = g.project_points(view.P, np.zeros((1, 3)))[0]
    assert np.allclose(uv, ((COLS - 1) / 2.0, (ROWS - 1) / 2.0), atol=1e-9)
    # An explicit matrix wins over the DICOM tags.
    assert loaded.views[1].calibration.source == "case.json projection_matrix"
    assert np.array_equal(loaded.views[1].P, P_lat)


def test_dicom_without_geometry_tags_needs_matrix(tmp_path):
    case = tmp_path / "case"
    case.mkdir()
    _write_dicom(case / "ap.dcm", np.ones((ROWS, COLS), np.uint16), geometry={"ImagerPixelSpacing": [0.5, 0.5]})
    P = g.projection_matrix(_carm(90.0))
    _write_json(case / "case.json", {"format": "hipatlas-case/1", "side": "right", "views": [
        {"name": "AP", "image": "ap.dcm"}, {"name": "LAT", "image": "ap.dcm", "projection_matrix": P.tolist()}]})
    with pytest.raises(CalibrationError, match=r"ap\.dcm.*DistanceSourceToDetector"):
        hio.load_case(case)


# ------------------------------------------------------------------------------------ bad inputs
def test_missing_image_file(case_dir):
    (case_dir / "lat.png").unlink()
    with pytest.raises(InputFileError, match=r"lat\.png: image file not found.*views\[1\]\.image"):
        hio.load_case(case_dir)


def test_missing_case_json_and_folder(tmp_path):
    with pytest.raises(InputFileError, match="case folder not found"):
        hio.load_case(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputFileError, match=r"case\.json: case\.json not found"):
        hio.load_case(tmp_path / "empty")


def test_truncated_png(case_dir):
    data = (case_dir / "ap.png").read_bytes()
    (case_dir / "ap.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputFileError, match=r"ap\.png: cannot read the PNG file.*truncated"):
        hio.load_case(case_dir)


def test_truncated_dicom(tmp_path):
    path = _write_dicom(tmp_path / "t.dcm", np.ones((ROWS, COLS), np.uint16))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 300])
    with pytest.raises(InputFileError, match=r"t\.dcm: cannot"):
        hio.load_radiograph(path)


def test_not_an_image(tmp_path):
    (tmp_path / "x.png").write_bytes(b"hello world, not a png")
    with pytest.raises(InputFileError, match=r"x\.png: named \.png but is not a PNG"):
        hio.load_radiograph(tmp_path / "x.png")
    (tmp_path / "empty.tif").write_bytes(b"")
    with pytest.raises(InputFileError, match=r"empty\.tif: the file is empty"):
        hio.load_radiograph(tmp_path / "empty.tif")


def test_mask_of_another_size(case_dir):
    Image.fromarray(np.full((ROWS + 1, COLS), 255, np.uint8)).save(case_dir / "ap_mask.png")
    with pytest.raises(InputFileError, match=rf"ap_mask\.png: the mask is {ROWS + 1} x {COLS} .* {ROWS} x {COLS}"):
        hio.load_case(case_dir)


def test_empty_mask(case_dir):
    Image.fromarray(np.zeros((ROWS, COLS), np.uint8)).save(case_dir / "lat_mask.png")
    with pytest.raises(InputFileError, match=r"lat_mask\.png: the mask is empty"):
        hio.load_case(case_dir)


@pytest.mark.parametrize(
    "edit, pattern",
    [
        (lambda r: r.update(format="hipatlas-case/2"), r'"format" is "hipatlas-case/2", expected "hipatlas-case/1"'),
        (lambda r: r.pop("format"), r'"format" is missing'),
        (lambda r: r.update(side="R"), r'"side" is "R", expected "right" or "left"'),
        (lambda r: r.update(views=r["views"][:1]), r'"views" has 1 entries, expected exactly 2'),
        (lambda r: r.update(views=r["views"] + r["views"][:1]), r'"views" has 3 entries, expected exactly 2'),
        (lambda r: r["views"][1].update(projection_matrix=[row[:3] for row in r["views"][1]["projection_matrix"]]),
         r"views\[1\]\.projection_matrix has 3x3 entries, expected 3x4"),
        (lambda r: r["views"][0]["projection_matrix"][1].__setitem__(2, "x"),
         r'views\[0\]\.projection_matrix\[1\]\[2\] is "x", expected a number'),
        (lambda r: r["views"][0]["projection_matrix"].__setitem__(2, [0.0, 0.0, 0.0, 1.0]),
         r"views\[0\]\.projection_matrix is rank-deficient"),
        (lambda r: r["views"][0].pop("image"), r"views\[0\]\.image is missing"),
        (lambda r: r["views"][0].update(name=""), r"views\[0\]\.name is \"\", expected a non-empty text"),
        (lambda r: r["views"][1].update(name="AP"), r"both views are named 'AP'"),
        (lambda r: r["views"][0].update(image="/etc/passwd"), r"views\[0\]\.image is the absolute path"),
        (lambda r: r["views"][0].update(image="../other/ap.png"),
         r"views\[0\]\.image '\.\./other/ap\.png' points outside"),
        (lambda r: r["views"][0].pop("projection_matrix"), r"views\[0\]\.projection_matrix is missing"),
    ],
)
def test_case_json_errors_name_the_field(case_dir, edit, pattern):
    _edit_case(case_dir, edit)
    with pytest.raises(CaseFormatError, match=r"case\.json: " + pattern):
        hio.load_case(case_dir)


def test_non_finite_projection_matrix(case_dir):
    raw = json.loads((case_dir / "case.json").read_text())
    raw["views"][0]["projection_matrix"][0][0] = float("nan")
    (case_dir / "case.json").write_text(json.dumps(raw))  # Python writes the non-JSON token NaN
    with pytest.raises(CaseFormatError, match=r"case\.json: contains NaN"):
        hio.load_case(case_dir)
    # 1e999 is valid JSON syntax but overflows to infinity.
    raw["views"][0]["projection_matrix"][0][0] = "INF"
    (case_dir / "case.json").write_text(json.dumps(raw).replace('"INF"', "1e999"))
    with pytest.raises(CaseFormatError, match=r"case\.json: views\[0\]\.projection_matrix\[0\]\[0\] is inf"):
        hio.load_case(case_dir)


def test_invalid_json(case_dir):
    (case_dir / "case.json").write_text('{"format": "hipatlas-case/1",')
    with pytest.raises(CaseFormatError, match=r"case\.json: not valid JSON \(line 1"):
        hio.load_case(case_dir)


def test_unknown_keys_are_warned_not_fatal(case_dir, caplog):
    _edit_case(case_dir, lambda r: (r.update(comment="hi"), r["views"][0].update(kvp=70)))
    with caplog.at_level(logging.WARNING, logger="inference.io"):
        case = hio.load_case(case_dir)
    assert case.raw["comment"] == "hi"
    assert "unknown key 'comment'" in caplog.text and "views[0].'kvp'" in caplog.text


def test_subfolder_and_backslash_paths_are_allowed(case_dir):
    (case_dir / "img").mkdir()
    (case_dir / "ap.png").rename(case_dir / "img" / "ap.png")
    _edit_case(case_dir, lambda r: r["views"][0].update(image="img\\ap.png"))
    case = hio.load_case(case_dir)
    assert case.views[0].image_path == case_dir / "img" / "ap.png"


def test_write_case_refuses_bad_input_and_existing_folder(tmp_path):
    views = _views(np.random.default_rng(9))
    with pytest.raises(CaseFormatError, match="exactly 2 views, not 1"):
        hio.write_case(tmp_path / "a", "right", views[:1])
    with pytest.raises(CaseFormatError, match='side is "up"'):
        hio.write_case(tmp_path / "a", "up", views)
    bad = [dict(views[0]), views[1]]
    bad[0]["P"] = np.zeros((3, 4))
    with pytest.raises(Exception, match="rank-deficient"):
        hio.write_case(tmp_path / "a", "right", bad)
    assert not (tmp_path / "a").exists()
    hio.write_case(tmp_path / "a", "right", views)
    with pytest.raises(OutputError, match="not empty"):
        hio.write_case(tmp_path / "a", "right", views)
    views[0]["mask"] = None
    hio.write_case(tmp_path / "a", "right", views, overwrite=True)
    case = hio.load_case(tmp_path / "a")
    assert case.views[0].mask is None and case.views[0].mask_path is None
    assert not (tmp_path / "a" / "ap_mask.png").exists()  # old content replaced, not merged


# ------------------------------------------------------------------------------------ atomic output
def test_atomic_output_dir_leaves_nothing_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with hio.atomic_output_dir(tmp_path / "out") as tmp:
            (tmp / "half.json").write_text("{")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    # A failed overwrite keeps the previous result intact.
    with hio.atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with hio.atomic_output_dir(tmp_path / "out", overwrite=True) as tmp:
            (tmp / "a.txt").write_text("new")
            raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (tmp_path / "out" / "a.txt").read_text() == "old"
    with hio.atomic_output_dir(tmp_path / "out", overwrite=True) as tmp:
        (tmp / "b.txt").write_text("new")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_write_json_atomic_exact_floats_and_nan(tmp_path):
    values = np.random.default_rng(10).normal(size=20) * 1e3
    hio.write_json_atomic(tmp_path / "v.json", {"x": values, "n": np.int64(3), "f": np.float32(0.5)})
    back = json.loads((tmp_path / "v.json").read_text())
    assert np.array_equal(np.array(back["x"]), values) and back["n"] == 3 and back["f"] == 0.5
    with pytest.raises(OutputError, match=r"bad\.json: cannot write JSON"):
        hio.write_json_atomic(tmp_path / "bad.json", {"x": float("nan")})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.json"]


def test_write_png_atomic_overlay_rgb(tmp_path):
    rgb = np.random.default_rng(11).integers(0, 256, size=(ROWS, COLS, 3)).astype(np.uint8)
    hio.write_png_atomic(tmp_path / "o.png", rgb)
    assert np.array_equal(np.array(Image.open(tmp_path / "o.png")), rgb)
    with pytest.raises(OutputError, match="float64"):
        hio.write_png_atomic(tmp_path / "f.png", np.zeros((4, 4)))


# ------------------------------------------------------------------------------------ volumes
def test_nifti_round_trip_keeps_geometry(tmp_path):
    c, s = np.cos(0.4), np.sin(0.4)
    rotation = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ np.array(
        [[1.0, 0.0, 0.0], [0.0, np.cos(0.3), -np.sin(0.3)], [0.0, np.sin(0.3), np.cos(0.3)]])
    geometry = g.VolumeGeometry((5, 6, 7), (0.7, 0.9, 1.3), (-12.5, 40.25, 101.0), tuple(map(tuple, rotation)))
    labels = np.random.default_rng(12).integers(0, 3, size=(5, 6, 7)).astype(np.uint8)
    path = hio.write_volume(tmp_path / "labels.nii.gz", labels, geometry, np.uint8)
    array, back = hio.read_volume(path)
    assert array.dtype == np.uint8 and np.array_equal(array, labels)
    assert back.shape_zyx == geometry.shape_zyx
    # NIfTI keeps geometry in float32.
    assert np.allclose(back.spacing_xyz_mm, geometry.spacing_xyz_mm, atol=1e-6)
    assert np.allclose(back.origin_mm, geometry.origin_mm, atol=1e-4)
    assert np.allclose(back.direction, geometry.direction, atol=1e-6)
    assert np.allclose(back.index_to_world(), geometry.index_to_world(), atol=1e-4)
    intensities = np.random.default_rng(13).normal(size=(5, 6, 7))
    hio.write_volume(tmp_path / "warped.nii.gz", intensities, geometry, np.float32)
    array, _ = hio.read_volume(tmp_path / "warped.nii.gz")
    assert array.dtype == np.float32 and np.array_equal(array, intensities.astype(np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.nii.gz", "warped.nii.gz"]


def test_volume_errors(tmp_path):
    geometry = g.VolumeGeometry((4, 4, 4), (1.0, 1.0, 1.0))
    with pytest.raises(Exception, match=r"shape \(4, 4, 5\)"):
        hio.write_volume(tmp_path / "v.nii.gz", np.zeros((4, 4, 5)), geometry)
    with pytest.raises(InputFileError, match=r"v\.nii\.gz: volume file not found"):
        hio.read_volume(tmp_path / "v.nii.gz")
    hio.write_volume(tmp_path / "v.nii.gz", np.zeros((4, 4, 4)), geometry, np.int16)
    data = (tmp_path / "v.nii.gz").read_bytes()
    (tmp_path / "v.nii.gz").write_bytes(data[:40])
    with pytest.raises(InputFileError, match=r"v\.nii\.gz: cannot read the volume"):
        hio.read_volume(tmp_path / "v.nii.gz")
    assert [p.name for p in tmp_path.iterdir()] == ["v.nii.gz"]
