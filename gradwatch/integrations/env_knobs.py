"""gradwatch's knobs from ``GRADWATCH_*`` environment variables and from launcher options.

Each knob of :func:`gradwatch.knobs.knobs` (``spectra_every``, ``max_overhead``, ...) can be set without
touching the training script:

- environment: ``GRADWATCH_<NAME>`` (``GRADWATCH_SPECTRA_EVERY=10``);
- launcher option: ``gradwatch run --spectra-every 10 train.py ...``, which sets the same variable for the
  script and every process it starts (``torchrun`` workers, DataLoader workers).

Precedence, highest first: a value the script sets itself (an explicit ``TrainingArguments`` field or
the script's own ``--gradwatch_*`` flag, a ``GradWatch(...)`` argument) > the launcher option > the
environment variable > the knob's default.

Text is read by the knob's type: ``int`` (``10``), ``float`` (``0.05``), ``bool`` (``true/false``,
``1/0``, ``yes/no``, ``on/off``) and ``str`` (as given; lists are comma-separated, as for ``include``).
A value that cannot be read, or that :func:`gradwatch.knobs.config_from_knobs` rejects, raises
:class:`KnobValueError` naming the variable or option, the value and what is valid.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

ENV_PREFIX = "GRADWATCH_"
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


class KnobValueError(ValueError):
    """A knob's value, as given in an environment variable or a launcher option, is not valid."""


def env_var(name: str) -> str:
    """``spectra_every`` -> ``GRADWATCH_SPECTRA_EVERY``."""
    return ENV_PREFIX + name.upper()


def option_flag(name: str) -> str:
    """``spectra_every`` -> ``--spectra-every``."""
    return "--" + name.replace("_", "-")


def all_knobs() -> list[Any]:
    """The knobs of :mod:`gradwatch.knobs`."""
    from gradwatch.knobs import knobs

    return list(knobs())


def expected_text(knob: Any) -> str:
    """What a valid value of ``knob`` looks like, for messages and ``--help``."""
    choices = getattr(knob, "choices", None)
    if choices:
        return f"one of {list(choices)}"
    kind = getattr(knob, "type", str)
    if kind is bool:
        return "a boolean (" + ", ".join(f"{t}/{f}" for t, f in zip(TRUE_WORDS, FALSE_WORDS)) + ")"
    if kind is int:
        return "an integer"
    if kind is float:
        return "a number"
    return "text"


def parse_knob_text(knob: Any, text: str, source: str) -> Any:
    """Read ``text`` as a value of ``knob``'s type. ``source`` names where it came from (for the message)."""
    kind = getattr(knob, "type", str)
    stripped = text.strip()
    value: Any
    try:
        if kind is bool:
            word = stripped.lower()
            if word not in TRUE_WORDS + FALSE_WORDS:
                raise ValueError
            value = word in TRUE_WORDS
        elif kind is int:
            value = int(stripped, 10)
        elif kind is float:
            value = float(stripped)
            if not math.isfinite(value):
                raise ValueError
        else:
            value = text
    except ValueError:
        raise KnobValueError(f"gradwatch: {source}={text!r} is not valid: expected {expected_text(knob)} "
                             f"({knob.name}: {knob.help})") from None
    choices = getattr(knob, "choices", None)
    if choices and value not in choices:
        raise KnobValueError(f"gradwatch: {source}={text!r} is not valid: expected {expected_text(knob)} "
                             f"({knob.name}: {knob.help})")
    return value


def knob_text(knob: Any, value: Any) -> str:
    """The text of ``value`` as an environment variable holds it (read back by :func:`parse_knob_text`)."""
    if getattr(knob, "type", str) is bool:
        return "true" if value else "false"
    return str(value)


def knob_values_from_env(environ: Mapping[str, str] | None = None,
                         knob_list: Sequence[Any] | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """The knobs set in the environment, read by type.

    Returns:
        ``(values, sources)``: ``{knob name: value}`` for every ``GRADWATCH_<NAME>`` that is set, and
        ``{knob name: variable name}``. An empty variable counts as unset.

    Raises:
        KnobValueError: a variable's text cannot be read as its knob's type.
    """
    environ = os.environ if environ is None else environ
    knob_list = all_knobs() if knob_list is None else knob_list
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for knob in knob_list:
        var = env_var(knob.name)
        text = environ.get(var)
        if text is None or text.strip() == "":
            continue
        values[knob.name] = parse_knob_text(knob, text, var)
        sources[knob.name] = var
    return values, sources


def unknown_env_vars(environ: Mapping[str, str] | None = None,
                     knob_list: Sequence[Any] | None = None) -> list[str]:
    """``GRADWATCH_*`` variables that name no knob (typos such as ``GRADWATCH_SPECTRA_EVRY``)."""
    environ = os.environ if environ is None else environ
    knob_list = all_knobs() if knob_list is None else knob_list
    known = {env_var(k.name) for k in knob_list}
    return sorted(v for v in environ if v.startswith(ENV_PREFIX) and v not in known)


def _inner(error: Exception) -> str:
    return str(error).removeprefix("gradwatch: ")


def check_knob_values(values: Mapping[str, Any], sources: Mapping[str, str]) -> Any:
    """Validate ``values`` with :func:`gradwatch.knobs.config_from_knobs`, one by one and then together.

    Each knob is checked alone (a family's option with its family switched on, so that an option of a family
    that is off by default is checked too), so that the message names the one variable or option at fault.

    Args:
        values: ``{knob name: value}`` (typed).
        sources: ``{knob name: where it was set}`` (``GRADWATCH_SPECTRA_EVERY``, ``--spectra-every``).

    Returns:
        The ``WatchConfig`` of all the values together (knobs not given take their defaults).

    Raises:
        KnobValueError: naming the variable or option, the value and what is valid.
    """
    from gradwatch.knobs import config_from_knobs

    by_name = {k.name: k for k in all_knobs()}
    for name, value in values.items():
        alone = {name: value}
        family = getattr(by_name.get(name), "family", None)
        if family and name != f"{family}_every" and f"{family}_every" in by_name:
            alone[f"{family}_every"] = values.get(f"{family}_every") or 1
        try:
            config_from_knobs(alone)
        except ValueError as error:
            raise KnobValueError(f"gradwatch: {sources.get(name, name)}={value!r} is not valid: "
                                 f"{_inner(error)}") from None
    try:
        return config_from_knobs(dict(values))
    except ValueError as error:
        given = ", ".join(f"{sources.get(n, n)}={v!r}" for n, v in values.items())
        raise KnobValueError(f"gradwatch: these knob values do not go together ({given}): {_inner(error)}") from None


def resolve_knob_values(explicit: Mapping[str, Any] | None = None,
                        environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Knob values by precedence: ``explicit`` (what the script set) over the environment (which holds the
    launcher's options too); knobs set nowhere are left out, so their defaults apply.

    This is what a host adapter (the Hugging Face ``report_to="gradwatch"`` glue) calls with the knobs the
    script set explicitly, before :func:`gradwatch.knobs.config_from_knobs`.
    """
    values, _ = knob_values_from_env(environ)
    values.update(explicit or {})
    return values
