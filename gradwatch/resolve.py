"""One resolver for every way of configuring gradwatch.

Both callbacks (``gradwatch.callbacks.lightning.GradWatch`` and ``gradwatch.callbacks.transformers.GradWatch``)
and ``report_to="gradwatch"`` build their :class:`~gradwatch.config.WatchConfig` with
:func:`resolve_config`, from these surfaces, highest precedence first:

1. keywords: ``GradWatch(spectra=10, max_overhead=0.1)``, and LightningCLI YAML or flags (``init_args``:
   jsonargparse passes the keywords written there; those left out arrive as :data:`NOT_GIVEN`);
2. the options given to the config object: ``GradWatch(WatchConfig(max_overhead=0.1))`` (``WatchConfig.given``);
3. Hugging Face ``gradwatch_*`` fields of ``TrainingArguments`` (``GradWatchTrainingArguments``, or
   ``GradWatchArguments`` beside it) and their ``--gradwatch_*`` flags: a field is given when it is not None;
4. launcher options (``gradwatch run --spectra-every 7``), which overwrite the variable for the script;
5. ``GRADWATCH_*`` environment variables (``GRADWATCH_SPECTRA_EVERY=7``);
6. the defaults (:mod:`gradwatch.options`, the families' config classes).

"Given" never means "different from the default": each surface says what it holds and what it does not
(:data:`NOT_GIVEN`, a None field, an unset variable), so a value equal to its default, given higher, beats a
lower surface (``gradwatch_spectra_every=50`` beats ``GRADWATCH_SPECTRA_EVERY=7``).

Options resolve one by one. A family resolves in two parts: whether it is on (the highest surface that says:
``spectra=False``/``True``/an int/a config, or ``spectra_every``: 0 off, N or -1 on), and its fields (each
from the highest surface that sets it: ``spectra=10`` and ``spectra_every`` set ``every``, -1 leaves it to the
config's default). A family config object (``SpectraConfig(...)``, or a mapping in LightningCLI YAML) is
taken whole: surfaces below it do not change its fields, those above it do.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gradwatch.cadence import Cadence
from gradwatch.options import NOT_GIVEN, OPTIONS, NotGivenType

PRECEDENCE = ("Precedence, highest first: GradWatch(...) keywords (and LightningCLI init_args) > the options "
              "given to a WatchConfig passed to it > gradwatch_* TrainingArguments fields and --gradwatch_* flags "
              "> gradwatch run options > GRADWATCH_<NAME> environment variables > defaults. A value given "
              "equal to its default is given all the same.")

HF_FIELD_PREFIX = "gradwatch_"
NONE_WORD = "none"  # an optional knob's text for None (as gradwatch.environment reads it)
NONE_GIVEN = object()


@dataclass(frozen=True)
class Layer:
    """What one surface says.

    Attributes:
        surface: its name (``keywords``, ``config``, ``training arguments``, ``environment``).
        options: general options and family keywords as ``WatchConfig`` takes them (code surfaces).
        knobs: knob values, typed (text surfaces: fields, flags, variables).
        sources: knob name -> how a message names it (``GRADWATCH_SPECTRA_EVERY``).
    """

    surface: str
    options: Mapping[str, Any] = field(default_factory=dict)
    knobs: Mapping[str, Any] = field(default_factory=dict)
    sources: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_options(cls, surface: str, options: Mapping[str, Any]) -> Layer:
        return cls(surface, options={k: v for k, v in options.items() if not isinstance(v, NotGivenType)})

    @classmethod
    def from_knobs(cls, surface: str, values: Mapping[str, Any], sources: Mapping[str, str] | None = None) -> Layer:
        return cls(surface, knobs=dict(values), sources=dict(sources or {}))


def _knob_error(source: str, value: Any, error: Exception) -> ValueError:
    from gradwatch.environment import KnobValueError

    return KnobValueError(f"gradwatch: {source}={value!r} is not valid: {str(error).removeprefix('gradwatch: ')}")


def _every_from_knob(name: str, value: Any) -> Any:
    """``<key>_every`` knob: "off", "on" (default cadence) or ("on", every)."""
    if isinstance(value, Cadence):
        return ("on", value)
    if isinstance(value, bool) or not isinstance(value, int) or value < -1:
        raise ValueError(f"gradwatch: knob `{name}` expected an int >= -1 (0: off, -1: the family's default "
                         f"cadence), got {value!r}")
    return "off" if value == 0 else ("on" if value == -1 else ("on", value))


def resolve_layers(layers: Sequence[Layer]) -> Any:
    """The :class:`~gradwatch.config.WatchConfig` of ``layers`` (highest precedence first) over the defaults.

    Raises:
        ValueError: a code surface's bad value, as ``WatchConfig`` words it; a text surface's bad value as
            :class:`~gradwatch.integrations.env_knobs.KnobValueError` naming the field, flag or variable.
    """
    from gradwatch.config import WatchConfig, family_value
    from gradwatch.options import knob_value, knobs
    from gradwatch.registry import families

    table = {k.name: k for k in knobs()}
    fams = {f.key: f for f in families()}
    for layer in layers:
        unknown = [n for n in layer.knobs if n not in table]
        if unknown:
            raise ValueError(f"gradwatch: unknown knob {unknown[0]!r}; valid knobs are {list(table)}")
        unknown = [n for n in layer.options if n not in OPTIONS and n not in fams]
        if unknown:
            raise ValueError(f"gradwatch: unknown option {unknown[0]!r}; valid options are {[*fams, *OPTIONS]}")

    def source(layer: Layer, name: str) -> str:
        return layer.sources.get(name, name)

    # every text value alone, so that the message names the one at fault (a family that is off included)
    typed: list[dict[str, Any]] = []
    for layer in layers:
        values: dict[str, Any] = {}
        for name, raw in layer.knobs.items():
            knob = table[name]
            try:
                value = knob_value(knob, raw)
                if knob.family is None:
                    value = OPTIONS[name].check(name, value)
                elif knob.field == "every":
                    _every_from_knob(name, value)
                else:
                    fams[knob.family].config_class(**{knob.field: value})
            except ValueError as error:
                raise _knob_error(source(layer, name), raw, error) from None
            values[name] = value
        typed.append(values)

    options: dict[str, Any] = {}
    for name in OPTIONS:
        for layer, values in zip(layers, typed):
            if name in layer.options:
                options[name] = layer.options[name]
                break
            if name in values:
                options[name] = values[name]
                break

    for key, fam in fams.items():
        decided: str | None = None  # "off", "on" or "whole"
        whole: Any = None
        fields: dict[str, tuple[Any, Layer, str]] = {}  # field -> (value, layer, knob name or "")
        for layer, values in zip(layers, typed):
            if key in layer.options:
                value = layer.options[key]
                if value is True:
                    decided = decided or "on"
                elif value is False or value is None or (type(value) is int and value == 0):
                    decided = decided or "off"
                elif isinstance(value, fam.config_class):
                    decided = decided or "whole"
                    if decided != "off":
                        whole = value
                    break  # a config object is taken whole: the surfaces below add nothing
                else:
                    family_value(key, value, fam.config_class)  # an int or a Cadence, else the WatchConfig error
                    decided = decided or "on"
                    fields.setdefault("every", (value, layer, ""))
            for name, value in values.items():
                knob = table[name]
                if knob.family != key:
                    continue
                if knob.field == "every":
                    state = _every_from_knob(name, value)
                    decided = decided or ("off" if state == "off" else "on")
                    if isinstance(state, tuple):
                        fields.setdefault("every", (state[1], layer, name))
                else:
                    fields.setdefault(knob.field, (value, layer, name))  # type: ignore[arg-type]
        if decided is None:
            decided = "on" if fam.default_on else "off"
        if decided == "off":
            options[key] = False
            continue
        chosen = {f: v for f, (v, _, _) in fields.items()}
        try:
            options[key] = (dataclasses.replace(whole, **chosen) if chosen else whole) if whole is not None \
                else fam.config_class(**chosen)
        except ValueError as error:
            text = [(f, v, lay, n) for f, (v, lay, n) in fields.items() if n]
            if not text:
                raise
            given = ", ".join(f"{source(lay, n)}={v!r}" for _, v, lay, n in text)
            from gradwatch.environment import KnobValueError

            raise KnobValueError(f"gradwatch: these values of `{key}` do not go together ({given}): "
                                 f"{str(error).removeprefix('gradwatch: ')}") from None
    config = WatchConfig(**options)
    given = set()
    for layer, values in zip(layers, typed):
        given.update(layer.options)
        given.update(table[n].family or n for n in values)
    object.__setattr__(config, "_given", frozenset(given))
    return config


def keyword_layer(keywords: Mapping[str, Any]) -> Layer:
    """The ``GradWatch(...)`` keywords (LightningCLI's NOT_GIVEN left out)."""
    return Layer.from_options("keywords", keywords)


def config_layer(config: Any) -> Layer:
    """The options given to a :class:`~gradwatch.config.WatchConfig`."""
    from gradwatch.checks import fail
    from gradwatch.config import WatchConfig

    if config is None:
        return Layer("config")
    if not isinstance(config, WatchConfig):
        raise fail("config", config, "a gradwatch.WatchConfig or None")
    return Layer.from_options("config", config.given_options())


def training_arguments_layer(args: Any) -> Layer:
    """The ``gradwatch_*`` fields of a ``TrainingArguments`` (or ``GradWatchArguments``) that are not None."""
    from gradwatch.options import knobs

    values, sources = {}, {}
    if args is not None:
        for k in knobs():
            value = getattr(args, HF_FIELD_PREFIX + k.name, None)
            if k.optional and isinstance(value, str) and value.strip().lower() == NONE_WORD:
                value = NONE_GIVEN  # `--gradwatch_log_dir none`: None given, as GRADWATCH_LOG_DIR=none reads
            if value is not None and not isinstance(value, NotGivenType):
                values[k.name] = None if value is NONE_GIVEN else value
                sources[k.name] = HF_FIELD_PREFIX + k.name
    return Layer.from_knobs("training arguments", values, sources)


def environment_layer(environ: Mapping[str, str] | None = None, *, warn_unknown: bool = True) -> Layer:
    """The ``GRADWATCH_*`` variables (the launcher's options among them), read by type; the unknown ones are
    named in one warning (once per process), with the closest knob's name."""
    from gradwatch.environment import knob_values_from_env, warn_unknown_env_vars

    environ = os.environ if environ is None else environ
    values, sources = knob_values_from_env(environ)
    if warn_unknown:
        warn_unknown_env_vars(environ)
    return Layer.from_knobs("environment", values, sources)


def resolve_config(config: Any = None, keywords: Mapping[str, Any] | None = None, *, training_args: Any = None,
                   environ: Mapping[str, str] | None = None, warn_unknown: bool = True) -> Any:
    """The :class:`~gradwatch.config.WatchConfig` of every surface, by :data:`PRECEDENCE`.

    Args:
        config: a ``WatchConfig`` (its given options count), or None.
        keywords: the callback's keywords (NOT_GIVEN values are left out).
        training_args: a ``TrainingArguments``/``GradWatchArguments`` with ``gradwatch_*`` fields, or None.
        environ: the environment (default ``os.environ``; ``{}`` for none).
        warn_unknown: warn about ``GRADWATCH_*`` variables that name no knob.
    """
    layers = [keyword_layer(keywords or {}), config_layer(config), training_arguments_layer(training_args),
              environment_layer(environ, warn_unknown=warn_unknown)]
    return resolve_layers(layers)


__all__ = ["NOT_GIVEN", "PRECEDENCE", "Layer", "config_layer", "environment_layer", "keyword_layer",
           "resolve_config", "resolve_layers", "training_arguments_layer"]
