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


def check_int(field_name: str, value: Any, *, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or \
            (maximum is not None and value > maximum):
        raise fail(field_name, value, f"an int >= {minimum}" if maximum is None else f"an int in {minimum}..{maximum}")
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


def check_choices(field_name: str, value: Any, choices: Sequence[str]) -> tuple[str, ...]:
    """A non-empty list drawn from ``choices`` (not a str alone), as a tuple; the message shows the whole list."""
    from collections.abc import Iterable

    if isinstance(value, str) or not isinstance(value, Iterable):
        raise fail(field_name, value, f"a list drawn from {list(choices)}")
    items = tuple(value)
    wrong = [v for v in items if not isinstance(v, str) or v not in choices]
    if wrong or not items:
        what = f"{wrong[0]!r} is not one of them" if wrong else "it is empty"
        raise fail(field_name, value, f"a non-empty list drawn from {list(choices)} ({what})")
    return items


def check_bool(field_name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise fail(field_name, value, "True or False")
    return value


def check_callable(field_name: str, value: Any, what: str) -> Any:
    if value is not None and not callable(value):
        raise fail(field_name, value, what)
    return value
