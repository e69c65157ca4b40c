"""The validation every option goes through: a wrong value raises a ``ValueError`` naming the field, the value
given and what was expected (with the valid choices where there is a list).

Shared by :mod:`gradwatch.config`, :mod:`gradwatch.cadence` and every family's config (``gradwatch.metrics``);
it imports nothing of gradwatch's, so every layer may use it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def fail(field_name: str, value: Any, expected: str) -> ValueError:
    """The ValueError every bad option raises: the field, the value given and what was expected."""
    return ValueError(f"gradwatch: `{field_name}` expected {expected}, got {value!r}")


def check_int(field_name: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise fail(field_name, value, f"an int >= {minimum}")
    return value


def check_float(field_name: str, value: Any, *, low: float, high: float, open_low: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise fail(field_name, value, f"a number in {'(' if open_low else '['}{low}, {high}]")
    if (value <= low if open_low else value < low) or value > high:
        raise fail(field_name, value, f"a number in {'(' if open_low else '['}{low}, {high}]")
    return float(value)


def check_choice(field_name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise fail(field_name, value, f"one of {list(choices)}")
    return value


def check_bool(field_name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise fail(field_name, value, "True or False")
    return value


def check_callable(field_name: str, value: Any, what: str) -> Any:
    if value is not None and not callable(value):
        raise fail(field_name, value, what)
    return value
