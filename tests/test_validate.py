"""inference.validate: one message style for range, whole-number and choice checks, in the library
and on the command line."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest

from inference import validate as V
from inference.errors import CaseFormatError, ConfigError, DataError, GeometryError


@pytest.mark.parametrize("value, low, high, expected", [
    (3, 1, math.inf, 3),
    (np.int64(7), 1, math.inf, 7),
    (512.0, 1, math.inf, 512),  # JSON numbers may come as floats
    (0, 0, 10, 0),
    (10, 0, 10, 10),
])
def test_whole_number_accepts_integral_values(value, low, high, expected):
    result = V.whole_number(value, "x", low, high)
    assert result == expected and type(result) is int


@pytest.mark.parametrize("value, low, high, message", [
    (0, 1, math.inf, "CArmView rows must be a whole number >= 1, not 0"),
    (2.5, 1, math.inf, "CArmView rows must be a whole number >= 1, not 2.5"),
    (True, 1, math.inf, "CArmView rows must be a whole number >= 1, not True"),
    ("12", 1, math.inf, "CArmView rows must be a whole number >= 1, not '12'"),
    (float("nan"), 1, math.inf, "CArmView rows must be a whole number >= 1, not nan"),
    (np.int64(1), 2, 4096, "CArmView rows must be a whole number in [2, 4096], not 1"),
    (None, 0, math.inf, "CArmView rows must be a whole number >= 0, not None"),
])
def test_whole_number_refusals_read_the_same(value, low, high, message):
    with pytest.raises(ConfigError) as info:
        V.whole_number(value, "CArmView rows", low, high)
    assert str(info.value) == message


def test_positive_int_takes_the_callers_error_type_and_hint():
    with pytest.raises(GeometryError) as info:
        V.positive_int(0, "CArmView rows", error=GeometryError, hint=" (an empty detector has no pixels)")
    assert str(info.value) == "CArmView rows must be a whole number >= 1 (an empty detector has no pixels), not 0"


@pytest.mark.parametrize("value, kwargs, message", [
    (300.0, dict(low=0, high=200), "TissueParams noise_sigma_hu must be a number in [0, 200], not 300.0"),
    (0.0, dict(low=0, low_open=True), "TissueParams noise_sigma_hu must be a number > 0, not 0.0"),
    (-0.5, dict(low=0), "TissueParams noise_sigma_hu must be a number >= 0, not -0.5"),
    (20.0, dict(low=0, high=20, high_open=True), "TissueParams noise_sigma_hu must be a number in [0, 20), not 20.0"),
    (float("inf"), {}, "TissueParams noise_sigma_hu must be a finite number, not inf"),
    ("a lot", dict(low=0, high=200), "TissueParams noise_sigma_hu must be a number in [0, 200], not 'a lot'"),
    (np.float32(250), dict(low=0, high=200), "TissueParams noise_sigma_hu must be a number in [0, 200], not 250.0"),
])
def test_number_refusals_read_the_same(value, kwargs, message):
    with pytest.raises(DataError) as info:
        V.number(value, "TissueParams noise_sigma_hu", error=DataError, **kwargs)
    assert str(info.value) == message


def test_number_returns_a_float_inside_the_interval():
    assert V.number("2.5", "x", 0, 5) == 2.5
    assert V.number(np.float32(0.25), "x", 0, 1) == 0.25
    assert V.number(5, "x", 0, 5) == 5.0 and V.number(-1e300, "x") == -1e300


def test_range_pair():
    assert V.range_pair((0.8, 1.25), "gamma", 0, low_open=True) == (0.8, 1.25)
    with pytest.raises(ConfigError) as info:
        V.range_pair((1.5, 1.0), "RealismRanges gamma", 0, low_open=True)
    assert str(info.value) == "RealismRanges gamma must be a (min, max) pair with 0 < min <= max, not (1.5, 1.0)"
    with pytest.raises(ConfigError, match=r"pair with 0 <= min <= max <= 1, not \(0.1, 0.2, 0.3\)"):
        V.range_pair((0.1, 0.2, 0.3), "x", 0, 1)
    with pytest.raises(ConfigError, match=r"pair with 0 < min <= max, not \(0.0, 1.0\)"):
        V.range_pair((0.0, 1.0), "x", 0, low_open=True)


def test_choice():
    assert V.choice("png", "image_format", ("png", "nifti")) == "png"
    with pytest.raises(CaseFormatError) as info:
        V.choice("jpeg", "image_format", ("png", "nifti"), error=CaseFormatError)
    assert str(info.value) == "image_format must be one of 'png', 'nifti', not 'jpeg'"


def _parser():
    parser = argparse.ArgumentParser(prog="hipatlas", exit_on_error=False)
    parser.add_argument("--rows", type=V.cli_int(1))
    parser.add_argument("--seed", type=V.cli_int(0))
    parser.add_argument("--step-mm", type=V.cli_number(0, 20, low_open=True))
    return parser


@pytest.mark.parametrize("argv, message", [
    (["--rows", "0"], "argument --rows: value must be a whole number >= 1, not 0"),
    (["--rows", "many"], "argument --rows: value must be a whole number >= 1, not 'many'"),
    (["--seed", "-1"], "argument --seed: value must be a whole number >= 0, not -1"),
    (["--step-mm", "0"], "argument --step-mm: value must be a number in (0, 20], not 0.0"),
])
def test_command_line_types_give_the_library_sentence(argv, message):
    with pytest.raises(argparse.ArgumentError) as info:
        _parser().parse_args(argv)
    assert str(info.value) == message


def test_command_line_types_convert():
    args = _parser().parse_args(["--rows", "768", "--seed", "0", "--step-mm", "0.5"])
    assert (args.rows, args.seed, args.step_mm) == (768, 0, 0.5)


def test_library_call_sites_use_the_one_style():
    """Parameters of geometry, phantoms, shape and realism augmentation fail with the same wording."""
    from inference.data.augment import RealismParams
    from inference.data.phantom import TissueParams
    from inference.data.shape import ShapeParams
    from inference.geometry import CArmView

    with pytest.raises(GeometryError, match=r"^CArmView rows must be a whole number >= 1 \(an empty detector"):
        CArmView(sdd_mm=1000.0, sid_mm=925.0, lao_deg=0.0, cranial_deg=0.0, rows=0, cols=10, pixel_mm=0.5)
    with pytest.raises(ConfigError, match=r"^ShapeParams global_scale must be a number in \[0.5, 2\], not 3.0$"):
        ShapeParams(global_scale=3.0)
    with pytest.raises(DataError, match=r"^TissueParams noise_sigma_hu must be a number in \[0, 200\], not 300.0$"):
        TissueParams(noise_sigma_hu=300.0)
    with pytest.raises(ConfigError, match=r"^RealismParams gamma must be a number > 0, not 0.0$"):
        RealismParams(gamma=0.0)
