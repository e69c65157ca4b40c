"""The overhead budget: gradwatch's share of wall time since attach, the postponing of due work over
``max_overhead``, and the spacing of ``Cadence.within_budget()`` diagnostics.

The :class:`~gradwatch.engine.watcher.Watcher` owns one :class:`OverheadBudget` and reports to it every
second it spends (its events, the hooks' work inside the user's forward and backward, each observation).
A host adapter wraps each of its entry points in :meth:`OverheadBudget.counting`, so that the clock runs from
entering a gradwatch callback method to leaving it (the host glue around the events, too), once: the events'
and hooks' own reports inside such a block are not added again.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from gradwatch.engine.ranks import Ranks

BUDGETED_SHARE_WITHOUT_BUDGET = 0.05  # what a Cadence.within_budget() diagnostic aims at when max_overhead is off


class OverheadBudget:
    """gradwatch's time against the training's, and what it allows.

    Args:
        max_overhead: the share of wall time gradwatch may take (one-off costs aside); None for no bound.
        clock: seconds since an arbitrary origin.
        ranks: rank zero decides what is due for every rank.
        say_once: ``say_once(key, message)`` warns once per key.
        describe: ``describe(i)`` names diagnostic ``i`` in a message.
    """

    def __init__(self, max_overhead: float | None, clock: Callable[[], float], ranks: Ranks, *,
                 say_once: Callable[[str, str], None], describe: Callable[[int], str]) -> None:
        self.max_overhead = max_overhead
        self.clock = clock
        self.ranks = ranks
        self._say_once = say_once
        self._describe = describe
        self._depth = 0  # open counting() blocks
        self._block_start = 0.0  # when the outermost one opened
        self.reset()

    def reset(self, wall_start: float | None = None) -> None:
        """A new run (one attach), whose wall time starts at ``wall_start``."""
        self.engine_seconds = 0.0
        self.warmup_seconds = 0.0  # one-off costs (attach, each diagnostic's first run): outside the budget
        self.wall_start = wall_start
        self.warmed: set[int] = set()
        self.budgeted: dict[int, dict[str, Any]] = {}  # Cadence.within_budget() diagnostics: last run, cost, period

    # ---- time spent ---------------------------------------------------------------------------

    def spent(self, t0: float, warmup: bool = False) -> None:
        """gradwatch worked from ``t0`` until now (``warmup``: a one-off cost); inside a :meth:`counting` block
        the block counts it."""
        if self._depth:
            return
        dt = self.clock() - t0
        self.engine_seconds += dt
        if warmup:
            self.warmup_seconds += dt

    def spent_in_hooks(self, seconds: float) -> None:
        """Seconds gradwatch's hooks and host wrappers spent inside the user's code (outside any event)."""
        if not self._depth:
            self.engine_seconds += seconds

    @contextlib.contextmanager
    def counting(self, warmup: bool = False) -> Iterator[None]:
        """Everything inside the block is gradwatch's time (``warmup``: a one-off cost): a host adapter's entry
        point, its glue and the engine's events alike. Nested blocks count once, in the outermost."""
        t0 = self.clock()
        if not self._depth:
            self._block_start = t0
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if not self._depth:
                self.spent(t0, warmup)

    def started(self, t0: float) -> float:
        """When gradwatch's time began for a run attached at ``t0``: the outermost open block's start, if any."""
        return self._block_start if self._depth else t0

    def observed(self, i: int, seconds: float, continuing: bool = False) -> None:
        """Diagnostic ``i`` observed for ``seconds`` (already counted through :meth:`spent`): its first run is a
        one-off cost; a ``within_budget`` diagnostic's cost per run is updated (:meth:`note_cost`)."""
        if i in self.budgeted:
            self.note_cost(i, seconds, continuing=continuing)
        if i not in self.warmed:
            self.warmed.add(i)
            self.warmup_seconds += seconds

    def overhead(self) -> float:
        """gradwatch's share of wall time since attach (everything it did, warm-up included)."""
        return self._share(self.engine_seconds)

    def _share(self, seconds: float) -> float:
        if self.wall_start is None:
            return 0.0
        wall = self.clock() - self.wall_start
        return seconds / wall if wall > 0 else 0.0

    def budgeted_overhead(self) -> float:
        """gradwatch's share of wall time without its one-off costs: what ``max_overhead`` bounds."""
        return self._share(self.engine_seconds - self.warmup_seconds)

    def over_budget(self, pending: set[int]) -> bool:
        """Whether the due work ``pending`` must wait. A diagnostic's first run always goes ahead, and one-off
        costs (attach, first runs: lazy imports, thread pools, the probe draw) do not count against the budget,
        so one slow start cannot silence a diagnostic for the rest of a run."""
        budget = self.max_overhead
        if budget is None or not (pending & self.warmed):
            return False
        return self.budgeted_overhead() > budget

    # ---- budgeted cadences (Cadence.within_budget) -----------------------------------------------

    def due(self, step: int, cadences: Sequence[Any], period: Callable[[int, int, int], int]) -> set[int]:
        """The ``within_budget`` diagnostics due at ``step`` (``cadences``: each diagnostic's observe cadence;
        ``period(i, minimum, count)``: the steps between two runs, :meth:`period` with the steps taken so far),
        decided by rank zero for every rank."""
        minima = {i: c.budgeted_minimum for i, c in enumerate(cadences) if c.budgeted_minimum is not None}
        ids = list(minima)
        if not ids:
            return set()
        flags = []
        for i in ids:
            b = self.budgeted.setdefault(i, {"last": None, "cost": None, "runs": 0, "period": None})
            minimum = minima[i]
            if b["last"] is None:
                flags.append(True)  # the first run of this run (step 1, or the first step after a resume)
                continue
            gap = step - b["last"]
            if gap < minimum:
                flags.append(False)
                continue
            if b["period"] is None:  # fixed for this interval, from at least `minimum` steps of training time
                b["period"] = period(i, minimum, len(ids))
            flags.append(gap >= b["period"])
        flags = self.ranks.flags_from_zero(flags)
        for i, f in zip(ids, flags):
            if f:
                self.budgeted[i]["last"] = step
        return {i for i, f in zip(ids, flags) if f}

    def period(self, i: int, minimum: int, count: int, steps_seen: int) -> int:
        """Steps between two runs of the ``within_budget`` diagnostic ``i``: the smallest k >= ``minimum`` with
        cost / (k * step) <= share, where cost is its measured seconds per run (the first run's, one-off costs
        included, so the first gap errs long; then the second run's; then an exponential average: a second run
        soon after the first would be budgeted and could silence every family for many steps), step the
        training's own seconds per step (wall time since attach less gradwatch's, over the ``steps_seen``
        steps taken) and share = max_overhead / (count + 1) for ``count`` such diagnostics (the rest of the
        budget is left to fixed cadences; 5% when max_overhead is off). A period within 25% of the previous
        one keeps the previous one, so the runs stay evenly spaced."""
        b = self.budgeted[i]
        wall = self.clock() - (self.wall_start or 0.0)
        step_seconds = (wall - self.engine_seconds) / max(steps_seen, 1)
        budget = self.max_overhead or BUDGETED_SHARE_WITHOUT_BUDGET
        share = budget / (count + 1)
        cost = b["cost"] or 0.0
        period = minimum if step_seconds <= 0 or cost <= 0 else max(minimum, math.ceil(cost / (share * step_seconds)))
        old = b.get("previous")
        if old is not None and 0.8 * old <= period <= 1.25 * old:
            period = old
        b["previous"] = period
        if period > 10 * minimum and step_seconds > 0:
            measured = "its first run, one-off costs included" if b["runs"] < 2 else "its measured cost"
            self._say_once(f"budgeted:{i}", f"gradwatch: {self._describe(i)} costs {cost:.3g} s a run, "
                           f"{cost / step_seconds:.0f} training steps' time ({measured}); within its share of "
                           f"max_overhead={budget:g} ({share:.1%}) it runs every {period} steps. To see more "
                           "points, make it cheaper (e.g. a smaller probe_size) or give a fixed cadence (every=N) "
                           "and a larger max_overhead (said once)")
        return period

    def note_cost(self, i: int, seconds: float, continuing: bool = False) -> None:
        """Add one observation's seconds to the cost of a run of the ``within_budget`` diagnostic ``i``: a new
        run, or (``continuing``, :meth:`Diagnostic.continues`) the run under way, so a burst costs its sum."""
        b = self.budgeted[i]
        if continuing and b["cost"] is not None:
            b["cost"] += seconds if b["runs"] <= 2 else 0.3 * seconds  # the same exponential average, summed
            return
        b["runs"] += 1
        b["cost"] = seconds if b["runs"] <= 2 or b["cost"] is None else 0.7 * b["cost"] + 0.3 * seconds
        b["period"] = None

    # ---- state --------------------------------------------------------------------------------

    def state_dict(self, key: Callable[[int], str]) -> dict[str, dict[str, Any]]:
        """The budgeted diagnostics' runs by ``key(i)`` (the period is recomputed after a resume)."""
        return {key(i): {k: v for k, v in b.items() if k != "period"} for i, b in self.budgeted.items()}

    def load_state_dict(self, saved: Mapping[str, Mapping[str, Any]], keys: Mapping[str, int]) -> None:
        """Restore :meth:`state_dict` into the diagnostics whose key is in ``keys`` (key -> index)."""
        self.budgeted = {keys[k]: {**dict(b), "period": None} for k, b in saved.items() if k in keys}
