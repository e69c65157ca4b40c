"""What a :class:`~gradwatch.engine.watcher.Watcher` saves in a checkpoint and restores on resume: every
diagnostic's interval and carried state, the sinks' memory (heatmap history), postponed work, alert cooldowns,
the budgeted cadences' runs and the counters."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from gradwatch.metrics.base import tensors_to

if TYPE_CHECKING:
    from gradwatch.engine.watcher import Watcher

STATE_VERSION = 2


def diagnostic_key(watcher: Watcher, i: int) -> str:
    """The name diagnostic ``i`` is saved under: its index, stem and class, so a changed set of diagnostics
    restores into those that match."""
    d = watcher.diagnostics[i]
    return f"{i}:{d.stem}:{type(d).__name__}"


def watcher_state(watcher: Watcher) -> dict[str, Any]:
    """Everything needed to resume (on CPU)."""
    w = watcher
    return {
        "version": STATE_VERSION,
        "diagnostics": {diagnostic_key(w, i): {"interval": {k: v.cpu() for k, v in d.state_dict().items()},
                                               "updates": int(d._update_count),
                                               "carried": tensors_to(d.carried_state(), "cpu"),
                                               "failed": i in w._failed}
                        for i, d in enumerate(w.diagnostics)},
        "sinks": [s.state_dict() for s in w.sinks],
        "pending": sorted(w._pending),
        "alert_last": dict(w.alerts.last),
        "budgeted": w.budget.state_dict(lambda i: diagnostic_key(w, i)),
        "steps_seen": w.steps_seen,
        "skipped_steps": w.skipped_steps,
        "postponed_steps": w.postponed_steps,
    }


def load_watcher_state(watcher: Watcher, state: Mapping[str, Any]) -> None:
    """Restore :func:`watcher_state` into the watcher's diagnostics (those whose key matches) and sinks."""
    w = watcher
    saved = state.get("diagnostics", {})
    for i, d in enumerate(w.diagnostics):
        entry = saved.get(diagnostic_key(w, i))
        if entry is None:
            continue
        d.load_state_dict({k: v.to(d.device) for k, v in entry["interval"].items()}, strict=False)
        d._update_count = int(entry.get("updates", 0))
        d.load_carried_state(tensors_to(entry.get("carried", {}), d.device))
        if entry.get("failed"):
            w._failed.add(i)
        if entry.get("updates", 0) or entry.get("failed"):
            w._observed.add(i)
    for sink, s in zip(w.sinks, state.get("sinks", [])):
        sink.load_state_dict(s)
    w._pending = set(state.get("pending", []))
    w.alerts.last = dict(state.get("alert_last", {}))
    w.budget.load_state_dict(state.get("budgeted", {}), {diagnostic_key(w, i): i for i in range(len(w.diagnostics))})
    w.steps_seen = int(state.get("steps_seen", 0))
    w.skipped_steps = int(state.get("skipped_steps", 0))
    w.postponed_steps = int(state.get("postponed_steps", 0))
