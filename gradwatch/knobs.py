"""Flat, scalar knobs for configuration without code: HF ``TrainingArguments`` fields (``gradwatch_<name>``),
environment variables (``GRADWATCH_<NAME>``) and launcher options (``gradwatch run --<name-with-dashes>``).

Derived when called, from two tables: the general options (:data:`gradwatch.options.GENERAL_OPTIONS`) and the
registered families (``gradwatch.registry``): ``<key>_every`` for each family (N: every N steps, 0: off, -1:
on at its config's own default cadence) and ``<key>_<field>`` for every other field of its config class. A
field without a knob says why in :func:`unreachable` (a callable cannot be written as text; a field shadowed
by a general option). One source of defaults: the option table and the config classes' own defaults.

Text is read by the knob's type (:func:`gradwatch.integrations.env_knobs.parse_knob_text`): a list knob
(``include``, ``spectra_stats``) is comma-separated; an optional knob (``stability_noise_scale``) reads
``none`` as None.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gradwatch.options import GENERAL_OPTIONS, OPTIONS
from gradwatch.registry import Family, families


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
    return [Knob(o.name, o.knob, o.default, o.help, o.choices, None, o.name, sequence=o.sequence,
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


def config_from_knobs(values: Mapping[str, Any], base: Mapping[str, Any] | None = None) -> Any:
    """The :class:`~gradwatch.config.WatchConfig` the knob ``values`` describe (knobs absent: defaults);
    ``base`` holds other WatchConfig options (``loss_fn``, ``on_alert``), below the knobs. A bad value raises
    ValueError naming the knob."""
    from gradwatch.resolve import Layer, resolve_layers

    layers = [Layer.from_knobs("knobs", values, {n: n for n in values})]
    if base:
        layers.append(Layer.from_options("base", base))
    return resolve_layers(layers)


__all__ = ["DEFAULT_CADENCE", "Knob", "config_from_knobs", "family_knobs", "general_knobs", "knob_value", "knobs",
           "unreachable"]
