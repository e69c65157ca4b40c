"""Configuration: :class:`WatchConfig` and :class:`Cadence`; the per-family configs live with their families.

Every option is validated when the object is built. A wrong value raises ``ValueError`` naming the
field, the value given and what was expected (with the valid choices where there is a list), so that
a typo fails before the first training step rather than an hour into a run.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, Optional, Union

ON_ERROR_CHOICES: tuple[str, ...] = ("warn", "raise")


def fail(field_name: str, value: Any, expected: str) -> ValueError:
    """The ValueError every bad option raises: the field, the value given and what was expected."""
    return ValueError(f"gradwatch: `{field_name}` expected {expected}, got {value!r}")


def check_int(field_name: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise fail(field_name, value, f"an int >= {minimum}")
    return value


def check_float(field_name: str, value: Any, *, low: float, high: float, open_low: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise fail(field_name, value, f"a number in {'(' if open_low else '['}{low}, {high}]")
    if (value <= low if open_low else value < low) or value > high:
        raise fail(field_name, value, f"a number in {'(' if open_low else '['}{low}, {high}]")
    return float(value)


def check_choice(field_name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise fail(field_name, value, f"one of {list(choices)}")
    return value


class Cadence:
    """When a diagnostic runs, as a set of optimizer steps (1-based: step t is the t-th update).

    Build one with :meth:`every`, :meth:`log_spaced` or :meth:`at`, and combine them with ``|``::

        Cadence.every(100) | Cadence.log_spaced(per_decade=4) | Cadence.at([1, 7])

    A plain int ``n`` wherever a cadence is accepted means ``Cadence.every(n)``.
    """

    def __init__(self, *, every: int | None = None, first: bool = True, per_decade: int | None = None,
                 steps: Iterable[int] = (), _parts: tuple[Cadence, ...] = (), _budgeted: int | None = None) -> None:
        self._budgeted = None if _budgeted is None else check_int("minimum", _budgeted, minimum=1)
        self._every = None if every is None else check_int("every", every, minimum=1)
        self._first = bool(first)
        self._per_decade = None if per_decade is None else check_int("per_decade", per_decade, minimum=1)
        step_list = list(steps)
        for s in step_list:
            check_int("steps", s, minimum=1)
        self._steps = frozenset(step_list)
        self._parts = _parts

    @classmethod
    def every(cls, n: int, *, first: bool = True) -> Cadence:
        """Due at every multiple of ``n`` (and at step 1 when ``first``, so a chart starts at the start)."""
        return cls(every=check_int("every", n, minimum=1), first=first)

    @classmethod
    def log_spaced(cls, per_decade: int = 5) -> Cadence:
        """Due at round(10**(k / per_decade)) for k = 0, 1, ...: dense early, sparse late."""
        return cls(per_decade=check_int("per_decade", per_decade, minimum=1))

    @classmethod
    def at(cls, steps: Iterable[int]) -> Cadence:
        """Due at exactly these steps."""
        return cls(steps=steps)

    @classmethod
    def within_budget(cls, minimum: int = 1) -> Cadence:
        """As often as the overhead budget allows: due at step 1, then every k >= ``minimum`` steps, where the
        engine picks k from this diagnostic's measured cost and the training step's own time so that the
        diagnostic takes at most its share of ``max_overhead`` (see ``Watcher.budgeted_period``)."""
        return cls(_budgeted=check_int("minimum", minimum, minimum=1))

    @property
    def budgeted_minimum(self) -> int | None:
        """``minimum`` of a :meth:`within_budget` cadence; None for the others."""
        return self._budgeted

    def __or__(self, other: Cadence) -> Cadence:
        if not isinstance(other, Cadence):
            return NotImplemented
        if self._budgeted is not None or other._budgeted is not None:
            raise ValueError("gradwatch: Cadence.within_budget() cannot be combined with another cadence")
        return Cadence(_parts=(self, other))

    def _key(self) -> tuple:
        # `first` only matters for an every-n cadence
        return (self._every, self._first if self._every is not None else True, self._per_decade, self._steps,
                self._parts, self._budgeted)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Cadence):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def is_due(self, step: int) -> bool:
        """Whether the diagnostic runs at optimizer step ``step`` (1-based)."""
        if self._parts:
            return any(p.is_due(step) for p in self._parts)
        if self._budgeted is not None:  # the engine spaces the later runs (Watcher.budgeted_period)
            return step == 1
        if step in self._steps:
            return True
        if self._every is not None and (step % self._every == 0 or (self._first and step == 1)):
            return True
        if self._per_decade is not None and step >= 1:
            k = round(self._per_decade * math.log10(step))
            # step is due when it is the rounded value of some 10**(k/per_decade)
            for kk in (k - 1, k, k + 1):
                if kk >= 0 and round(10 ** (kk / self._per_decade)) == step:
                    return True
        return False

    def __repr__(self) -> str:
        if self._parts:
            return " | ".join(repr(p) for p in self._parts)
        if self._budgeted is not None:
            return f"Cadence.within_budget(minimum={self._budgeted})"
        bits = []
        if self._every is not None:
            bits.append(f"Cadence.every({self._every}{'' if self._first else ', first=False'})")
        if self._per_decade is not None:
            bits.append(f"Cadence.log_spaced({self._per_decade})")
        if self._steps:
            bits.append(f"Cadence.at({sorted(self._steps)})")
        return " | ".join(bits) or "Cadence.at([])"


def as_cadence(field_name: str, value: Any) -> Cadence:
    """Coerce an int or a :class:`Cadence` into a Cadence, or raise a ValueError naming the field."""
    if isinstance(value, Cadence):
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise fail(field_name, value, "a positive int or a gradwatch.Cadence")
    return Cadence.every(value)




def check_bool(field_name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise fail(field_name, value, "True or False")
    return value


def check_callable(field_name: str, value: Any, what: str) -> Any:
    if value is not None and not callable(value):
        raise fail(field_name, value, what)
    return value


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
        for legacy in ("embeddings", "output_head"):  # once options of SpectraConfig; now shared by every family
            spectra = chosen.get("spectra")
            if spectra is not None and getattr(spectra, legacy, None):
                warnings.warn(f"gradwatch: SpectraConfig({legacy}=True) is deprecated; layer selection is shared "
                              f"by every family: use WatchConfig({legacy}=True)", DeprecationWarning, stacklevel=2)
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
    # SpectraConfig & co. moved beside their families; the old import path keeps working
    import gradwatch

    if name in ("SPECTRUM_STATS", "SPECTRUM_METHODS"):
        from gradwatch.metrics import grad_spectrum

        return getattr(grad_spectrum, name)
    if name in getattr(gradwatch, "__all__", ()):
        return getattr(gradwatch, name)
    raise AttributeError(f"module 'gradwatch.config' has no attribute {name!r}")
