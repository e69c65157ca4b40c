"""Configuration: :class:`WatchConfig`, the options of a whole run; the per-family configs live with their
families (``gradwatch.registry`` lists them) and :class:`~gradwatch.cadence.Cadence` in :mod:`gradwatch.cadence`.

Every option is validated when the object is built. A wrong value raises ``ValueError`` naming the
field, the value given and what was expected (with the valid choices where there is a list), so that
a typo fails before the first training step rather than an hour into a run (:mod:`gradwatch.checks`).

This module names no family. ``Cadence``, ``as_cadence`` and the checks are re-exported here (their old
home); ``from gradwatch.config import SpectraConfig`` and the families' other constants keep working through
the module's ``__getattr__``.
"""

from __future__ import annotations

import inspect
import sys
import warnings
from collections.abc import Callable
from typing import Any, Literal, Optional, Union

from gradwatch.cadence import Cadence, as_cadence
from gradwatch.checks import check_bool, check_callable, check_choice, check_float, check_int, fail
from gradwatch.options import GENERAL_OPTIONS, NOT_GIVEN, ON_ERROR_CHOICES, OPTIONS, NotGivenType

#: The options every family shares, with their defaults (declared in :mod:`gradwatch.options`).
_GENERAL: dict[str, Any] = {o.name: o.default for o in GENERAL_OPTIONS}


def family_value(key: str, value: Any, config_class: type) -> Any:
    """A family keyword's value as its config, or None for off: ``True`` (its defaults), ``False``/``None``
    (off), an int (its ``every``: ``spectra=10`` is ``SpectraConfig(every=10)``; 0: off), a
    :class:`~gradwatch.cadence.Cadence` (its ``every``) or its config object."""
    if value is True:
        return config_class()
    if value is False or value is None:
        return None
    if isinstance(value, config_class):
        return value
    if isinstance(value, Cadence) or (isinstance(value, int) and value >= 0):
        return config_class(every=value) if value != 0 else None
    raise fail(key, value, f"True, False, an int >= 0 (its `every`; 0: off), a gradwatch.Cadence or a "
                           f"gradwatch.{config_class.__name__}")


