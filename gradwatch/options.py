"""The general options of :class:`gradwatch.WatchConfig`, declared once.

Each :class:`Option` holds its name, type, default, help line, validation and knob. Every surface is derived
from :data:`GENERAL_OPTIONS`: ``WatchConfig``'s keywords and their checks, the callbacks' signature (which
LightningCLI reads), the knobs (HF ``gradwatch_<name>`` fields and flags, ``GRADWATCH_<NAME>`` variables,
``gradwatch run --<name>`` options) and the ``--help`` texts. The family options come from the registry
(:mod:`gradwatch.registry`); :func:`knobs` derives their knobs from the families' config classes when called
(the public home of the knobs is :mod:`gradwatch.knobs`).

:data:`NOT_GIVEN` is what a surface holds for an option nobody set: the resolver
(:mod:`gradwatch.resolve`) never compares a value with its default to guess whether it was given.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Optional

from gradwatch.checks import check_bool, check_callable, check_choice, check_float, check_int, fail
from gradwatch.registry import Family, families

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
    given = value
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, Iterable) or not all(isinstance(p, str) and p for p in value):
        raise fail(name, given, "a list of non-empty glob patterns (str)")
    value = tuple(value)
    if name == "include" and not value:
        raise fail(name, given, "at least one glob pattern, e.g. ['*']")
    return value


def _log_dir(name: str, value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise fail(name, value, "a directory path (a non-empty str) or None")
    return value


def _max_overhead(name: str, value: Any) -> float | None:
    if value is None:
        return None
    check_float(name, value, low=0.0, high=1.0, open_low=False)
    return None if value == 0 else value


def _max_unshard_gb(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
        raise fail(name, value, "a number of GiB > 0, or None for no limit")
    return float(value)


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
           lambda n, v: check_int(n, v, minimum=0, maximum=2**64 - 1), int),  # torch's seeds are 64-bit
    Option("loss_fn", Optional[Callable[..., Any]], None,
           "loss_fn(model, batch) -> Tensor[B], the per-example loss on a probe batch",
           lambda n, v: check_callable(n, v, "a callable loss_fn(model, batch) -> Tensor[B]"),
           no_knob="a callable cannot be given as text: pass it in code (GradWatch(loss_fn=...))"),
    Option("on_alert", Optional[Callable[..., Any]], None, "on_alert(alert), called on rank zero for every alert",
           lambda n, v: check_callable(n, v, "a callable on_alert(alert) or None"),
           no_knob="a callable cannot be given as text: pass it in code (GradWatch(on_alert=...))"),
    Option("alert_cooldown", int, 200, "steps before the same alert rule may fire again",
           lambda n, v: check_int(n, v, minimum=0), int),
    Option("max_unshard_gb", Optional[float], None,
           "FSDP2: most GiB of full parameters per rank an extra pass with gradients (sharpness, per-example "
           "spectra) may unshard; over it that family is switched off (None: no limit)", _max_unshard_gb, float),
)

OPTIONS: dict[str, Option] = {o.name: o for o in GENERAL_OPTIONS}
DEFAULTS: dict[str, Any] = {o.name: o.default for o in GENERAL_OPTIONS}


# ---- the knobs derived from the options and the registered families ---------------------------------


@dataclass(frozen=True)
class Knob:
    """One scalar option.

    Attributes:
        name: ``spectra_every``, ``max_overhead``, ...
        type: int, float, bool or str.
        default: the value it has when set nowhere (``<key>_every``: the family's default cadence if it is on
            by default and an int, -1 for another cadence, else 0). Shown in ``--help``; the HF fields default
            to None ("not given") instead.
        help: one line.
        choices: the valid values of a str knob, if a list.
        family: the family key, or None for a general option.
        field: the option or config field it sets.
        sequence: comma-separated text, read as a tuple of str.
        optional: ``none`` reads as None.
    """

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    family: str | None = None
    field: str | None = None
    sequence: bool = False
    optional: bool = False


DEFAULT_CADENCE = -1  # `<key>_every = -1`: the family on at its config's own default cadence


def _type_text(annotation: Any) -> str:
    if isinstance(annotation, str):
        return annotation.replace(" ", "")
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "").replace(" ", "")


def _literal_choices(text: str) -> tuple[str, ...] | None:
    start = text.find("Literal[")
    if start < 0:
        return None
    inner = text[start + len("Literal["):text.index("]", start)]
    return tuple(c.strip(" '\"") for c in inner.split(","))


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _field_knob(fam: Family, f: dataclasses.Field) -> Knob | str:
    """The knob of a family config field, or the reason it has none."""
    text = _type_text(f.type)
    default = _field_default(f)
    if f.name in fam.no_knobs:
        return fam.no_knobs[f.name]
    if f.name in OPTIONS:
        return (f"shadowed by the general option `{f.name}`, which applies to every family "
                f"(GRADWATCH_{f.name.upper()})")
    if "Callable" in text or callable(default) and not isinstance(default, type):
        return "a callable cannot be given as text: pass it in code"
    optional = "None" in text or default is None
    help_text = f"{fam.config_class.__name__}.{f.name}"
    name = f"{fam.key}_{f.name}"
    if "Cadence" in text:
        return Knob(name, int, default if isinstance(default, int) else 0, help_text + " (every N steps)",
                    family=fam.key, field=f.name)
    choices = _literal_choices(text)
    if choices:
        return Knob(name, str, default, help_text, choices, fam.key, f.name, optional=optional)
    if text.startswith(("Sequence[str]", "tuple[str", "list[str]", "Tuple[str", "List[str]")):
        return Knob(name, str, tuple(default or ()), help_text + " (comma-separated)", family=fam.key,
                    field=f.name, sequence=True, optional=optional)
    for t in (bool, int, float, str):
        if isinstance(default, t) or text.split("|")[0] in (t.__name__, f"Optional[{t.__name__}]"):
            return Knob(name, t, default, help_text, family=fam.key, field=f.name, optional=optional)
    return f"its type ({text}) cannot be given as text"


def _default_every(fam: Family) -> int:
    if not fam.default_on:
        return 0
    default = {f.name: f for f in dataclasses.fields(fam.config_class)}["every"].default
    return default if isinstance(default, int) else DEFAULT_CADENCE


def general_knobs() -> list[Knob]:
    """The knobs of the general options that have one."""
    return [Knob(o.name, o.knob, o.default, o.help + (" (comma-separated)" if o.sequence else ""), o.choices, None,
                 o.name, sequence=o.sequence,
                 optional=o.default is None) for o in GENERAL_OPTIONS if o.knob is not None]


def family_knobs(fam: Family) -> list[Knob]:
    """``<key>_every`` then one knob per other field of the family's config class (those that can have one)."""
    out = [Knob(f"{fam.key}_every", int, _default_every(fam),
                f"{fam.summary or fam.key} every N steps (0: off; -1: its default cadence, "
                f"{fam.config_class().every!r})", family=fam.key, field="every")]
    for f in dataclasses.fields(fam.config_class):
        if f.name != "every":
            knob = _field_knob(fam, f)
            if isinstance(knob, Knob):
                out.append(knob)
    return out


