"""Configuration: :class:`WatchConfig`, the per-family configs and :class:`Cadence`.

Every option is validated when the object is built. A wrong value raises ``ValueError`` naming the
field, the value given and what was expected (with the valid choices where there is a list), so that
a typo fails before the first training step rather than an hour into a run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from gradwatch.functional.spectra import STATISTICS

SPECTRUM_STATS: tuple[str, ...] = STATISTICS
SPECTRUM_METHODS: tuple[str, ...] = ("gram", "gram32", "svdvals")
ON_ERROR_CHOICES: tuple[str, ...] = ("warn", "raise")


def _fail(field_name: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"gradwatch: `{field_name}` expected {expected}, got {value!r}")


def _check_int(field_name: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _fail(field_name, value, f"an int >= {minimum}")
    return value


def _check_float(field_name: str, value: Any, *, low: float, high: float, open_low: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(field_name, value, f"a number in {'(' if open_low else '['}{low}, {high}]")
    if (value <= low if open_low else value < low) or value > high:
        raise _fail(field_name, value, f"a number in {'(' if open_low else '['}{low}, {high}]")
    return float(value)


def _check_choice(field_name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise _fail(field_name, value, f"one of {list(choices)}")
    return value


class Cadence:
    """When a diagnostic runs, as a set of optimizer steps (1-based: step t is the t-th update).

    Build one with :meth:`every`, :meth:`log_spaced` or :meth:`at`, and combine them with ``|``::

        Cadence.every(100) | Cadence.log_spaced(per_decade=4) | Cadence.at([1, 7])

    A plain int ``n`` wherever a cadence is accepted means ``Cadence.every(n)``.
    """

    def __init__(self, *, every: int | None = None, first: bool = True, per_decade: int | None = None,
                 steps: Iterable[int] = (), _parts: tuple[Cadence, ...] = ()) -> None:
        self._every = None if every is None else _check_int("every", every, minimum=1)
        self._first = bool(first)
        self._per_decade = None if per_decade is None else _check_int("per_decade", per_decade, minimum=1)
        step_list = list(steps)
        for s in step_list:
            _check_int("steps", s, minimum=1)
        self._steps = frozenset(step_list)
        self._parts = _parts

    @classmethod
    def every(cls, n: int, *, first: bool = True) -> Cadence:
        """Due at every multiple of ``n`` (and at step 1 when ``first``, so a chart starts at the start)."""
        return cls(every=_check_int("every", n, minimum=1), first=first)

    @classmethod
    def log_spaced(cls, per_decade: int = 5) -> Cadence:
        """Due at round(10**(k / per_decade)) for k = 0, 1, ...: dense early, sparse late."""
        return cls(per_decade=_check_int("per_decade", per_decade, minimum=1))

    @classmethod
    def at(cls, steps: Iterable[int]) -> Cadence:
        """Due at exactly these steps."""
        return cls(steps=steps)

    def __or__(self, other: Cadence) -> Cadence:
        if not isinstance(other, Cadence):
            return NotImplemented
        return Cadence(_parts=(self, other))

    def _key(self) -> tuple:
        # `first` only matters for an every-n cadence
        return (self._every, self._first if self._every is not None else True, self._per_decade, self._steps,
                self._parts)

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
        raise _fail(field_name, value, "a positive int or a gradwatch.Cadence")
    return Cadence.every(value)


@dataclass(frozen=True)
class SpectraConfig:
    """Per-layer gradient spectra (family ``grad_spectrum``).

    Attributes:
        every: cadence of the full spectrum of every watched layer's mini-batch gradient.
        stats: which statistics to log; any of ``SPECTRUM_STATS``.
        method: ``"gram"``: eigenvalues of the smaller Gram matrix formed and solved in float64 (on the
            CPU one layer per core, on a GPU batched over same-shaped layers; statistics within ~1e-6
            relative of a float64 SVD, even for rank-deficient gradients);
            ``"gram32"``: the same in float32 with torch, batched; kept to show the precision choice: it is
            no faster than ``"gram"`` (slower on the CPU), and a singular value below
            ~sqrt(eps32) * s_1 = 3e-4 * s_1 is lost in rounding, so nuclear norm and effective rank
            of rank-deficient or ill-conditioned gradients can be off by 1e-3 to 1e-1;
            ``"svdvals"``: ``torch.linalg.svdvals`` in float64, batched (the reference).
        mad: log the cross-layer mean absolute difference of each statistic per layer family.
        heatmap_every: cadence of the layer-by-step heatmap images (0 turns them off).
        embeddings: also watch embedding tables (large; off by default).
        output_head: also watch the output head (``lm_head`` and weights tied to an embedding).
        per_example: the seed papers' protocol: per-example gradients on the probe set, spectra averaged
            per layer, logged as ``grad_spectrum/per_example/<stat>/<param>``.
        per_example_every: cadence of the per-example mode.
        per_example_size: how many probe examples the per-example mode uses.
    """

    every: int | Cadence = 50
    stats: Sequence[str] = SPECTRUM_STATS
    method: Literal["gram", "gram32", "svdvals"] = "gram"
    mad: bool = True
    heatmap_every: int | Cadence = 500
    embeddings: bool = False
    output_head: bool = False
    per_example: bool = False
    per_example_every: int | Cadence = 500
    per_example_size: int = 16

    def __post_init__(self) -> None:
        object.__setattr__(self, "every", as_cadence("SpectraConfig.every", self.every))
        if isinstance(self.stats, str) or not isinstance(self.stats, Iterable):
            raise _fail("SpectraConfig.stats", self.stats, f"a list drawn from {list(SPECTRUM_STATS)}")
        stats = tuple(self.stats)
        for s in stats:
            _check_choice("SpectraConfig.stats", s, SPECTRUM_STATS)
        if not stats:
            raise _fail("SpectraConfig.stats", self.stats, f"at least one of {list(SPECTRUM_STATS)}")
        object.__setattr__(self, "stats", stats)
        _check_choice("SpectraConfig.method", self.method, SPECTRUM_METHODS)
        if self.heatmap_every == 0:
            object.__setattr__(self, "heatmap_every", None)
        else:
            object.__setattr__(self, "heatmap_every", as_cadence("SpectraConfig.heatmap_every", self.heatmap_every))
        object.__setattr__(self, "per_example_every",
                           as_cadence("SpectraConfig.per_example_every", self.per_example_every))
        _check_int("SpectraConfig.per_example_size", self.per_example_size, minimum=1)
        for name in ("mad", "embeddings", "output_head", "per_example"):
            if not isinstance(getattr(self, name), bool):
                raise _fail(f"SpectraConfig.{name}", getattr(self, name), "True or False")


@dataclass(frozen=True)
class SharpnessConfig:
    """Edge-of-stability sharpness (family ``sharpness``): the top Hessian eigenvalue of the training
    loss on a fixed probe batch, against the optimizer's stability threshold.

    Attributes:
        every: cadence.
        probe_size: examples in the probe batch (drawn once, seeded, from the training data).
        max_iter: Lanczos iterations at most (Hessian-vector products per estimate).
        tol: relative residual at which Lanczos stops (``||Hv - lambda v|| <= tol |lambda|``).
        top_k: how many top eigenvalues to log (``sharpness/lambda_<i>`` beyond the first).
        trace_samples: Hutchinson probes for ``sharpness/trace`` (0 turns the trace off).
        warm_start: start Lanczos from the previous top eigenvector.
        precondition: for Adam/AdamW, also log ``lambda_max_precond`` = lambda_1(P^-1/2 H P^-1/2).
    """

    every: int | Cadence = 500
    probe_size: int = 256
    max_iter: int = 50
    tol: float = 1e-3
    top_k: int = 1
    trace_samples: int = 0
    warm_start: bool = True
    precondition: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "every", as_cadence("SharpnessConfig.every", self.every))
        _check_int("SharpnessConfig.probe_size", self.probe_size, minimum=1)
        _check_int("SharpnessConfig.max_iter", self.max_iter, minimum=1)
        _check_float("SharpnessConfig.tol", self.tol, low=0.0, high=0.5)
        _check_int("SharpnessConfig.top_k", self.top_k, minimum=1)
        if self.top_k > self.max_iter:
            raise _fail("SharpnessConfig.top_k", self.top_k, f"an int <= max_iter ({self.max_iter})")
        _check_int("SharpnessConfig.trace_samples", self.trace_samples, minimum=0)
        for name in ("warm_start", "precondition"):
            if not isinstance(getattr(self, name), bool):
                raise _fail(f"SharpnessConfig.{name}", getattr(self, name), "True or False")


_FAMILY_CONFIGS: dict[str, type] = {"spectra": SpectraConfig, "sharpness": SharpnessConfig}
_FAMILY_DEFAULT_ON: dict[str, bool] = {"spectra": True, "sharpness": False}


@dataclass(frozen=True)
class WatchConfig:
    """Everything gradwatch does, in one validated object.

    Attributes:
        spectra: ``True`` (defaults), ``False`` (off) or a :class:`SpectraConfig`. On by default.
        sharpness: ``True``, ``False`` or a :class:`SharpnessConfig`. Off by default (it costs extra
            forward/backward passes on a probe batch).
        include: glob patterns over parameter names (``named_parameters()``) to watch.
        exclude: glob patterns to leave out (applied after ``include``).
        log_dir: where to write TensorBoard files when the trainer has no TensorBoard writer of its own.
        max_overhead: share of wall time gradwatch may use; a due computation that would exceed it is
            postponed (``None`` turns the budget off).
        on_error: ``"warn"``: a failing diagnostic warns once, logs NaN and training goes on;
            ``"raise"``: strict, for tests and CI.
        probe_seed: seed of the probe-set draw (a private generator: the user's RNG is untouched).
        loss_fn: ``loss_fn(model, batch) -> Tensor[B]``, the per-example loss on a probe batch, for
            models whose loss gradwatch cannot infer.
    """

    spectra: bool | SpectraConfig = True
    sharpness: bool | SharpnessConfig = False
    include: Sequence[str] = ("*",)
    exclude: Sequence[str] = ()
    log_dir: str | None = None
    max_overhead: float | None = 0.05
    on_error: Literal["warn", "raise"] = "warn"
    probe_seed: int = 0
    loss_fn: Callable[..., Any] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        for name, cls in _FAMILY_CONFIGS.items():
            value = getattr(self, name)
            if value is True:
                value = cls()
            elif value is False or value is None:
                value = None
            elif not isinstance(value, cls):
                raise _fail(name, value, f"True, False or a gradwatch.{cls.__name__}")
            object.__setattr__(self, name, value)
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            if not isinstance(value, Iterable) or not all(isinstance(p, str) and p for p in value):
                raise _fail(name, getattr(self, name), "a list of non-empty glob patterns (str)")
            object.__setattr__(self, name, tuple(value))
        if not self.include:
            raise _fail("include", self.include, "at least one glob pattern, e.g. ['*']")
        if self.log_dir is not None and not isinstance(self.log_dir, str):
            raise _fail("log_dir", self.log_dir, "a directory path (str) or None")
        if self.max_overhead is not None:
            _check_float("max_overhead", self.max_overhead, low=0.0, high=1.0)
        _check_choice("on_error", self.on_error, ON_ERROR_CHOICES)
        _check_int("probe_seed", self.probe_seed, minimum=0)
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise _fail("loss_fn", self.loss_fn, "a callable loss_fn(model, batch) -> Tensor[B]")

    @classmethod
    def from_kwargs(cls, config: WatchConfig | None = None, **kwargs: Any) -> WatchConfig:
        """``GradWatch(config)`` or ``GradWatch(spectra=..., ...)``: one path for both."""
        if config is not None and not isinstance(config, WatchConfig):
            raise _fail("config", config, "a gradwatch.WatchConfig or None")
        valid = [f.name for f in fields(cls)]
        for key in kwargs:
            if key not in valid:
                raise ValueError(f"gradwatch: unknown option {key!r}; valid options are {valid}")
        if config is None:
            return cls(**kwargs)
        if not kwargs:
            return config
        merged = {f.name: getattr(config, f.name) for f in fields(cls)}
        merged.update(kwargs)
        return cls(**merged)
