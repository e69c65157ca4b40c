"""Flat, scalar knobs for configuration without code: HF ``TrainingArguments`` fields (``gradwatch_<name>``),
environment variables (``GRADWATCH_<NAME>``) and launcher options (``--<name-with-dashes>``).

Derived from the registered families (``gradwatch.registry``): ``<key>_every`` for each family (0 = off) and
``<key>_<field>`` for each field it lists in ``Family.knobs``; plus the general options of
:class:`gradwatch.WatchConfig`. One source of defaults: the dataclass defaults of the configs themselves.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gradwatch.cadence import Cadence
from gradwatch.config import WatchConfig
from gradwatch.registry import families


@dataclass(frozen=True)
class Knob:
    """One scalar option.

    Attributes:
        name: ``spectra_every``, ``max_overhead``, ...
        type: int, float, bool or str.
        default: the value meaning "as the config's default" (``<key>_every``: the family's default cadence
            if it is on by default, else 0).
        help: one line.
        choices: the valid values of a str knob, if a list.
        family: the family key, or None for a general option.
        field: the config field it sets.
    """

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    family: str | None = None
    field: str | None = None


_GENERAL_KNOBS = (
    Knob("include", str, "*", "comma-separated globs over parameter names to watch"),
    Knob("exclude", str, "", "comma-separated globs to leave out"),
    Knob("embeddings", bool, False, "also watch embedding tables"),
    Knob("output_head", bool, False, "also watch the output head"),
    Knob("max_overhead", float, 0.05, "share of wall time gradwatch may use (0: no budget)"),
    Knob("on_error", str, "warn", "warn: a failing diagnostic warns once; raise: strict", ("warn", "raise")),
    Knob("probe_seed", int, 0, "seed of the probe-set draw"),
    Knob("alert_cooldown", int, 200, "steps before the same alert rule fires again"),
)


DEFAULT_CADENCE = -1  # `<key>_every = -1`: the family on at its config's own default cadence


def _default_every(cls: type) -> int:
    default = {f.name: f for f in dataclasses.fields(cls)}["every"].default
    return default if isinstance(default, int) else DEFAULT_CADENCE


def _scalar_type(value: Any) -> type | None:
    for t in (bool, int, float, str):
        if isinstance(value, t):
            return t
    return None


def knobs() -> list[Knob]:
    """Every knob, general options first, then each registered family's."""
    out = list(_GENERAL_KNOBS)
    for fam in families():
        every = _default_every(fam.config_class)
        out.append(Knob(f"{fam.key}_every", int, every if fam.default_on else 0,
                        f"{fam.summary or fam.key} every N steps (0: off; -1: its default cadence, "
                        f"{fam.config_class().every!r})", family=fam.key, field="every"))
        fields = {f.name: f for f in dataclasses.fields(fam.config_class)}
        for name in fam.knobs:
            f = fields[name]
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            if isinstance(default, Cadence) or name.endswith("_every"):
                t, default = int, default if isinstance(default, int) else 0
            else:
                t = _scalar_type(default) or str
            choices = None
            literal = getattr(f.type, "__args__", None) if not isinstance(f.type, str) else None
            if isinstance(f.type, str) and f.type.startswith("Literal["):
                choices = tuple(c.strip(" '\"") for c in f.type[len("Literal["):-1].split(","))
            elif literal and all(isinstance(a, str) for a in literal):
                choices = tuple(literal)
            out.append(Knob(f"{fam.key}_{name}", t, default, f"{fam.config_class.__name__}.{name}", choices,
                            fam.key, name))
    return out


def _split(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def _patterns(name: str, value: Any) -> tuple[str, ...]:
    """Glob patterns from comma-separated text (a flag, a variable) or a list of text (a JSON or YAML file)."""
    if isinstance(value, str):
        return _split(value)
    if isinstance(value, (list, tuple)) and all(isinstance(p, str) for p in value):
        return tuple(p.strip() for p in value if p.strip())
    raise ValueError(f"gradwatch: knob `{name}` expected comma-separated glob patterns (text) or a list of "
                     f"them, got {value!r}")


def config_from_knobs(values: Mapping[str, Any], base: Mapping[str, Any] | None = None) -> WatchConfig:
    """The :class:`WatchConfig` the knob ``values`` describe (knobs absent: defaults); ``base`` holds other
    WatchConfig options (``loss_fn``, ``on_alert``). A bad value raises ValueError naming the knob."""
    table = {k.name: k for k in knobs()}
    unknown = [n for n in values if n not in table]
    if unknown:
        raise ValueError(f"gradwatch: unknown knob {unknown[0]!r}; valid knobs are {list(table)}")
    get = lambda name: values.get(name, table[name].default)  # noqa: E731
    options: dict[str, Any] = dict(base or {})
    options["include"] = _patterns("include", get("include")) or ("*",)
    options["exclude"] = _patterns("exclude", get("exclude"))
    for name in ("embeddings", "output_head", "on_error", "probe_seed", "alert_cooldown"):
        options[name] = get(name)
    options["max_overhead"] = get("max_overhead") or None
    for fam in families():
        every = get(f"{fam.key}_every")
        if isinstance(every, bool) or not isinstance(every, int) or every < DEFAULT_CADENCE:
            raise ValueError(f"gradwatch: knob `{fam.key}_every` expected an int >= -1 (0: off, -1: the family's "
                             f"default cadence), got {every!r}")
        if not every:
            options[fam.key] = False
            continue
        fields: dict[str, Any] = {} if every == DEFAULT_CADENCE else {"every": every}
        for name in fam.knobs:
            knob = table[f"{fam.key}_{name}"]
            if knob.name in values:
                fields[name] = values[knob.name]
        try:
            options[fam.key] = fam.config_class(**fields)
        except ValueError as exc:
            raise ValueError(f"{exc} (from the knobs {sorted(f'{fam.key}_{n}' for n in fields)})") from exc
    return WatchConfig(**options)
