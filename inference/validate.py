"""Checks of numbers and choices, with one message style for the library and the command line.

Every message reads ``"<what> must be <rule>, not <value>"``, for example::

    CArmView rows must be a whole number >= 1 (an empty detector has no pixels), not 0
    TissueParams noise_sigma_hu must be a number in [0, 200], not 300.0
    ViewSampling sdd_mm must be a number > 0, not -3
    RealismRanges gamma must be a (min, max) pair with 0 < min <= max, not (1.5, 1.0)
    argument --rows: value must be a whole number >= 1, not 0     (argparse adds the flag)

The caller names the value (``what``, with its owner: ``"CArmView rows"``) and chooses the
exception type, because the type says which input was wrong (:class:`~inference.errors.ConfigError`
for parameters, :class:`~inference.errors.GeometryError` for geometry,
:class:`~inference.errors.CaseFormatError` for a file's content); the wording is the same
everywhere. :func:`cli_int` and :func:`cli_number` turn the same checks into ``argparse`` types,
so a command-line flag and a library argument fail with the same sentence.

Only the standard library (cheap to import anywhere, TensorFlow-free modules included); no exceptions other than the one the caller passes.
"""

from __future__ import annotations

import argparse
import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any

from inference.errors import ConfigError

__all__ = ["positive_int", "whole_number", "number", "range_pair", "choice", "cli_int", "cli_number"]


def _show(value: Any) -> str:
    """A value as it was given: ``3``, ``0.0``, ``0.5`` (not ``np.float64(0.5)``), strings quoted."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return repr(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    return repr(float(value))


def _bound(value: float) -> str:
    return f"{value:g}"


def _interval(low: float, high: float, low_open: bool = False, high_open: bool = False) -> str:
    """``in [0, 1]``, ``in (0, 20]``, ``>= 0``, ``> 0``, ``<= 5`` or ``finite``."""
    if math.isinf(low) and math.isinf(high):
        return ""
    if math.isinf(high):
        return f" {'>' if low_open else '>='} {_bound(low)}"
    if math.isinf(low):
        return f" {'<' if high_open else '<='} {_bound(high)}"
    return f" in {'(' if low_open else '['}{_bound(low)}, {_bound(high)}{')' if high_open else ']'}"


def whole_number(value: Any, what: str, low: float = -math.inf, high: float = math.inf, *,
                 error: type[Exception] = ConfigError, hint: str = "") -> int:
    """``value`` as an int within ``[low, high]``.

    Integers (also numpy's) and floats with no fraction (``512.0`` from JSON) are accepted;
    booleans, fractions, text and NaN are refused with ``error``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
            isinstance(value, numbers.Integral) or (math.isfinite(float(value)) and float(value).is_integer())):
        raise error(f"{what} must be a whole number{_interval(low, high)}{hint}, not {_show(value)}")
    result = int(value)
    if not low <= result <= high:
        raise error(f"{what} must be a whole number{_interval(low, high)}{hint}, not {_show(value)}")
    return result


def positive_int(value: Any, what: str, *, error: type[Exception] = ConfigError, hint: str = "") -> int:
    """``value`` as an int >= 1 (see :func:`whole_number`)."""
    return whole_number(value, what, 1, math.inf, error=error, hint=hint)


def number(value: Any, what: str, low: float = -math.inf, high: float = math.inf, *,
           low_open: bool = False, high_open: bool = False, error: type[Exception] = ConfigError) -> float:
    """``value`` as a finite float within the interval (closed unless ``low_open``/``high_open``)."""
    try:
        result = float(value)
    except (TypeError, ValueError):
        result = math.nan
    inside = (math.isfinite(result) and (low < result if low_open else low <= result)
              and (result < high if high_open else result <= high))
    if isinstance(value, bool) or not inside:
        rule = _interval(low, high, low_open, high_open)
        raise error(f"{what} must be a {'number' + rule if rule else 'finite number'}, not {_show(value)}")
    return result


def range_pair(value: Any, what: str, low: float = -math.inf, high: float = math.inf, *,
               low_open: bool = False, error: type[Exception] = ConfigError) -> tuple[float, float]:
    """A ``(min, max)`` pair of finite floats with ``low <= min <= max <= high`` (``low < min``
    with ``low_open``)."""
    try:
        items = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        items = ()
    if (len(items) != 2 or not all(math.isfinite(v) for v in items) or not items[0] <= items[1] <= high
            or not (low < items[0] if low_open else low <= items[0])):
        bounds = (f"{_bound(low)} {'<' if low_open else '<='} " if not math.isinf(low) else "") + "min <= max" + (
            f" <= {_bound(high)}" if not math.isinf(high) else "")
        shown = "(" + ", ".join(_show(v) for v in value) + ")" if isinstance(value, (tuple, list)) else _show(value)
        raise error(f"{what} must be a (min, max) pair with {bounds}, not {shown}")
    return items  # type: ignore[return-value]


def choice(value: Any, what: str, choices: Iterable[Any], *, error: type[Exception] = ConfigError) -> Any:
    """``value`` if it is one of ``choices``, else ``error`` listing them."""
    options = list(choices)
    if value not in options:
        listed = ", ".join(repr(c) for c in options)
        raise error(f"{what} must be one of {listed}, not {_show(value)}")
    return value


def _cli_type(convert: Callable[[str], Any], check: Callable[[Any], Any], name: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return check(convert(text))
        except (ValueError, TypeError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = name  # argparse names the type in "invalid <name> value" messages
    return parse


def cli_int(low: float = 1, high: float = math.inf) -> Callable[[str], int]:
    """An ``argparse`` type: a whole number in ``[low, high]`` (default >= 1), same message as
    :func:`whole_number` (argparse puts the flag name in front)."""

    def convert(text: str) -> Any:
        try:
            return int(text)
        except ValueError:
            return text

    return _cli_type(convert, lambda v: whole_number(v, "value", low, high, error=ValueError), "whole number")


def cli_number(low: float = -math.inf, high: float = math.inf, *, low_open: bool = False) -> Callable[[str], float]:
    """An ``argparse`` type: a finite number in the interval, same message as :func:`number`."""

    def convert(text: str) -> Any:
        try:
            return float(text)
        except ValueError:
            return text

    return _cli_type(convert, lambda v: number(v, "value", low, high, low_open=low_open, error=ValueError),
                     "number")
