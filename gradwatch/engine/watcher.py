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
- :meth:`Watcher.on_exception` and :meth:`Watcher.close`. It never writes ``.grad``, parameters, buffers, the
  optimizer or the user's RNG stream. Probe data a diagnostic cannot use switches it off, said once.

The Watcher holds the step in flight and each diagnostic's interval bookkeeping; beside it: the overhead budget
(:mod:`gradwatch.engine.budget`), logging (:mod:`gradwatch.engine.emission`), alerts' cooldown and strict mode
(:mod:`gradwatch.engine.alerts`), a checkpoint's content (:mod:`gradwatch.engine.state`).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gradwatch.config import WatchConfig
from gradwatch.engine.alerts import AlertGate, GradWatchAlert, GradWatchError
from gradwatch.engine.budget import BUDGETED_SHARE_WITHOUT_BUDGET, OverheadBudget
from gradwatch.engine.context import EngineStepContext
from gradwatch.engine.emission import log_step
from gradwatch.engine.hooks import ActivationCapture, MicroBatchGradients, batch_examples
from gradwatch.engine.layers import WatchedLayers, discover_matrices, unwrap_model
from gradwatch.engine.probe import ProbeSet, ProbeUnusable, probe_unusable, unusable_cause
from gradwatch.engine.ranks import Ranks
from gradwatch.engine.sinks import Sink
from gradwatch.engine.state import STATE_VERSION, diagnostic_key, load_watcher_state, watcher_state
from gradwatch.metrics.base import ChartGroup, Diagnostic, LayersFailed, PassRefused
from gradwatch.registry import BuildInputs, families

