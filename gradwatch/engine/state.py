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
    """The name diagnostic ``i`` is saved under: its index, stem and class. A resume matches them by stem,
    class and rank among those of that stem and class (:func:`_identity`), not by index, so a family added or
    removed in front of another does not cost the other its state."""
    d = watcher.diagnostics[i]
    return f"{i}:{d.stem}:{type(d).__name__}"


def _identity(keys: list[str]) -> dict[str, str]:
    """``{saved key: "stem:Class#n"}``: the n-th diagnostic of that stem and class, in saved order."""
    seen: dict[str, int] = {}
    out = {}
    for key in sorted(keys, key=lambda k: int(k.split(":", 1)[0]) if k.split(":", 1)[0].isdigit() else -1):
        kind = key.split(":", 1)[1] if key.split(":", 1)[0].isdigit() else key
        out[key] = f"{kind}#{seen.get(kind, 0)}"
        seen[kind] = seen.get(kind, 0) + 1
    return out


def _layers(d: Any) -> list[str] | None:
    tags = getattr(d, "tags", None)
    return list(tags) if isinstance(tags, (list, tuple)) else None


def watcher_state(watcher: Watcher) -> dict[str, Any]:
    """Everything needed to resume (on CPU)."""
    w = watcher
    return {
        "version": STATE_VERSION,
        "diagnostics": {diagnostic_key(w, i): {"interval": {k: v.cpu() for k, v in d.state_dict().items()},
                                               "updates": int(d._update_count),
                                               "carried": tensors_to(d.carried_state(), "cpu"),
                                               "failed": i in w._failed, "layers": _layers(d)}
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
    saved_ids = _identity(list(saved))
    by_id = {ident: key for key, ident in saved_ids.items()}
    ours = _identity([diagnostic_key(w, i) for i in range(len(w.diagnostics))])
    index = {ident: int(key.split(":", 1)[0]) for key, ident in ours.items()}
    restored: dict[str, int] = {}  # saved key -> index of the diagnostic it was restored into
    fresh, changed = [], []
    for ident, i in sorted(index.items(), key=lambda kv: kv[1]):
        d = w.diagnostics[i]
        key = by_id.get(ident)
        if key is None:
            fresh.append(ident.split("#")[0])
            continue
        entry = saved[key]
        if entry.get("layers") is not None and entry["layers"] != _layers(d):
            changed.append(ident.split("#")[0])  # other layers watched: its per-layer state means nothing here
            continue
        try:
            d.load_state_dict({k: v.to(d.device) for k, v in entry["interval"].items()}, strict=False)
            d.load_carried_state(tensors_to(entry.get("carried", {}), d.device))
        except Exception:  # a state of another shape (other settings): this diagnostic starts afresh
            d.reset()
            changed.append(ident.split("#")[0])
            continue
        restored[key] = i
        d._update_count = int(entry.get("updates", 0))
        if entry.get("failed"):
            w._failed.add(i)
        if entry.get("updates", 0) or entry.get("failed"):
            w._observed.add(i)
    dropped = sorted({saved_ids[k].split("#")[0] for k in saved if saved_ids[k] not in index})
    if fresh or changed or dropped:
        parts = [f"{what}: {', '.join(names)}" for what, names in
                 (("started fresh (not in the checkpoint)", fresh), ("started fresh (its layers or shapes changed)",
                  changed), ("dropped (not in this run's settings)", dropped)) if names]
        w._warn_once("resume", "gradwatch: resuming from a checkpoint written with other gradwatch settings; "
                               "restored what matches, " + "; ".join(parts))
    for sink, s in zip(w.sinks, state.get("sinks", [])):
        sink.load_state_dict(s)
    saved_index = {int(k.split(":", 1)[0]): k for k in saved if k.split(":", 1)[0].isdigit()}
    w._pending = {restored[saved_index[j]] for j in state.get("pending", []) if saved_index.get(j) in restored}
    w.alerts.last = dict(state.get("alert_last", {}))
    w.budget.load_state_dict(state.get("budgeted", {}), restored)
    w.steps_seen = int(state.get("steps_seen", 0))
    w.skipped_steps = int(state.get("skipped_steps", 0))
    w.postponed_steps = int(state.get("postponed_steps", 0))
