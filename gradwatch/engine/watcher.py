"""The framework-agnostic engine that the callbacks drive.

A host adapter calls :meth:`Watcher.attach` at train start, :meth:`Watcher.on_gradients_ready` once per
optimizer step (gradients final: accumulated, unscaled, all-reduced), and :meth:`Watcher.close` at the
end. The watcher decides what is due, gives each due diagnostic a :class:`StepContext`, collects
``compute()`` results into one ``dict[tag, Tensor]``, moves it to the host in one transfer and hands it
to the sinks. It never writes ``.grad``, parameters, buffers, the optimizer or the user's RNG stream.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from gradwatch.config import WatchConfig
from gradwatch.engine.layers import (Discovery, discover_matrices, gradient_matrices, unwrap_model,
                                     unwrap_optimizer)
from gradwatch.engine.probe import ProbeSet
from gradwatch.metrics import DIAGNOSTICS
from gradwatch.metrics.base import Diagnostic, HeatmapSpec, StepContext

MAX_HEATMAP_COLUMNS = 512


class Sink(Protocol):
    """Where results go (``gradwatch.integrations.tensorboard.TensorBoardSink`` is one)."""

    def write_layout(self, layout: dict[str, dict[str, list]]) -> None: ...

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None: ...

    def log_heatmap(self, name: str, step: int, values: np.ndarray, labels: Sequence[str],
                    steps: Sequence[int], log_scale: bool) -> None: ...

    def log_text(self, tag: str, text: str, step: int) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class GradWatchError(RuntimeError):
    """A diagnostic failed while ``on_error="raise"``."""


@contextlib.contextmanager
def extra_pass(model: nn.Module) -> Iterator[nn.Module]:
    """Observe-only context for forward/backward passes that are not the user's.

    Eval mode (no dropout, BatchNorm running statistics untouched), the RNG state forked (CPU and the
    current CUDA device) so the user's random stream is unchanged, the math SDPA kernel (the only one
    with a double backward), and every module's training flag restored afterwards.
    """
    modes = [(m, m.training) for m in model.modules()]
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        kernel: Any = sdpa_kernel(SDPBackend.MATH)
    except ImportError:  # pragma: no cover - torch < 2.3
        kernel = contextlib.nullcontext()
    with torch.random.fork_rng(devices=devices), kernel, torch.enable_grad():
        model.eval()
        try:
            yield model
        finally:
            for m, mode in modes:
                m.training = mode


class Watcher:
    """Runs every enabled diagnostic at its cadence and streams the results to the sinks.

    Args:
        config: the validated :class:`WatchConfig`.
    """

    def __init__(self, config: WatchConfig) -> None:
        self.config = config
        self.diagnostics: list[Diagnostic] = []
        self.discovery: Discovery | None = None
        self.sinks: list[Sink] = []
        self.model: nn.Module | None = None
        self.is_rank_zero = True
        self._probe_factory: Callable[[int], ProbeSet] | None = None
        self._probe: ProbeSet | None = None
        self._warned: set[str] = set()
        self._pending: set[int] = set()
        self._engine_seconds = 0.0
        self._wall_start: float | None = None
        self._history: dict[str, tuple[list[int], list[np.ndarray]]] = {}
        self._restored: dict[str, Any] | None = None
        self.steps_seen = 0
        self.skipped_steps = 0
        self.postponed_steps = 0  # steps at which due work waited for the overhead budget (this process)
        self._warmed: set[int] = set()  # diagnostics that have run once
        self._warmup_seconds = 0.0  # one-off costs (attach, each diagnostic's first run): outside the budget
        self._heatmaps_due: set[int] = set()

    # ---- lifecycle -------------------------------------------------------------------------

    def attach(self, model: nn.Module, *, sinks: Sequence[Sink] = (), is_rank_zero: bool = True,
               probe_factory: Callable[[int], ProbeSet] | None = None) -> None:
        """Find the layers, build the diagnostics, write the dashboard layout. Raises on bad patterns."""
        t0 = time.perf_counter()
        self._wall_start = t0  # attach's own time counts in both numerator and denominator
        self.model = unwrap_model(model)
        self.is_rank_zero = is_rank_zero
        self.sinks = list(sinks)
        self._probe_factory = probe_factory
        spectra = self.config.spectra
        self.discovery = discover_matrices(
            self.model, self.config.include, self.config.exclude,
            embeddings=bool(spectra and spectra.embeddings), output_head=bool(spectra and spectra.output_head))
        if self.discovery.frozen:
            shown = ", ".join(self.discovery.frozen[:5]) + (", ..." if len(self.discovery.frozen) > 5 else "")
            self._warn_once("frozen", f"gradwatch: skipping {len(self.discovery.frozen)} parameters that do not "
                                      f"require a gradient (frozen or adapter base weights): {shown}")
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        self.diagnostics = [d.to(device) for cls in DIAGNOSTICS
                            for d in cls.from_watch(self.config, self.discovery.matrices)]
        if self._restored is not None:
            self._load_diagnostics(self._restored)
            self._restored = None
        if any("probe" in d.needs for d in self.diagnostics):
            self.probe()  # drawn now, so a probe larger than the data fails at train start
        layout: dict[str, dict[str, list]] = {"gradwatch": {"overhead": ["Multiline", ["^gradwatch/overhead$"]]}}
        for d in self.diagnostics:
            layout.update(d.layout())
        if self.is_rank_zero:
            for sink in self.sinks:
                sink.write_layout(layout)
        self._engine_seconds += time.perf_counter() - t0
        self._warmup_seconds += time.perf_counter() - t0

    def close(self) -> None:
        if self.is_rank_zero:
            for sink in self.sinks:
                sink.flush()
                sink.close()

    # ---- the step -------------------------------------------------------------------------

    def on_gradients_ready(self, step: int, *, optimizer: Any = None, grad_scale: float | None = None,
                           check_skipped: bool = False) -> dict[str, float]:
        """Gradients for optimizer step ``step`` (1-based) are final; run what is due.

        Args:
            step: the optimizer step about to be taken.
            optimizer: the optimizer (for diagnostics that read its state).
            grad_scale: factor that turns the gradients in ``.grad`` into the pre-clip gradients
                (HF clips before its callbacks run); None for 1.
            check_skipped: a mixed-precision scaler is active: a step whose gradients hold an inf/NaN
                will be skipped by the scaler, so it is not reported as taken.

        Returns:
            The scalars logged at this step (empty when nothing was due).
        """
        if self.model is None or self.discovery is None or not self.is_rank_zero:
            return {}
        t0 = time.perf_counter()
        try:
            return self._step(step, optimizer, grad_scale, check_skipped)
        finally:
            self._engine_seconds += time.perf_counter() - t0

    def overhead(self) -> float:
        """gradwatch's share of wall time since attach (everything it did, warm-up included)."""
        return self._share(self._engine_seconds)

    def _share(self, seconds: float) -> float:
        if self._wall_start is None:
            return 0.0
        wall = time.perf_counter() - self._wall_start
        return seconds / wall if wall > 0 else 0.0

    def _budgeted_share(self) -> float:
        """gradwatch's share of wall time without its one-off costs: what ``max_overhead`` bounds."""
        return self._share(self._engine_seconds - self._warmup_seconds)

    def _over_budget(self) -> bool:
        """Whether due work must wait. A diagnostic's first run always goes ahead, and one-off costs
        (attach, first runs: lazy imports, thread pools, the probe draw) do not count against the budget,
        so one slow start cannot silence a diagnostic for the rest of a run."""
        budget = self.config.max_overhead
        if budget is None or not (self._pending & self._warmed):
            return False
        return self._budgeted_share() > budget

    def _step(self, step: int, optimizer: Any, grad_scale: float | None, check_skipped: bool) -> dict[str, float]:
        assert self.model is not None and self.discovery is not None
        due = [i for i, d in enumerate(self.diagnostics) if d.cadence().is_due(step)]
        self._pending.update(due)
        # a heatmap due now is drawn at the diagnostic's next run, even if the budget postpones that run
        self._heatmaps_due.update(i for i, d in enumerate(self.diagnostics)
                                  if (c := d.heatmap_cadence()) is not None and c.is_due(step))
        if not self._pending:
            self.steps_seen += 1
            return {}
        if check_skipped and self._step_will_be_skipped():
            self.skipped_steps += 1
            return {}
        self.steps_seen += 1
        if self._over_budget():  # postponed: the pending diagnostics run at the first step back under budget
            self.postponed_steps += 1
            self._warn_once("budget", f"gradwatch: postponing due diagnostics at step {step}: gradwatch has "
                            f"used {100 * self._budgeted_share():.1f}% of the wall time (one-off costs aside), "
                            f"over max_overhead={self.config.max_overhead}; they run at the first step back "
                            "under it (raise max_overhead or lower the cadence to see more points; said once)")
            return {}
        run = sorted(self._pending)
        self._pending.clear()
        ctx = self._context(step, optimizer, grad_scale)
        results: dict[str, Tensor] = {}
        for i in run:
            d = self.diagnostics[i]
            name = type(d).__name__
            t0 = time.perf_counter()
            try:
                d.observe(ctx)
            except Exception as exc:  # a diagnostic never kills training unless strict
                self._fail(name, exc)
            try:
                results.update(d.compute())
            except Exception as exc:
                self._fail(f"{name}.compute", exc)
            d.reset()
            if i not in self._warmed:
                self._warmed.add(i)
                self._warmup_seconds += time.perf_counter() - t0
        scalars = self._transfer(results)
        scalars["gradwatch/overhead"] = self.overhead()
        for sink in self.sinks:
            sink.log_scalars(step, scalars)
        self._record_heatmaps(step, scalars, run)
        for sink in self.sinks:
            sink.flush()
        return scalars

    def _context(self, step: int, optimizer: Any, grad_scale: float | None) -> StepContext:
        assert self.model is not None and self.discovery is not None
        discovery = self.discovery
        cache: dict[str, Any] = {}

        def gradients() -> tuple[list[Tensor], list[int]]:
            if "gradients" not in cache:
                cache["gradients"] = gradient_matrices(discovery, None if grad_scale in (None, 1.0) else grad_scale)
            return cache["gradients"]

        return StepContext(step=step, model=self.model, optimizer=unwrap_optimizer(optimizer),
                           watched=discovery.matrices,
                           params=discovery.params, gradients=gradients, probe=self.probe,
                           extra_pass=lambda: extra_pass(self.model), cache=cache)

    def probe(self) -> ProbeSet:
        """The probe set, drawn on first use."""
        if self._probe is None:
            if self._probe_factory is None:
                raise ValueError("gradwatch: this diagnostic needs probe data, but the trainer gave no training "
                                 "dataset to draw it from")
            self._probe = self._probe_factory(self.probe_size())
        return self._probe

    def probe_size(self) -> int:
        """Examples in the probe set: the most any enabled diagnostic asks for."""
        sizes = [getattr(self.config.sharpness, "probe_size", 0),
                 getattr(self.config.spectra, "per_example_size", 0) if getattr(self.config.spectra, "per_example", False) else 0]
        return max(max(sizes), 1)

    def _step_will_be_skipped(self) -> bool:
        assert self.model is not None
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return False
        return not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())

    @staticmethod
    def _transfer(results: dict[str, Tensor]) -> dict[str, float]:
        if not results:
            return {}
        keys = list(results)
        flat = torch.stack([results[k].detach().double().reshape(()).to(results[keys[0]].device) for k in keys])
        return dict(zip(keys, flat.cpu().tolist()))  # one device-to-host transfer per logging event

    # ---- heatmaps -------------------------------------------------------------------------

    def _record_heatmaps(self, step: int, scalars: dict[str, float], ran: Sequence[int]) -> None:
        for i in ran:
            draw = i in self._heatmaps_due
            for spec in self.diagnostics[i].heatmaps():
                steps, cols = self._history.setdefault(spec.name, ([], []))
                steps.append(step)
                cols.append(np.array([scalars.get(t, np.nan) for t in spec.rows], dtype=np.float64))
                del steps[:-MAX_HEATMAP_COLUMNS], cols[:-MAX_HEATMAP_COLUMNS]
                if draw and len(steps) >= 2:
                    self._emit_heatmap(spec, step)
            self._heatmaps_due.discard(i)

    def _emit_heatmap(self, spec: HeatmapSpec, step: int) -> None:
        steps, cols = self._history[spec.name]
        values = np.stack(cols, axis=1)  # rows: layers, columns: logging events
        for sink in self.sinks:
            sink.log_heatmap(spec.name, step, values, spec.labels, list(steps), spec.log_scale)

    # ---- errors ---------------------------------------------------------------------------

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _fail(self, key: str, exc: Exception) -> None:
        if self.config.on_error == "raise":
            raise GradWatchError(f"gradwatch: {key} failed: {exc!r}") from exc
        self._warn_once(key, f"gradwatch: {key} failed and logs NaN; training goes on "
                             f"(on_error='raise' makes this fatal): {exc!r}")

    # ---- state ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: metric states, heatmap history, pending work, time spent."""
        return {
            "diagnostics": {f"{i}:{type(d).__name__}": {k: v.cpu() for k, v in d.state_dict().items()}
                            for i, d in enumerate(self.diagnostics)},
            "heatmaps": {k: (list(s), [c.tolist() for c in cols]) for k, (s, cols) in self._history.items()},
            "pending": sorted(self._pending),
            "heatmaps_due": sorted(self._heatmaps_due),
            "steps_seen": self.steps_seen,
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._history = {k: (list(s), [np.asarray(c, dtype=np.float64) for c in cols])
                         for k, (s, cols) in state.get("heatmaps", {}).items()}
        self._pending = set(state.get("pending", []))
        self._heatmaps_due = set(state.get("heatmaps_due", []))
        self.steps_seen = int(state.get("steps_seen", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        if self.diagnostics:
            self._load_diagnostics(state)
        else:
            self._restored = state  # attach() has not run yet: apply once the diagnostics exist

    def _load_diagnostics(self, state: dict[str, Any]) -> None:
        saved = state.get("diagnostics", {})
        for i, d in enumerate(self.diagnostics):
            key = f"{i}:{type(d).__name__}"
            if key in saved:
                d.load_state_dict({k: v.to(d.device) for k, v in saved[key].items()}, strict=False)
