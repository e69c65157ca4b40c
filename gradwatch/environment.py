"""Reading gradwatch's knobs from ``GRADWATCH_*`` environment variables (and so from launcher options).

Each knob of :func:`gradwatch.knobs.knobs` (``spectra_every``, ``max_overhead``, ...) can be set without
touching the training script:

- environment: ``GRADWATCH_<NAME>`` (``GRADWATCH_SPECTRA_EVERY=10``);
- launcher option: ``gradwatch run --spectra-every 10 train.py ...``, which sets the same variable for the
  script and every process it starts (``torchrun`` workers, DataLoader workers).

They apply to every way of starting gradwatch: ``callbacks=[GradWatch()]`` in Lightning or the HF Trainer,
LightningCLI, and ``report_to="gradwatch"``. The precedence between them and the other surfaces is that of
:mod:`gradwatch.resolve` (:data:`gradwatch.resolve.PRECEDENCE`): code > HF fields > launcher option >
environment variable > default.

Text is read by the knob's type: ``int`` (``10``), ``float`` (``0.05``), ``bool`` (``true/false``,
``1/0``, ``yes/no``, ``on/off``) and ``str`` (as given; lists are comma-separated, as for ``include``); an
optional knob reads ``none`` as None. An empty variable counts as unset. A value that cannot be read, or
that the option rejects, raises :class:`KnobValueError` naming the variable or option, the value and what is
valid. A ``GRADWATCH_*`` variable that names no knob is reported in one warning, with the closest knob's name.
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
    from gradwatch.options import knobs

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
    if getattr(knob, "sequence", False):
        return "comma-separated text"
    return "text"


NONE_WORD = "none"


def parse_knob_text(knob: Any, text: str, source: str) -> Any:
    """Read ``text`` as a value of ``knob``'s type. ``source`` names where it came from (for the message)."""
    kind = getattr(knob, "type", str)
    stripped = text.strip()
    value: Any
    if getattr(knob, "optional", False) and stripped.lower() == NONE_WORD:
        return None
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
    if value is None:
        return NONE_WORD
    if getattr(knob, "type", str) is bool:
        return "true" if value else "false"
    if getattr(knob, "sequence", False) and isinstance(value, (list, tuple)):
        return ",".join(value)
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


def closest_env_var(var: str, knob_list: Sequence[Any] | None = None) -> str | None:
    """The knob variable closest to ``var`` (``GRADWATCH_SPECTRA_EVRY`` -> ``GRADWATCH_SPECTRA_EVERY``)."""
    import difflib

    knob_list = all_knobs() if knob_list is None else knob_list
    found = difflib.get_close_matches(var, [env_var(k.name) for k in knob_list], n=1, cutoff=0.6)
    return found[0] if found else None


def unknown_env_message(unknown: Sequence[str], knob_list: Sequence[Any] | None = None) -> str:
    """One message naming every unknown ``GRADWATCH_*`` variable, each with the closest knob variable."""
    knob_list = all_knobs() if knob_list is None else knob_list
    parts = []
    for var in unknown:
        near = closest_env_var(var, knob_list)
        parts.append(f"{var} (did you mean {near}?)" if near else var)
    if len(parts) == 1:
        var, _, hint = parts[0].partition(" ")
        return f"gradwatch: {var} is not a gradwatch knob and is ignored{' ' + hint if hint else ''}; " \
               "`gradwatch run --help` lists the knobs"
    return (f"gradwatch: these GRADWATCH_* variables name no knob and are ignored: {', '.join(parts)}; "
            "`gradwatch run --help` lists the knobs")


_WARNED: set[str] = set()


def warn_unknown_env_vars(environ: Mapping[str, str] | None = None,
                          knob_list: Sequence[Any] | None = None) -> list[str]:
    """Warn once per process, in one warning, about the ``GRADWATCH_*`` variables that name no knob (those not
    warned about before). Returns them."""
    import warnings

    unknown = [v for v in unknown_env_vars(environ, knob_list) if v not in _WARNED]
    if unknown:
        _WARNED.update(unknown)
        warnings.warn(unknown_env_message(unknown, knob_list), UserWarning, stacklevel=3)
    return unknown


def _inner(error: Exception) -> str:
    return str(error).removeprefix("gradwatch: ")