class WatchConfig:
    """Everything gradwatch does, in one validated object.

    Family keywords (one per registered family, see ``gradwatch.registry``): ``spectra`` (on by default),
    ``sharpness``, ``signals``, ``stability``, ``moe`` (off by default): each ``True`` (its defaults),
    ``False`` (off), an int or a ``Cadence`` (its ``every``: ``spectra=10``) or its config object
    (``SpectraConfig(every=10)``).

    The general options (declared once in :mod:`gradwatch.options`):

    Attributes:
        include: glob patterns over parameter names (``named_parameters()``) to watch (at least one).
        exclude: glob patterns to leave out (applied after ``include``).
        embeddings: also watch embedding tables (large; off by default).
        output_head: also watch the output head (``lm_head`` and weights tied to an embedding).
        log_dir: where to write when the trainer has no TensorBoard writer of its own.
        max_overhead: share of wall time gradwatch may use; due work that would exceed it is postponed
            (``None`` or 0 turns the budget off).
        on_error: ``"warn"``: a failing diagnostic warns once, logs NaN and training goes on; ``"raise"``:
            strict (failures and alerts raise), for tests and CI.
        probe_seed: seed of the probe-set draw (a private generator: the user's RNG is untouched).
        loss_fn: ``loss_fn(model, batch) -> Tensor[B]``, the per-example loss on a probe batch, for models
            whose loss gradwatch cannot infer.
        on_alert: ``on_alert(alert)`` called on rank zero for every alert (may save a checkpoint or stop
            training); if it raises, that is reported once and training goes on unless strict.
        alert_cooldown: steps before the same alert rule may fire again.
        max_unshard_gb: under FSDP2, the most GiB of full parameters per rank that an extra pass with
            gradients (sharpness's Hessian-vector products, per-example spectra, signals' confirmation) may
            unshard on every rank; over it the pass is refused, said once, and that family (or signals'
            confirmation) is off for the run while training goes on. ``None``: no limit. Forward-only probe
            passes run sharded and need no limit.

    The object remembers which options were given (:attr:`given`): handed to a callback, those beat the
    ``gradwatch_*`` TrainingArguments fields and the ``GRADWATCH_*`` environment, and the others are left to
    them (:mod:`gradwatch.resolve`). A value given equal to its default is given all the same.
    """

    include: tuple[str, ...]
    exclude: tuple[str, ...]
    embeddings: bool
    output_head: bool
    log_dir: str | None
    max_overhead: float | None
    on_error: Literal["warn", "raise"]
    probe_seed: int
    loss_fn: Callable[..., Any] | None
    on_alert: Callable[..., Any] | None
    alert_cooldown: int
    max_unshard_gb: float | None

    def __init__(self, **options: Any) -> None:
        from gradwatch.registry import families

        options = {k: v for k, v in options.items() if not isinstance(v, NotGivenType)}
        fams = {f.key: f for f in families()}
        unknown = [k for k in options if k not in _GENERAL and k not in fams]
        if unknown:
            raise ValueError(f"gradwatch: unknown option {unknown[0]!r}; valid options are "
                             f"{[*fams, *_GENERAL]}")
        chosen: dict[str, Any] = {}
        for key, fam in fams.items():
            chosen[key] = family_value(key, options.get(key, fam.default_on), fam.config_class)
        object.__setattr__(self, "_families", chosen)
        object.__setattr__(self, "_given", frozenset(options))
        values = {**_GENERAL, **{k: v for k, v in options.items() if k in _GENERAL}}
        for name, option in OPTIONS.items():
            values[name] = option.check(name, values[name])
        for legacy in ("embeddings", "output_head"):  # once options of a family's config; now shared by every family
            for fam_config in chosen.values():
                if fam_config is not None and getattr(fam_config, legacy, None):
                    warnings.warn(f"gradwatch: {type(fam_config).__name__}({legacy}=True) is deprecated; layer "
                                  f"selection is shared by every family: use WatchConfig({legacy}=True)",
                                  DeprecationWarning, stacklevel=2)
                    values[legacy] = True
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def __getattr__(self, name: str) -> Any:
        fams = self.__dict__.get("_families", {})
        if name in fams:
            return fams[name]
        raise AttributeError(f"'WatchConfig' has no option {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("gradwatch.WatchConfig is immutable; use config.replace(...)")

    @property
    def families(self) -> dict[str, Any]:
        """Family key -> its config, for the families switched on."""
        return {k: v for k, v in self._families.items() if v is not None}

    @property
    def given(self) -> frozenset[str]:
        """The options given when this config was built (or replaced), whatever their value."""
        return self._given

    def options(self) -> dict[str, Any]:
        """Every option (families included) as keywords that rebuild this config."""
        out = {k: getattr(self, k) for k in _GENERAL}
        out.update({k: (False if v is None else v) for k, v in self._families.items()})
        return out

    def given_options(self) -> dict[str, Any]:
        """The options given, as keywords (a family as its config, or False)."""
        return {k: v for k, v in self.options().items() if k in self._given}

    def replace(self, **changes: Any) -> WatchConfig:
        """A copy with ``changes`` applied (validated again); the changed options count as given, even when
        equal to their default (``config.replace(max_overhead=0.05)`` sets the option back to its default)."""
        changes = {k: v for k, v in changes.items() if not isinstance(v, NotGivenType)}
        new = WatchConfig(**{**self.options(), **changes})
        object.__setattr__(new, "_given", self._given | frozenset(changes))
        return new

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, WatchConfig):
            return NotImplemented
        mine, theirs = self.options(), other.options()
        mine.pop("loss_fn"), theirs.pop("loss_fn"), mine.pop("on_alert"), theirs.pop("on_alert")
        return mine == theirs

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self.options().items() if k not in _GENERAL or v != _GENERAL[k])
        return f"WatchConfig({shown})"

    @classmethod
    def from_kwargs(cls, config: WatchConfig | None = None, **kwargs: Any) -> WatchConfig:
        """``GradWatch(config)`` or ``GradWatch(spectra=..., ...)``: one path for both. Keywords holding
        :data:`~gradwatch.options.NOT_GIVEN` (what LightningCLI passes for an option left out) are left out;
        every other keyword overrides ``config``, a default value included (``from_kwargs(config,
        max_overhead=0.05)`` sets it back to its default). No environment here: the callbacks add the
        ``GRADWATCH_*`` variables and HF fields below these (:func:`gradwatch.resolve.resolve_config`)."""
        if config is not None and not isinstance(config, WatchConfig):
            raise fail("config", config, "a gradwatch.WatchConfig or None")
        if config is None:
            return cls(**kwargs)
        given = {k: v for k, v in kwargs.items() if not isinstance(v, NotGivenType)}
        return config.replace(**given) if given else config


