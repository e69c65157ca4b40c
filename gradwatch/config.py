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
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, Optional, Union

from gradwatch.cadence import Cadence, as_cadence
from gradwatch.checks import check_bool, check_callable, check_choice, check_float, check_int, fail

ON_ERROR_CHOICES: tuple[str, ...] = ("warn", "raise")


#: The options every family shares, with their defaults (families come from ``gradwatch.registry``).
_GENERAL: dict[str, Any] = {
    "include": ("*",), "exclude": (), "embeddings": False, "output_head": False, "log_dir": None,
    "max_overhead": 0.05, "on_error": "warn", "probe_seed": 0, "loss_fn": None, "on_alert": None,
    "alert_cooldown": 200,
}


class WatchConfig:
    """Everything gradwatch does, in one validated object.

    Family keywords (one per registered family, see ``gradwatch.registry``): ``spectra`` (on by default),
    ``sharpness``, ``signals``, ``stability`` (off by default): each ``True`` (its defaults), ``False``
    (off) or its config object (``SpectraConfig(every=10)``).

    Attributes:
        include: glob patterns over parameter names (``named_parameters()``) to watch.
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

    def __init__(self, **options: Any) -> None:
        from gradwatch.registry import families

        fams = {f.key: f for f in families()}
        unknown = [k for k in options if k not in _GENERAL and k not in fams]
        if unknown:
            raise ValueError(f"gradwatch: unknown option {unknown[0]!r}; valid options are "
                             f"{[*fams, *_GENERAL]}")
        values = {**_GENERAL, **{k: v for k, v in options.items() if k in _GENERAL}}
        chosen: dict[str, Any] = {}
        for key, fam in fams.items():
            value = options.get(key, fam.default_on)
            if value is True:
                value = fam.config_class()
            elif value is False or value is None:
                value = None
            elif not isinstance(value, fam.config_class):
                raise fail(key, value, f"True, False or a gradwatch.{fam.config_class.__name__}")
            chosen[key] = value
        object.__setattr__(self, "_families", chosen)
        for name in ("include", "exclude"):
            value = values[name]
            if isinstance(value, str):
                value = (value,)
            if not isinstance(value, Iterable) or not all(isinstance(p, str) and p for p in value):
                raise fail(name, values[name], "a list of non-empty glob patterns (str)")
            values[name] = tuple(value)
        if not values["include"]:
            raise fail("include", values["include"], "at least one glob pattern, e.g. ['*']")
        for name in ("embeddings", "output_head"):
            check_bool(name, values[name])
        for legacy in ("embeddings", "output_head"):  # once options of a family's config; now shared by every family
            for fam_config in chosen.values():
                if fam_config is not None and getattr(fam_config, legacy, None):
                    warnings.warn(f"gradwatch: {type(fam_config).__name__}({legacy}=True) is deprecated; layer "
                                  f"selection is shared by every family: use WatchConfig({legacy}=True)",
                                  DeprecationWarning, stacklevel=2)
                    values[legacy] = True
        if values["log_dir"] is not None and not isinstance(values["log_dir"], str):
            raise fail("log_dir", values["log_dir"], "a directory path (str) or None")
        if values["max_overhead"] is not None:
            check_float("max_overhead", values["max_overhead"], low=0.0, high=1.0, open_low=False)
            if values["max_overhead"] == 0:
                values["max_overhead"] = None
        check_choice("on_error", values["on_error"], ON_ERROR_CHOICES)
        check_int("probe_seed", values["probe_seed"], minimum=0)
        check_callable("loss_fn", values["loss_fn"], "a callable loss_fn(model, batch) -> Tensor[B]")
        check_callable("on_alert", values["on_alert"], "a callable on_alert(alert) or None")
        check_int("alert_cooldown", values["alert_cooldown"], minimum=0)
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

    def options(self) -> dict[str, Any]:
        """Every option (families included) as keywords that rebuild this config."""
        out = {k: getattr(self, k) for k in _GENERAL}
        out.update({k: (False if v is None else v) for k, v in self._families.items()})
        return out

    def replace(self, **changes: Any) -> WatchConfig:
        """A copy with ``changes`` applied (validated again)."""
        return WatchConfig(**{**self.options(), **changes})

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
        """``GradWatch(config)`` or ``GradWatch(spectra=..., ...)``: one path for both. With a ``config``, the
        keywords override it, except those equal to their default: LightningCLI passes every listed keyword,
        so a default there cannot tell "given" from "left out" (to set an option back to its default, build
        the config with it: ``config.replace(max_overhead=0.05)``)."""
        if config is not None and not isinstance(config, WatchConfig):
            raise fail("config", config, "a gradwatch.WatchConfig or None")
        if config is None:
            return cls(**kwargs)
        defaults = cls().options()  # LightningCLI passes every listed keyword: those left at a default
        changes = {k: v for k, v in kwargs.items() if k not in defaults or not _same(v, defaults[k])}
        return config.replace(**changes) if changes else config


_GENERAL_TYPES: dict[str, Any] = {
    "include": Sequence[str], "exclude": Sequence[str], "embeddings": bool, "output_head": bool,
    "log_dir": Optional[str], "max_overhead": Optional[float], "on_error": Literal["warn", "raise"],
    "probe_seed": int, "loss_fn": Optional[Callable[..., Any]], "on_alert": Optional[Callable[..., Any]],
    "alert_cooldown": int,
}


def watch_signature(*leading: inspect.Parameter) -> inspect.Signature:
    """``(config=None, *, <family>=..., include=..., ...)`` with types and defaults: the keywords a callback
    accepts, listed for tools that read signatures (LightningCLI's jsonargparse), derived from the registry."""
    from gradwatch.registry import families

    P = inspect.Parameter
    params = [*leading, P("config", P.POSITIONAL_OR_KEYWORD, default=None, annotation=Optional[WatchConfig])]
    params += [P(f.key, P.KEYWORD_ONLY, default=f.default_on, annotation=Union[bool, f.config_class])
               for f in families()]
    params += [P(name, P.KEYWORD_ONLY, default=_GENERAL[name], annotation=_GENERAL_TYPES[name]) for name in _GENERAL]
    return inspect.Signature(params, return_annotation=None)


def list_watch_options(cls: type) -> type:
    """Give ``cls.__init__(self, config=None, **kwargs)`` the signature of :func:`watch_signature`, so that
    LightningCLI YAML (``class_path`` + ``init_args``) sees every option; keywords left at their defaults
    do not override a given ``config``."""
    sig = watch_signature(inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD))
    cls.__init__.__signature__ = sig  # type: ignore[attr-defined]
    cls.__init__.__annotations__ = {p.name: p.annotation for p in sig.parameters.values() if p.name != "self"}
    return cls


def _same(a: Any, b: Any) -> bool:
    if a is True and b is not None and not isinstance(b, bool):  # True means "the family's defaults"
        return type(b)() == b
    if a is False and b is False:
        return True
    try:
        return bool(a == b) and type(a) is type(b)
    except Exception:
        return False



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


__all__ = ["ON_ERROR_CHOICES", "Cadence", "WatchConfig", "as_cadence", "check_bool", "check_callable", "check_choice",
           "check_float", "check_int", "fail", "list_watch_options", "watch_signature"]
