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

from collections.abc import Mapping
from typing import Any

from gradwatch.options import (
    DEFAULT_CADENCE,
    Knob,
    family_knobs,
    general_knobs,
    knob_value,
    knobs,
    unreachable,
)


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
