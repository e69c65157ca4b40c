"""The logging event of a :class:`~gradwatch.engine.watcher.Watcher`: which diagnostics log at a step (their
log cadence, on every rank alike), their results computed and their interval state reset, every scalar
brought to the host in one stacked transfer, and one :class:`~gradwatch.engine.sinks.Emission` handed to the
sinks; then the alerts' fate (:class:`~gradwatch.engine.alerts.AlertGate`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from gradwatch.engine.sinks import Emission
from gradwatch.metrics.base import Alert, Results

if TYPE_CHECKING:
    from gradwatch.engine.watcher import Watcher


def log_due(watcher: Watcher, i: int, step: int) -> bool:
    """Whether diagnostic ``i`` logs at ``step``: observed in this interval, and its log cadence is due (no
    log cadence: at each step it ran)."""
    cadence = watcher.diagnostics[i].log_cadence()
    observed = i in watcher._observed  # the same on every rank, so collectives below stay in step
    if cadence is None:
        return observed and i in watcher._running
    return observed and cadence.is_due(step)


def log_step(watcher: Watcher, step: int) -> dict[str, float]:
    """Compute, emit and reset every diagnostic due to log at ``step``; the scalars logged (empty: none)."""
    w = watcher
    results: list[Results] = []
    due = [i for i in range(len(w.diagnostics)) if log_due(w, i, step)]
    for i in due:
        d = w.diagnostics[i]
        w._observed.discard(i)
        if not w._runs_here(i):
            d.reset()
            w._failed.discard(i)
            w._failed_elsewhere.discard(i)
            continue
        try:
            ok = d._update_count > 0 and i not in w._failed_elsewhere
            res = Results.of(d.compute()) if ok else d.failed_result()
        except Exception as exc:
            w._fail(i, exc, what="compute")
            res = d.failed_result()
        d.reset()
        w._failed.discard(i)
        w._failed_elsewhere.discard(i)
        results.append(res)
    if not due:
        return {}
    if not results:  # a rank that runs none of the due diagnostics still joins the alert decision
        w.alerts.handle([])
        return {}
    scalars = host_scalars([r.scalars for r in results])
    scalars["gradwatch/overhead"] = w.overhead()
    alerts = w.alerts.admit(step, [a for r in results for a in r.alerts])
    emission = emission_of(results, scalars, alerts)
    for sink in w.sinks:
        sink.write(step, emission)
        sink.flush()
    w.last_logged = scalars
    w._latest.update((tag, (step, value)) for tag, value in scalars.items())
    w.alerts.handle(alerts)
    return scalars


def emission_of(results: Sequence[Results], scalars: Mapping[str, float], alerts: Sequence[Alert]) -> Emission:
    """One step's results on the host: ``scalars`` already transferred, the rest brought over here."""
    return Emission(
        scalars=scalars,
        vectors={k: v.detach().double().cpu().numpy() for r in results for k, v in r.vectors.items()},
        records={k: list(v) for r in results for k, v in r.records.items()},
        texts={k: v for r in results for k, v in r.texts.items()},
        alerts=alerts,
        images={k: v.detach().float().clamp(0, 1).cpu().numpy() for r in results for k, v in r.images.items()})


def host_scalars(groups: Sequence[Mapping[str, Tensor | float]]) -> dict[str, float]:
    """Every scalar of a step as floats: one stacked device-to-host transfer per device."""
    by_device: dict[torch.device, list[tuple[str, Tensor]]] = {}
    for group in groups:
        for tag, value in group.items():
            value = value.detach() if isinstance(value, Tensor) else torch.tensor(float(value))
            by_device.setdefault(value.device, []).append((tag, value))
    out: dict[str, float] = {}
    for items in by_device.values():
        flat = torch.stack([v.reshape(()).to(torch.float64) for _, v in items]).cpu().tolist()
        out.update(zip((t for t, _ in items), flat))
    return out
