"""When a diagnostic runs: :class:`Cadence`, a set of optimizer steps, and :func:`as_cadence` for the options
that accept an int or a Cadence.

Below every layer that needs it (the families' configs, the metrics, the engine); it imports only
:mod:`gradwatch.checks`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from gradwatch.checks import check_int, fail


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