__all__ = ["BUDGETED_SHARE_WITHOUT_BUDGET", "STATE_VERSION", "GradWatchAlert", "GradWatchError", "Watcher"]


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
        self._off: set[int] = set()  # refused an extra pass (PassRefused): off for the rest of the run
        cfg = self.config
        self.alerts = AlertGate(cfg.alert_cooldown, cfg.on_alert, strict=cfg.on_error == "raise", ranks=self.ranks,
                                say_once=self._warn_once)
        if not hasattr(self, "budget"):  # kept across runs: an adapter's counting() block may be open
            self.budget = OverheadBudget(cfg.max_overhead, self.clock, self.ranks, say_once=self._warn_once,
                                         describe=self._describe)
        self.budget.reset()
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
               probe_source: Callable[[int], ProbeSet] | None = None, resumed_at: int = 0) -> None:
        """Find the layers, build the diagnostics, draw the probe set, open the sinks. Raises on bad
        include/exclude patterns and on a probe that cannot be drawn. ``resumed_at``: the host's step when it
        resumed from a checkpoint (0: a fresh run); with no gradwatch state restored, said once."""
        t0 = self.clock()
        self._disarm()
        self._new_run()
        self.budget.wall_start = self.budget.started(t0)  # attach's own time counts in both numerator and denominator
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
        elif resumed_at:
            self._warn_once("resume:fresh", f"gradwatch: the run resumes at step {resumed_at} from a checkpoint "
                            "without gradwatch state (written without gradwatch); gradwatch starts afresh there: "
                            "intervals, warm starts and probe windows begin anew, its series continue at step "
                            f"{resumed_at + 1}")
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
        due |= self.budget.due(step, cadences, self.budgeted_period)
        due -= self._off
        self._pending |= due
        self._running = []
        if self._pending:
            if self.ranks.from_zero(self.budget.over_budget(self._pending)):  # rank zero decides for every rank
                self.postponed_steps += 1
                self._warn_once("budget", f"gradwatch: postponing due diagnostics at step {step}: gradwatch has "
                                f"used {100 * self.budgeted_overhead():.1f}% of the wall time (one-off costs aside), "
                                f"over max_overhead={self.config.max_overhead}; they run at the first step back "
                                "under it (raise max_overhead or lower the cadence to see more points; said once)")
            else:
                self._running = sorted(self._pending)
                self._pending.clear()
        self._continuing = {i for i, d in enumerate(self.diagnostics)
                            if i not in self._running and i not in self._off and d.continues(step)}
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
                                 logged=self._latest, max_unshard_gb=self.config.max_unshard_gb)

    def _observe(self, phase: str, loss: Tensor | None = None) -> None:
        now = [i for i in self._running if self.diagnostics[i].phase == phase]
        if not now:
            return
        ctx = self._context(phase, loss)
        self._observed.update(now)
        failed = torch.zeros(len(now), dtype=torch.bool)
        unusable: list[tuple[int, Exception]] = []
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
            ctx.probe_size = d.probe_size() or None  # its own share of the shared probe, not the largest family's
            t0 = self.clock()
            try:  # fenced (a failure on one rank ends its part on every rank together; see Ranks.fenced)
                self.ranks.observe_fenced(d, ctx, d.runs_on == "all_ranks" and not d.enters_every_collective)
            except LayersFailed as exc:  # its update holds gaps for those layers; the rest of it stands
                before = i in self._failed
                self._fail(i, exc)
                if not before:
                    self._failed.discard(i)
            except PassRefused as exc:  # the same on every rank (global shapes, one limit): off for the run
                failed[k] = True
                self._off.add(i)
                self._warn_once(f"off:{i}", f"{exc}. {self._describe(i)} is off for the rest of this run; "
                                            "training goes on")
            except Exception as exc:  # a diagnostic never kills training unless strict
                failed[k] = True
                cause = unusable_cause(exc) if self.config.on_error != "raise" else None
                unusable.append((i, cause)) if cause is not None else self._fail(i, exc)
            seconds = self.clock() - t0
            self.budget.observed(i, seconds, continuing=i in self._continuing)
        probe_unusable(self, unusable)  # those diagnostics off for the run, one warning
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

    # ---- logging (see gradwatch.engine.emission) ------------------------------------------------

    def _log(self, step: int) -> dict[str, float]:
        return log_step(self, step)

    # ---- budget (see gradwatch.engine.budget) -------------------------------------------------------

    def _spent(self, t0: float, warmup: bool = False) -> None:
        self.budget.spent(t0, warmup)

    def _spent_in_hooks(self, seconds: float) -> None:
        self.budget.spent_in_hooks(seconds)

    def counting(self, warmup: bool = False) -> Any:
        """A block whose whole time is gradwatch's (:meth:`OverheadBudget.counting`): hosts wrap each entry point."""
        return self.budget.counting(warmup)

    def overhead(self) -> float:
        """gradwatch's share of wall time since attach (everything it did, warm-up included)."""
        return self.budget.overhead()

    def budgeted_overhead(self) -> float:
        """gradwatch's share of wall time without its one-off costs: what ``max_overhead`` bounds."""
        return self.budget.budgeted_overhead()

    def budgeted_period(self, i: int, minimum: int, count: int) -> int:
        """Steps between two runs of the ``within_budget`` diagnostic ``i`` (:meth:`OverheadBudget.period`)."""
        return self.budget.period(i, minimum, count, self.steps_seen)

    @property
    def _budgeted(self) -> dict[int, dict[str, Any]]:
        """The ``within_budget`` diagnostics' runs: last step, cost, runs, period."""
        return self.budget.budgeted

    # ---- probe --------------------------------------------------------------------------------

    def probe_size(self) -> int:
        """Examples in the probe set: the most any built diagnostic asks for (0: no probe)."""
        return max((d.probe_size() for d in self.diagnostics), default=0)

    def probe(self) -> ProbeSet:
        """The probe set, drawn on first use."""
        if self._probe is None:
            if self._probe_source is None:
                raise ProbeUnusable("gradwatch: this diagnostic needs probe data, but the trainer gave no "
                                    "training dataset to draw it from")
            self._probe = self._probe_source(self.probe_size())
        return self._probe

    def _step_will_be_skipped(self) -> bool:
        assert self.model is not None
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        return bool(grads) and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())

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

    # ---- state (see gradwatch.engine.state) ---------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: interval and carried state of every diagnostic, the sinks' memory
        (heatmap history), postponed work, alert cooldowns, counters."""
        return watcher_state(self)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`: into the diagnostics there are (a loop restoring after :meth:`attach`)
        and into those the next :meth:`attach` builds. Hosts restore before train start, and a Watcher reused
        for a second fit or ``train()`` (after an interrupted one, say) still holds the previous run's
        diagnostics, which attach replaces; so the state is kept until an attach takes it, or the run ends."""
        if self.diagnostics:
            self._load(state)
        self._restored = state

    def _key(self, i: int) -> str:
        return diagnostic_key(self, i)

    def _load(self, state: Mapping[str, Any]) -> None:
        load_watcher_state(self, state)