def knobs() -> list[Knob]:
    """Every knob, general options first, then each registered family's (the registry as it is now)."""
    out = general_knobs()
    for fam in families():
        out.extend(family_knobs(fam))
    return out


def unreachable() -> dict[str, str]:
    """``{option or family field: why it has no knob}``: every option and field is a knob or listed here."""
    out = {o.name: o.no_knob for o in GENERAL_OPTIONS if o.knob is None}
    for fam in families():
        for f in dataclasses.fields(fam.config_class):
            if f.name != "every":
                knob = _field_knob(fam, f)
                if not isinstance(knob, Knob):
                    out[f"{fam.key}.{f.name}"] = knob
    return out


def knob_value(knob: Knob, value: Any) -> Any:
    """A knob's typed value (from text already read, a dataclass field, JSON or YAML) as the option or field
    takes it: a list knob's comma-separated text becomes a tuple."""
    if knob.sequence and value is not None:
        if isinstance(value, str):
            return tuple(p.strip() for p in value.split(",") if p.strip())
        if isinstance(value, (list, tuple)) and all(isinstance(p, str) for p in value):
            return tuple(p.strip() for p in value if p.strip())
        what = "glob patterns" if knob.family is None else "values"
        raise ValueError(f"gradwatch: knob `{knob.name}` expected comma-separated {what} (text) or a list of "
                         f"them, got {value!r}")
    return value


__all__ = ["DEFAULTS", "DEFAULT_CADENCE", "GENERAL_OPTIONS", "NOT_GIVEN", "ON_ERROR_CHOICES", "OPTIONS", "Knob",
           "NotGivenType", "Option", "family_knobs", "general_knobs", "knob_value", "knobs", "unreachable"]
