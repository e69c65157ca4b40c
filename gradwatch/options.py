"""The general options of :class:`gradwatch.WatchConfig`, declared once.

Each :class:`Option` holds its name, type, default, help line, validation and knob. Every surface is derived
from :data:`GENERAL_OPTIONS`: ``WatchConfig``'s keywords and their checks, the callbacks' signature (which
LightningCLI reads), the knobs (HF ``gradwatch_<name>`` fields and flags, ``GRADWATCH_<NAME>`` variables,
``gradwatch run --<name>`` options) and the ``--help`` texts. The family options come from the registry
(:mod:`gradwatch.registry`); :mod:`gradwatch.knobs` derives their knobs from the families' config classes.

:data:`NOT_GIVEN` is what a surface holds for an option nobody set: the resolver
(:mod:`gradwatch.resolve`) never compares a value with its default to guess whether it was given.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Optional

from gradwatch.checks import check_bool, check_callable, check_choice, check_float, check_int, fail

ON_ERROR_CHOICES: tuple[str, ...] = ("warn", "raise")


class NotGivenType:
    """The type of :data:`NOT_GIVEN`: an option left out (so a lower surface, or the default, decides).

    A singleton, false, copied as itself; LightningCLI shows it as ``unset`` (a saved ``config.yaml`` reads
    back to it)."""

    _instance: NotGivenType | None = None
    TEXT = "unset"

    def __new__(cls) -> NotGivenType:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NOT_GIVEN"

    def __bool__(self) -> bool:
        return False

    def __copy__(self) -> NotGivenType:
        return self

    def __deepcopy__(self, memo: Any) -> NotGivenType:
        return self

    def __reduce__(self) -> str:
        return "NOT_GIVEN"


NOT_GIVEN = NotGivenType()


def _patterns(name: str, value: Any) -> tuple[str, ...]:
    """Glob patterns: a list of non-empty str (a str alone is one pattern); at least one for ``include``."""
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, Iterable) or not all(isinstance(p, str) and p for p in value):
        raise fail(name, value, "a list of non-empty glob patterns (str)")
    value = tuple(value)
    if name == "include" and not value:
        raise fail(name, value, "at least one glob pattern, e.g. ['*']")
    return value


def _log_dir(name: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise fail(name, value, "a directory path (str) or None")
    return value


def _max_overhead(name: str, value: Any) -> float | None:
    if value is None:
        return None
    check_float(name, value, low=0.0, high=1.0, open_low=False)
    return None if value == 0 else value


@dataclass(frozen=True)
class Option:
    """One general option of :class:`gradwatch.WatchConfig`.

    Attributes:
        name: the keyword (``max_overhead``).
        type: its annotation (for signatures: LightningCLI, ``help()``).
        default: its value when no surface sets it.
        help: one line (docstrings, ``--help``, HF field help).
        check: ``check(name, value) -> value``: raises the ValueError of :func:`gradwatch.checks.fail`, returns
            the value normalized (a str pattern becomes a tuple, ``max_overhead=0`` becomes None).
        knob: the scalar type of its knob (``str``, ``int``, ``float``, ``bool``), or None for no knob.
        sequence: its knob is a comma-separated list (``include``).
        choices: the valid values of a str knob.
        no_knob: why it has no knob (when ``knob`` is None).
    """

    name: str
    type: Any
    default: Any
    help: str
    check: Callable[[str, Any], Any]
    knob: type | None = None
    sequence: bool = False
    choices: tuple[str, ...] | None = None
    no_knob: str = ""


GENERAL_OPTIONS: tuple[Option, ...] = (
    Option("include", Sequence[str], ("*",), "glob patterns over parameter names (named_parameters()) to watch",
           _patterns, str, sequence=True),
    Option("exclude", Sequence[str], (), "glob patterns to leave out (applied after include)", _patterns, str,
           sequence=True),
    Option("embeddings", bool, False, "also watch embedding tables (large)", check_bool, bool),
    Option("output_head", bool, False, "also watch the output head (lm_head and weights tied to an embedding)",
           check_bool, bool),
    Option("log_dir", Optional[str], None, "where to write when the trainer has no TensorBoard writer of its own",
           _log_dir, str),
    Option("max_overhead", Optional[float], 0.05, "share of wall time gradwatch may use (0 or None: no budget)",
           _max_overhead, float),
    Option("on_error", Literal["warn", "raise"], "warn",
           "warn: a failing diagnostic warns once, logs NaN, training goes on; raise: strict (tests, CI)",
           lambda n, v: check_choice(n, v, ON_ERROR_CHOICES), str, choices=ON_ERROR_CHOICES),
    Option("probe_seed", int, 0, "seed of the probe-set draw (a private generator)",
           lambda n, v: check_int(n, v, minimum=0), int),
    Option("loss_fn", Optional[Callable[..., Any]], None,
           "loss_fn(model, batch) -> Tensor[B], the per-example loss on a probe batch",
           lambda n, v: check_callable(n, v, "a callable loss_fn(model, batch) -> Tensor[B]"),
           no_knob="a callable cannot be given as text: pass it in code (GradWatch(loss_fn=...))"),
    Option("on_alert", Optional[Callable[..., Any]], None, "on_alert(alert), called on rank zero for every alert",
           lambda n, v: check_callable(n, v, "a callable on_alert(alert) or None"),
           no_knob="a callable cannot be given as text: pass it in code (GradWatch(on_alert=...))"),
    Option("alert_cooldown", int, 200, "steps before the same alert rule may fire again",
           lambda n, v: check_int(n, v, minimum=0), int),
)

OPTIONS: dict[str, Option] = {o.name: o for o in GENERAL_OPTIONS}
DEFAULTS: dict[str, Any] = {o.name: o.default for o in GENERAL_OPTIONS}

__all__ = ["DEFAULTS", "GENERAL_OPTIONS", "NOT_GIVEN", "ON_ERROR_CHOICES", "OPTIONS", "NotGivenType", "Option"]
