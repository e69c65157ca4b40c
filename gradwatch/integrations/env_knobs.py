"""The old home of the ``GRADWATCH_*`` knob reading: its names, re-exported from :mod:`gradwatch.environment`
(the variables, the launcher options, their precedence and how text is read are described there)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gradwatch.environment import _WARNED as _WARNED
from gradwatch.environment import (
    ENV_PREFIX,
    FALSE_WORDS,
    NONE_WORD,
    TRUE_WORDS,
    KnobValueError,
    all_knobs,
    closest_env_var,
    env_var,
    expected_text,
    knob_text,
    knob_values_from_env,
    option_flag,
    parse_knob_text,
    unknown_env_message,
    unknown_env_vars,
    warn_unknown_env_vars,
)


def check_knob_values(values: Mapping[str, Any], sources: Mapping[str, str]) -> Any:
    """Validate ``values``: each alone (a family's option with its family switched on, so that an option of a
    family that is off is checked too), then together.

    Args:
        values: ``{knob name: value}`` (typed).
        sources: ``{knob name: where it was set}`` (``GRADWATCH_SPECTRA_EVERY``, ``--spectra-every``).

    Returns:
        The ``WatchConfig`` of all the values together (knobs not given take their defaults).

    Raises:
        KnobValueError: naming the variable or option, the value and what is valid.
    """
    from gradwatch.resolve import Layer, resolve_layers

    return resolve_layers([Layer.from_knobs("knobs", values, sources)])


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


__all__ = ["ENV_PREFIX", "FALSE_WORDS", "NONE_WORD", "TRUE_WORDS", "KnobValueError", "all_knobs", "check_knob_values",
           "closest_env_var", "env_var", "expected_text", "knob_text", "knob_values_from_env", "option_flag",
           "parse_knob_text", "resolve_knob_values", "unknown_env_message", "unknown_env_vars",
           "warn_unknown_env_vars"]
