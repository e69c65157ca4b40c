"""The framework-agnostic engine that the host adapters drive (engine v2).

Events, called by an adapter on every rank (see ``gradwatch.metrics.base`` for the whole contract):

- :meth:`Watcher.attach` at train start: finds the layers, builds every registered family's diagnostics,
  draws the probe set, opens the sinks;
- :meth:`Watcher.on_step_start` before the first micro-batch's forward of optimizer step t: decides what is
  due (cadence, then the overhead budget, decided by rank zero for every rank) and arms forward hooks;
- :meth:`Watcher.on_gradients_ready` when gradients are final: disarms hooks, snapshots weights, runs the
  ``gradients_ready`` observations;
- :meth:`Watcher.on_step_end` after the optimizer step, with the loss: runs the ``step_end`` observations,
  then computes, emits and resets every diagnostic whose log cadence is due;
- :meth:`Watcher.on_exception` and :meth:`Watcher.close`.

It never writes ``.grad``, parameters, buffers, the optimizer or the user's RNG stream.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gradwatch.config import WatchConfig
from gradwatch.engine.context import EngineStepContext
from gradwatch.engine.hooks import ActivationCapture, MicroBatchGradients, batch_examples
from gradwatch.engine.layers import WatchedLayers, discover_matrices, unwrap_model
from gradwatch.engine.probe import ProbeSet
from gradwatch.engine.ranks import Ranks
from gradwatch.engine.sinks import Emission, Sink
from gradwatch.metrics.base import Alert, ChartGroup, Diagnostic, Results, tensors_to
from gradwatch.registry import BuildInputs, families

STATE_VERSION = 2
BUDGETED_SHARE_WITHOUT_BUDGET = 0.05  # what a Cadence.within_budget() diagnostic aims at when max_overhead is off


class GradWatchError(RuntimeError):
    """A diagnostic failed while ``on_error="raise"``."""


class GradWatchAlert(GradWatchError):
    """An alert fired while ``on_error="raise"`` (strict mode)."""

    def __init__(self, alert: Alert) -> None:
        super().__init__(f"gradwatch alert {alert.rule} at step {alert.step}: {alert.message}")
        self.alert = alert


class Watcher:
    """Runs every enabled diagnostic at its cadence and streams the results to the sinks.

    Args:
        config: the validated :class:`WatchConfig`.
        clock: seconds since an arbitrary origin (``time.perf_counter``; tests inject a fake one).
    """

    def __init__(self, config: WatchConfig, *, clock: Callable[[], float] = time.perf_counter) -> None:
        self.config = config
        self.clock = clock
        self.diagnostics: list[Diagnostic] = []
        self.layers: WatchedLayers | None = None
        self.sinks: list[Sink] = []
        self.model: nn.Module | None = None
        self.ranks = Ranks()
        # work done inside the user's forward and backward is gradwatch's time too
        self.capture = ActivationCapture(on_error=self._hook_failed, on_spent=self._spent_in_hooks, clock=clock)
        self.micro_batches = MicroBatchGradients(on_spent=self._spent_in_hooks, clock=clock)
        self._probe_source: Callable[[int], ProbeSet] | None = None
        self._warned: set[str] = set()
        self._restored: Mapping[str, Any] | None = None
        self._new_run()

    def _new_run(self) -> None:
        """The bookkeeping of one run (one attach), fresh: a Watcher reused for a second fit or ``train()``
        starts a new run, with its diagnostics built anew and the probe drawn from the new data."""
        self._probe: ProbeSet | None = None
        self._pending: set[int] = set()  # due observations not yet run (postponed by the budget)
        self._failed: set[int] = set()  # diagnostics with a failed observation in the current interval
        self._observed: set[int] = set()  # diagnostics observed (or tried) in the current interval, every rank
        self._failed_elsewhere: set[int] = set()  # failed on another rank this interval: logged as failed here too
        self._alert_last: dict[str, int] = {}
        self._engine_seconds = 0.0
        self._warmup_seconds = 0.0  # one-off costs (attach, each diagnostic's first run): outside the budget
        self._wall_start: float | None = None
        self._warmed: set[int] = set()
        self._budgeted: dict[int, dict[str, Any]] = {}  # Cadence.within_budget() diagnostics: last run, cost, period
        # the step in flight
        self._step: int | None = None
        self._running: list[int] = []
        self._continuing: set[int] = set()  # running at this step because they continue a burst
        self._skipped = False
        self._optimizer: Any = None
        self._grad_scale: float | None = None
        self._loss_scale: Any = None
        self._weights_before: dict[str, Tensor] | None = None
        self.steps_seen = 0
        self.skipped_steps = 0
        self.postponed_steps = 0
        self.last_logged: dict[str, float] = {}
        self._latest: dict[str, tuple[int, float]] = {}  # every scalar tag's last (step, value), for "logged"

    @property
    def is_rank_zero(self) -> bool:
        return self.ranks.is_zero

    # ---- lifecycle ----------------------------------------------------------------------------

    def attach(self, model: nn.Module, *, sinks: Sequence[Sink] = (),
               probe_source: Callable[[int], ProbeSet] | None = None) -> None:
        """Find the layers, build the diagnostics, draw the probe set, open the sinks. Raises on bad
        include/exclude patterns and on a probe that cannot be drawn."""
        t0 = self.clock()
        self._disarm()
        self._new_run()
        self._wall_start = t0  # attach's own time counts in both numerator and denominator
        self.ranks.refresh()
        self.model = unwrap_model(model)
        self.sinks = list(sinks) if self.is_rank_zero else []
        self._probe_source = probe_source
        cfg = self.config
        self.layers = discover_matrices(self.model, cfg.include, cfg.exclude, embeddings=cfg.embeddings,
                                        output_head=cfg.output_head)
        if self.layers.frozen:
            frozen = self.layers.frozen
            shown = ", ".join(frozen[:5]) + (", ..." if len(frozen) > 5 else "")
            self._warn_once("frozen", f"gradwatch: skipping {len(frozen)} parameters that do not require a "
                                      f"gradient (frozen or adapter base weights): {shown}")
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        inputs = BuildInputs(cfg, self.layers.matrices, self.model)
        enabled = cfg.families
        self.diagnostics = [d.to(device) for fam in families() if fam.key in enabled
                            for d in fam.build(enabled[fam.key], inputs)]
        if self._restored is not None:
            self._load(self._restored)
            self._restored = None
        if self.probe_size():
            self.probe()  # drawn now, so a probe that cannot be drawn fails at train start
        charts = [ChartGroup("gradwatch", "overhead", ("gradwatch/overhead",))]
        for d in self.diagnostics:
            charts.extend(d.charts())
        for sink in self.sinks:
            sink.open(charts)
        self._spent(t0, warmup=True)

    def close(self) -> None:
        """Remove every hook; flush and close the sinks."""
        self._restored = None
        self._disarm()
        for sink in self.sinks:
            sink.flush()
            sink.close()

    def on_exception(self, exc: BaseException | None = None) -> None:
        """Training raised: remove every hook and flush what was written; the step in flight is dropped."""
        self._restored = None
        self._disarm()
        self._step = None
        self._running = []
        for sink in self.sinks:
            sink.flush()

    # ---- the step -----------------------------------------------------------------------------

    def on_step_start(self, step: int) -> None:
        """Optimizer step ``step`` (1-based) begins: decide what observes at it and arm forward hooks."""
        if self.model is None or self._step == step:
            return
        t0 = self.clock()
        self._step = step
        self._skipped = False
        self._weights_before = None
        cadences = [d.observe_cadence() for d in self.diagnostics]
        due = {i for i, c in enumerate(cadences) if c.budgeted_minimum is None and c.is_due(step)}
        due |= self._budgeted_due(step, cadences)
        self._pending |= due
        self._running = []
        if self._pending:
            if self.ranks.from_zero(self._over_budget()):  # rank zero decides for every rank
                self.postponed_steps += 1
                self._warn_once("budget", f"gradwatch: postponing due diagnostics at step {step}: gradwatch has "
                                f"used {100 * self.budgeted_overhead():.1f}% of the wall time (one-off costs aside), "
                                f"over max_overhead={self.config.max_overhead}; they run at the first step back "
                                "under it (raise max_overhead or lower the cadence to see more points; said once)")
            else:
                self._running = sorted(self._pending)
                self._pending.clear()
        self._continuing = {i for i, d in enumerate(self.diagnostics) if i not in self._running and d.continues(step)}
        if self._continuing:  # a burst under way is never postponed (its steps must be consecutive)
            self._pending -= self._continuing
            self._running = sorted({*self._running, *self._continuing})
        sites = [(i, site) for i in self._running if "activations" in self.diagnostics[i].needs
                 and self._runs_here(i) for site in self._sites(i)]
        self.capture.arm(sites)
        self.micro_batches.clear()
        if any("micro_batches" in self.diagnostics[i].needs for i in self._running):
            assert self.layers is not None
            self.micro_batches.arm(list(self.layers.params.values()))
        self._spent(t0)

    def on_micro_batch(self, batch: Any) -> None:
        """A micro-batch of the step in flight is about to run forward and backward (hosts call it for each,
        after :meth:`on_step_start` for the first): its examples are counted while a due diagnostic needs
        ``"micro_batches"``. Only shapes are read."""
        if self.micro_batches.armed:
            self.micro_batches.micro_batch(batch_examples(batch))

    def on_gradients_ready(self, step: int, *, optimizer: Any = None, grad_scale: float | None = None,
                           check_skipped: bool = False, loss_scale: Any = None) -> None:
        """Gradients for optimizer step ``step`` are final (accumulated, all-reduced).

        Args:
            optimizer: the optimizer about to step (host wrappers are removed).
            grad_scale: factor that turns ``.grad`` into the true pre-clip gradients: the inverse loss scale
                of fp16 gradients not yet unscaled, times the inverse clip factor where the host clipped
                before its callbacks ran; None for 1.
            check_skipped: a mixed-precision scaler is active: a step whose gradients hold an inf/NaN is
                skipped by the scaler, so nothing is observed at it.
            loss_scale: the factor the step's backward passes carried (the fp16 scaler's current scale, or a
                function returning it, called only when needed); None for 1.
        """
        if self.model is None:
            return
        self.on_step_start(step)  # hosts (and tests) without a pre-forward event
        t0 = self.clock()
        self._disarm()
        self._optimizer, self._grad_scale, self._loss_scale = optimizer, grad_scale, loss_scale
        if check_skipped and self.ranks.any(torch.tensor([self._step_will_be_skipped()]))[0]:
            self._skipped = True
            self.skipped_steps += 1
            self._pending.update(self._running)  # observed at the next step instead
            self._running = []
        if self._running and any("weights_before" in self.diagnostics[i].needs for i in self._running):
            assert self.layers is not None
            self._weights_before = {n: p.detach().clone() for n, p in self.layers.params.items()}
        self._observe("gradients_ready")
        self._spent(t0)

    def on_step_end(self, step: int, *, loss: Tensor | float | None = None) -> dict[str, float]:
        """The optimizer step ``step`` was taken: run ``step_end`` observations, then log what is due.

        Returns:
            The scalars logged at this step (empty when nothing was logged).
        """
        if self.model is None or self._step != step:
            return {}
        t0 = self.clock()
        if self._skipped:
            self._step = None
            self._spent(t0)
            return {}
        self.steps_seen += 1
        if loss is not None and not isinstance(loss, Tensor):
            loss = torch.tensor(float(loss))
        self._observe("step_end", loss=loss.detach() if isinstance(loss, Tensor) else None)
        logged = self._log(step)
        self._step, self._running, self._weights_before = None, [], None
        self._spent(t0)
        return logged

    def run_step(self, step: int, *, optimizer: Any = None, grad_scale: float | None = None,
                 loss: Tensor | float | None = None, check_skipped: bool = False,
                 loss_scale: Any = None) -> dict[str, float]:
        """All three step events at once, for a hand-written loop without separate hooks: call it after
        ``backward()`` and before ``optimizer.step()``. Step-end diagnostics then see the weights before the
        update as the weights after it (update ratios are zero); use the three events for those."""
        self.on_step_start(step)
        self.on_gradients_ready(step, optimizer=optimizer, grad_scale=grad_scale, check_skipped=check_skipped,
                                loss_scale=loss_scale)
        return self.on_step_end(step, loss=loss)

    # ---- observing ----------------------------------------------------------------------------

    def _runs_here(self, i: int) -> bool:
        return self.diagnostics[i].runs_on == "all_ranks" or self.is_rank_zero

    def _context(self, phase: Any, loss: Tensor | None = None) -> EngineStepContext:
        assert self.model is not None and self.layers is not None and self._step is not None
        return EngineStepContext(step=self._step, phase=phase, model=self.model, layers=self.layers, ranks=self.ranks,
                                 optimizer=self._optimizer, grad_scale=self._grad_scale,
                                 probe=self.probe if self.probe_size() else None, loss=loss,
                                 weights_before=self._weights_before, say_once=self._warn_once,
                                 micro_batches=self.micro_batches, loss_scale=self._loss_scale,
                                 logged=self._latest)

    def _observe(self, phase: str, loss: Tensor | None = None) -> None:
        now = [i for i in self._running if self.diagnostics[i].phase == phase]
        if not now:
            return
        ctx = self._context(phase, loss)
        self._observed.update(now)
        failed = torch.zeros(len(now), dtype=torch.bool)
        for need, read in (("gradients", ctx.gradients), ("micro_batches", ctx.batch_gradient_norms)):
            if any(need in self.diagnostics[i].needs for i in now):  # each read on every rank, failed or not
                try:
                    read()  # collectives: every rank, before any rank-zero work
                except Exception as exc:
                    failed[:] = True
                    self._fail(now[0], exc, what=f"reading the {need.replace('_', '-')}")
        for k, i in enumerate(now):
            if failed[k] or not self._runs_here(i):
                continue
            d = self.diagnostics[i]
            t0 = self.clock()
            try:
                d.observe(ctx)
            except Exception as exc:  # a diagnostic never kills training unless strict
                failed[k] = True
                self._fail(i, exc)
            seconds = self.clock() - t0
            if i in self._budgeted:
                self._note_cost(i, seconds, continuing=i in self._continuing)
            if i not in self._warmed:
                self._warmed.add(i)
                self._warmup_seconds += seconds
        if self.ranks.distributed:  # a failure on one rank is a failure on all: nobody waits for it later
            mine = failed.clone()
            failed = self.ranks.any(failed)
            self._failed_elsewhere.update(i for k, i in enumerate(now) if failed[k] and not mine[k])
        self._failed.update(i for k, i in enumerate(now) if failed[k])

    def _disarm(self) -> None:
        self.capture.disarm()
        self.micro_batches.disarm()

    def _sites(self, i: int) -> Sequence[Any]:
        try:
            return self.diagnostics[i].activation_sites(self.model)
        except Exception as exc:
            self._fail(i, exc, what="finding its modules")
            return ()

    # ---- logging ------------------------------------------------------------------------------

    def _log_due(self, i: int, step: int) -> bool:
        cadence = self.diagnostics[i].log_cadence()
        observed = i in self._observed  # the same on every rank, so collectives below stay in step
        if cadence is None:
            return observed and i in self._running
        return observed and cadence.is_due(step)

    def _log(self, step: int) -> dict[str, float]:
        results: list[Results] = []
        due = [i for i in range(len(self.diagnostics)) if self._log_due(i, step)]
        for i in due:
            d = self.diagnostics[i]
            self._observed.discard(i)
            if not self._runs_here(i):
                d.reset()
                self._failed.discard(i)
                self._failed_elsewhere.discard(i)
                continue
            try:
                ok = d._update_count > 0 and i not in self._failed_elsewhere
                res = Results.of(d.compute()) if ok else d.failed_result()
            except Exception as exc:
                self._fail(i, exc, what="compute")
                res = d.failed_result()
            d.reset()
            self._failed.discard(i)
            self._failed_elsewhere.discard(i)
            results.append(res)
        if not due:
            return {}
        if not results:  # a rank that runs none of the due diagnostics still joins the alert decision
            self._handle_alerts([])
            return {}
        scalars = self._transfer([r.scalars for r in results])
        scalars["gradwatch/overhead"] = self.overhead()
        alerts = self._admit_alerts(step, [a for r in results for a in r.alerts])
        emission = Emission(
            scalars=scalars,
            vectors={k: v.detach().double().cpu().numpy() for r in results for k, v in r.vectors.items()},
            records={k: list(v) for r in results for k, v in r.records.items()},
            texts={k: v for r in results for k, v in r.texts.items()},
            alerts=alerts,
            images={k: v.detach().float().clamp(0, 1).cpu().numpy() for r in results for k, v in r.images.items()})
        for sink in self.sinks:
            sink.write(step, emission)
            sink.flush()
        self.last_logged = scalars
        self._latest.update((tag, (step, value)) for tag, value in scalars.items())
        self._handle_alerts(alerts)
        return scalars

    @staticmethod
    def _transfer(groups: Sequence[Mapping[str, Tensor]]) -> dict[str, float]:
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

    # ---- alerts -------------------------------------------------------------------------------

    def _admit_alerts(self, step: int, alerts: Sequence[Alert]) -> list[Alert]:
        """Once per rule within ``alert_cooldown`` steps; the engine stamps the step."""
        admitted = []
        for a in alerts:
            last = self._alert_last.get(a.rule)
            if last is not None and step - last < self.config.alert_cooldown:
                continue
            self._alert_last[a.rule] = step
            admitted.append(Alert(a.rule, a.severity, a.message, dict(a.evidence), tuple(a.remedies), step))
        return admitted

    def _handle_alerts(self, alerts: Sequence[Alert]) -> None:
        strict = self.config.on_error == "raise"
        if self.is_rank_zero and self.config.on_alert is not None:
            for a in alerts:
                try:
                    self.config.on_alert(a)
                except Exception as exc:
                    if strict:
                        raise GradWatchError(f"gradwatch: on_alert raised for {a.rule}: {exc!r}") from exc
                    self._warn_once("on_alert", f"gradwatch: on_alert raised for {a.rule} and is ignored; training "
                                                f"goes on (on_error='raise' makes this fatal): {exc!r}")
        if not strict:
            return
        fire = self.ranks.from_zero(bool(alerts))  # every rank stops together
        if alerts:
            raise GradWatchAlert(alerts[0])
        if fire:
            raise GradWatchError("gradwatch: an alert fired on rank zero (strict mode)")

    # ---- budget -------------------------------------------------------------------------------

    def _spent(self, t0: float, warmup: bool = False) -> None:
        dt = self.clock() - t0
        self._engine_seconds += dt
        if warmup:
            self._warmup_seconds += dt

    def _spent_in_hooks(self, seconds: float) -> None:
        self._engine_seconds += seconds

    def overhead(self) -> float:
        """gradwatch's share of wall time since attach (everything it did, warm-up included)."""
        return self._share(self._engine_seconds)

    def _share(self, seconds: float) -> float:
        if self._wall_start is None:
            return 0.0
        wall = self.clock() - self._wall_start
        return seconds / wall if wall > 0 else 0.0

    def budgeted_overhead(self) -> float:
        """gradwatch's share of wall time without its one-off costs: what ``max_overhead`` bounds."""
        return self._share(self._engine_seconds - self._warmup_seconds)

    def _over_budget(self) -> bool:
        """Whether due work must wait. A diagnostic's first run always goes ahead, and one-off costs
        (attach, first runs: lazy imports, thread pools, the probe draw) do not count against the budget,
        so one slow start cannot silence a diagnostic for the rest of a run."""
        budget = self.config.max_overhead
        if budget is None or not (self._pending & self._warmed):
            return False
        return self.budgeted_overhead() > budget

    # ---- budgeted cadences (Cadence.within_budget) -----------------------------------------------

    def _budgeted_due(self, step: int, cadences: Sequence[Any]) -> set[int]:
        """The ``within_budget`` diagnostics due at ``step`` (``cadences``: each diagnostic's observe cadence),
        decided by rank zero for every rank."""
        minima = {i: c.budgeted_minimum for i, c in enumerate(cadences) if c.budgeted_minimum is not None}
        ids = list(minima)
        if not ids:
            return set()
        flags = []
        for i in ids:
            b = self._budgeted.setdefault(i, {"last": None, "cost": None, "runs": 0, "period": None})
            minimum = minima[i]
            if b["last"] is None:
                flags.append(True)  # the first run of this run (step 1, or the first step after a resume)
                continue
            gap = step - b["last"]
            if gap < minimum:
                flags.append(False)
                continue
            if b["period"] is None:  # fixed for this interval, from at least `minimum` steps of training time
                b["period"] = self.budgeted_period(i, minimum, len(ids))
            flags.append(gap >= b["period"])
        flags = self.ranks.flags_from_zero(flags)
        for i, f in zip(ids, flags):
            if f:
                self._budgeted[i]["last"] = step
        return {i for i, f in zip(ids, flags) if f}

    def budgeted_period(self, i: int, minimum: int, count: int) -> int:
        """Steps between two runs of the ``within_budget`` diagnostic ``i``: the smallest k >= ``minimum`` with
        cost / (k * step) <= share, where cost is its measured seconds per run (the first run's, one-off costs
        included, so the first gap errs long; then the second run's; then an exponential average: a second run
        soon after the first would be budgeted and could silence every family for many steps), step the
        training's own seconds per step
        (wall time since attach less gradwatch's, over the steps taken) and share = max_overhead / (count + 1)
        for ``count`` such diagnostics (the rest of the budget is left to fixed cadences; 5% when
        max_overhead is off). A period within 25% of the previous one keeps the previous one, so the runs
        stay evenly spaced."""
        b = self._budgeted[i]
        wall = self.clock() - (self._wall_start or 0.0)
        step_seconds = (wall - self._engine_seconds) / max(self.steps_seen, 1)
        budget = self.config.max_overhead or BUDGETED_SHARE_WITHOUT_BUDGET
        share = budget / (count + 1)
        cost = b["cost"] or 0.0
        period = minimum if step_seconds <= 0 or cost <= 0 else max(minimum, math.ceil(cost / (share * step_seconds)))
        old = b.get("previous")
        if old is not None and 0.8 * old <= period <= 1.25 * old:
            period = old
        b["previous"] = period
        if period > 10 * minimum and step_seconds > 0:
            measured = "its first run, one-off costs included" if b["runs"] < 2 else "its measured cost"
            self._warn_once(f"budgeted:{i}", f"gradwatch: {self._describe(i)} costs {cost:.3g} s a run, "
                            f"{cost / step_seconds:.0f} training steps' time ({measured}); within its share of "
                            f"max_overhead={budget:g} ({share:.1%}) it runs every {period} steps. To see more "
                            "points, make it cheaper (e.g. a smaller probe_size) or give a fixed cadence (every=N) "
                            "and a larger max_overhead (said once)")
        return period

    def _note_cost(self, i: int, seconds: float, continuing: bool = False) -> None:
        """Add one observation's seconds to the cost of a run of the ``within_budget`` diagnostic ``i``: a new
        run, or (``continuing``, :meth:`Diagnostic.continues`) the run under way, so a burst costs its sum."""
        b = self._budgeted[i]
        if continuing and b["cost"] is not None:
            b["cost"] += seconds if b["runs"] <= 2 else 0.3 * seconds  # the same exponential average, summed
            return
        b["runs"] += 1
        b["cost"] = seconds if b["runs"] <= 2 or b["cost"] is None else 0.7 * b["cost"] + 0.3 * seconds
        b["period"] = None

    # ---- probe --------------------------------------------------------------------------------

    def probe_size(self) -> int:
        """Examples in the probe set: the most any built diagnostic asks for (0: no probe)."""
        return max((d.probe_size() for d in self.diagnostics), default=0)

    def probe(self) -> ProbeSet:
        """The probe set, drawn on first use."""
        if self._probe is None:
            if self._probe_source is None:
                raise ValueError("gradwatch: this diagnostic needs probe data, but the trainer gave no training "
                                 "dataset to draw it from")
            self._probe = self._probe_source(self.probe_size())
        return self._probe

    def _step_will_be_skipped(self) -> bool:
        assert self.model is not None
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return False
        return not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())

    # ---- errors -------------------------------------------------------------------------------

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _describe(self, i: int) -> str:
        d = self.diagnostics[i]
        return f"{type(d).__name__} ({d.stem})"

    def _fail(self, i: int, exc: Exception, what: str = "") -> None:
        layer = getattr(exc, "layer", None)
        where = (f" while {what}" if what else "") + (f" on layer {layer}" if layer else "")
        name = self._describe(i)
        self._failed.add(i)
        if self.config.on_error == "raise":
            raise GradWatchError(f"gradwatch: {name} failed{where} at step {self._step}: {exc!r}") from exc
        self._warn_once(f"fail:{i}", f"gradwatch: {name} failed{where} at step {self._step} and logs NaN; "
                                     f"training goes on (said once; on_error='raise' makes this fatal): {exc!r}")

    def _hook_failed(self, owner: Any, exc: Exception) -> None:
        if isinstance(owner, int):
            self._fail(owner, exc, what="reducing a forward activation")

    # ---- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: interval and carried state of every diagnostic, the sinks' memory
        (heatmap history), postponed work, alert cooldowns, counters."""
        return {
            "version": STATE_VERSION,
            "diagnostics": {self._key(i): {"interval": {k: v.cpu() for k, v in d.state_dict().items()},
                                           "updates": int(d._update_count),
                                           "carried": tensors_to(d.carried_state(), "cpu"),
                                           "failed": i in self._failed}
                            for i, d in enumerate(self.diagnostics)},
            "sinks": [s.state_dict() for s in self.sinks],
            "pending": sorted(self._pending),
            "alert_last": dict(self._alert_last),
            "budgeted": {self._key(i): {k: v for k, v in b.items() if k != "period"} for i, b in self._budgeted.items()},
            "steps_seen": self.steps_seen,
            "skipped_steps": self.skipped_steps,
            "postponed_steps": self.postponed_steps,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`: into the diagnostics there are (a loop restoring after :meth:`attach`)
        and into those the next :meth:`attach` builds. Hosts restore before train start, and a Watcher reused
        for a second fit or ``train()`` (after an interrupted one, say) still holds the previous run's
        diagnostics, which attach replaces; so the state is kept until an attach takes it, or the run ends."""
        if self.diagnostics:
            self._load(state)
        self._restored = state

    def _key(self, i: int) -> str:
        d = self.diagnostics[i]
        return f"{i}:{d.stem}:{type(d).__name__}"

    def _load(self, state: Mapping[str, Any]) -> None:
        saved = state.get("diagnostics", {})
        for i, d in enumerate(self.diagnostics):
            entry = saved.get(self._key(i))
            if entry is None:
                continue
            d.load_state_dict({k: v.to(d.device) for k, v in entry["interval"].items()}, strict=False)
            d._update_count = int(entry.get("updates", 0))
            d.load_carried_state(tensors_to(entry.get("carried", {}), d.device))
            if entry.get("failed"):
                self._failed.add(i)
            if entry.get("updates", 0) or entry.get("failed"):
                self._observed.add(i)
        for sink, s in zip(self.sinks, state.get("sinks", [])):
            sink.load_state_dict(s)
        self._pending = set(state.get("pending", []))
        self._alert_last = dict(state.get("alert_last", {}))
        keys = {self._key(i): i for i in range(len(self.diagnostics))}
        self._budgeted = {keys[k]: {**dict(b), "period": None} for k, b in state.get("budgeted", {}).items()
                          if k in keys}
        self.steps_seen = int(state.get("steps_seen", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.postponed_steps = int(state.get("postponed_steps", 0))