def _signature_type(annotation: Any) -> Any:
    """``annotation`` or NOT_GIVEN: what a signature's parameter accepts (LightningCLI validates its default)."""
    return Union[NotGivenType, annotation]


def watch_signature(*leading: inspect.Parameter) -> inspect.Signature:
    """``(config=None, *, <family>=NOT_GIVEN, include=NOT_GIVEN, ...)`` with types: the keywords a callback
    accepts, listed for tools that read signatures (LightningCLI's jsonargparse), derived from the registry and
    :data:`gradwatch.options.GENERAL_OPTIONS` when called. Every default is :data:`NOT_GIVEN`, so an option left
    out of the YAML is left to the environment and the defaults, and one written there is given, whatever its
    value."""
    from gradwatch.registry import families

    P = inspect.Parameter
    params = [*leading, P("config", P.POSITIONAL_OR_KEYWORD, default=None, annotation=Optional[WatchConfig])]
    params += [P(f.key, P.KEYWORD_ONLY, default=NOT_GIVEN,
                 annotation=_signature_type(Union[bool, int, f.config_class])) for f in families()]
    params += [P(o.name, P.KEYWORD_ONLY, default=NOT_GIVEN, annotation=_signature_type(o.type))
               for o in GENERAL_OPTIONS]
    return inspect.Signature(params, return_annotation=None)


_SIGNED: list[Any] = []  # weak references to the classes list_watch_options signed


def _sign(cls: type) -> None:
    sig = watch_signature(inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD))
    cls.__init__.__signature__ = sig  # type: ignore[attr-defined]
    cls.__init__.__annotations__ = {p.name: p.annotation for p in sig.parameters.values() if p.name != "self"}


def _resign() -> None:
    for ref in list(_SIGNED):
        cls = ref()
        if cls is None:
            _SIGNED.remove(ref)
        else:
            _sign(cls)


def list_watch_options(cls: type) -> type:
    """Give ``cls.__init__(self, config=None, **kwargs)`` the signature of :func:`watch_signature`, so that
    LightningCLI YAML (``class_path`` + ``init_args``) sees every option; signed again whenever a family is
    registered or removed (``gradwatch.registry.register``). Also teaches jsonargparse :data:`NOT_GIVEN`
    (shown and saved as ``unset``)."""
    import weakref

    from gradwatch.registry import on_change

    _register_not_given_with_jsonargparse()
    _sign(cls)
    _SIGNED.append(weakref.ref(cls))
    on_change(_resign)
    return cls


def _register_not_given_with_jsonargparse() -> None:
    try:
        from jsonargparse.typing import register_type
    except ImportError:  # no LightningCLI: nothing reads the signature's types
        return

    def serialize(value: Any) -> str:
        if value is not NOT_GIVEN:
            raise ValueError("not NOT_GIVEN")
        return NotGivenType.TEXT

    def deserialize(value: Any) -> NotGivenType:
        if value is NOT_GIVEN or value == NotGivenType.TEXT:
            return NOT_GIVEN
        raise ValueError(f"not {NotGivenType.TEXT!r}")

    try:
        register_type(NotGivenType, serializer=serialize, deserializer=deserialize)
    except ValueError:  # registered already
        pass


def __getattr__(name: str) -> Any:
    # The family configs (SpectraConfig & co.) and their constants (SPECTRUM_METHODS, ...) once lived here and
    # moved beside their families; the old import path keeps working: the package's public names, then the
    # upper-case constants of the registered families' config modules.
    import gradwatch
    from gradwatch.registry import families

    if name in getattr(gradwatch, "__all__", ()):
        return getattr(gradwatch, name)
    if name.isupper():
        for fam in families():
            module = sys.modules.get(fam.config_class.__module__)
            if module is not None and hasattr(module, name):
                return getattr(module, name)
    raise AttributeError(f"module 'gradwatch.config' has no attribute {name!r}")


__all__ = ["NOT_GIVEN", "ON_ERROR_CHOICES", "Cadence", "WatchConfig", "as_cadence", "check_bool", "check_callable", "check_choice",
           "check_float", "check_int", "fail", "family_value", "list_watch_options", "watch_signature"]
