"""The engine without any host: events, cadences, the overhead budget (with an exact fake clock), errors,
observe-only extra passes, activation capture, alerts, and state."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from _support.sinks import RecordingSink
from torch import nn

import gradwatch
from gradwatch.config import Cadence
from gradwatch.engine import GradWatchAlert, GradWatchError, Watcher, extra_pass
from gradwatch.integrations.tensorboard import TensorBoardSink
from gradwatch.metrics import GradSpectrum
from gradwatch.metrics.base import ActivationSite, Alert, Diagnostic, Results


class FakeClock:
    """Seconds that pass only when a test says so: budget tests are exact."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _model_with_grads(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    nn.functional.cross_entropy(model(x), y).backward()
    return model


def _watch(model, sink, clock=None, **kwargs) -> Watcher:
    watcher = Watcher(gradwatch.WatchConfig(**kwargs), **({"clock": clock} if clock else {}))
    watcher.attach(model, sinks=[sink])
    return watcher


def _step(watcher: Watcher, step: int, *, loss=None, **ready) -> dict[str, float]:
    watcher.on_step_start(step)
    watcher.on_gradients_ready(step, **ready)
    return watcher.on_step_end(step, loss=loss)


def test_logs_at_cadence_with_values_of_the_gradients():
    model, sink = _model_with_grads(), RecordingSink()
    watcher = _watch(model, sink, spectra=gradwatch.SpectraConfig(every=3), max_overhead=None)
    for step in range(1, 10):
        _step(watcher, step)
    assert sorted(sink.scalars) == [1, 3, 6, 9]
    ref = np.linalg.svd(model[2].weight.grad.double().numpy(), compute_uv=False)
    got = sink.scalars[3]["grad_spectrum/nuclear_norm/2.weight"]
    assert got == pytest.approx(ref.sum(), rel=1e-9)
    assert 0 < sink.scalars[9]["gradwatch/overhead"] < 1
    categories = {c.category for c in sink.charts if hasattr(c, "category")}
    assert "grad_spectrum/nuclear_norm" in categories and "gradwatch" in categories


def test_interval_state_is_real_until_logged_and_then_reset():
    """Metric state aggregates between events: after gradients ready, before step end, it holds the update."""
    model, sink = _model_with_grads(), RecordingSink()
    watcher = _watch(model, sink, spectra=gradwatch.SpectraConfig(every=1), max_overhead=None)
    watcher.on_step_start(1)
    watcher.on_gradients_ready(1)
    spectrum = watcher.diagnostics[0]
    assert spectrum._update_count == 1 and spectrum.updates.item() == 1 and spectrum.count.sum() > 0
    saved = watcher.state_dict()["diagnostics"]["0:grad_spectrum:GradSpectrum"]
    assert saved["updates"] == 1 and saved["interval"]["count"].sum() > 0  # a checkpoint now is not vacuous
    watcher.on_step_end(1)
    assert spectrum._update_count == 0 and spectrum.count.sum() == 0


def test_grad_scale_rescales_norms_not_ranks():
    model, sink = _model_with_grads(), RecordingSink()
    watcher = _watch(model, sink, spectra=gradwatch.SpectraConfig(every=1), max_overhead=None)
    _step(watcher, 1)
    _step(watcher, 2, grad_scale=4.0)
    a, b = sink.scalars[1], sink.scalars[2]
    assert b["grad_spectrum/spectral_norm/0.weight"] == pytest.approx(4 * a["grad_spectrum/spectral_norm/0.weight"])
    assert b["grad_spectrum/stable_rank/0.weight"] == pytest.approx(a["grad_spectrum/stable_rank/0.weight"])


def _costly_spectra(monkeypatch, clock: FakeClock, seconds: float, first: float | None = None) -> None:
    """Every GradSpectrum observation costs ``seconds`` on the fake clock (the first one ``first``)."""
    original = GradSpectrum.observe
    calls = []

    def costly(self, ctx):
        calls.append(1)
        clock.advance(first if first is not None and len(calls) == 1 else seconds)
        original(self, ctx)

    monkeypatch.setattr(GradSpectrum, "observe", costly)


def test_overhead_budget_postpones_due_work_exactly(monkeypatch):
    clock, sink, model = FakeClock(), RecordingSink(), _model_with_grads()
    _costly_spectra(monkeypatch, clock, 0.05)
    watcher = _watch(model, sink, clock, spectra=gradwatch.SpectraConfig(every=1), max_overhead=0.2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(1, 31):
            _step(watcher, step)
            clock.advance(0.02)  # the "training step": 20 ms against 50 ms of diagnostics
    said = [str(w.message) for w in caught if "postponing" in str(w.message)]
    assert len(said) == 1 and "max_overhead=0.2" in said[0], said  # said once, naming the knob
    logged = sorted(sink.scalars)
    assert watcher.postponed_steps == 30 - len(logged)
    # The first run is warm-up (outside the budget); a later run goes ahead only while the budgeted share
    # is at most 0.2 when the step starts. With k runs so far, budgeted seconds are 0.05 (k - 1) and the
    # wall time at the start of step s is 0.02 (s - 1) + 0.05 k, so run k + 1 needs s - 1 >= (0.25 (k - 1)
    # - 0.05 k) / 0.02: steps 1, 2 (share 0), 9, 19, 29.
    assert logged == [1, 2, 9, 19, 29], logged


def test_within_budget_cadence_spaces_runs_evenly_to_fit_its_share(monkeypatch):
    """Cadence.within_budget: an observation costs 0.5 s (the first, with its one-off costs, 2 s) and a training
    step 1 s; with max_overhead 0.1 and one such diagnostic its share is 0.05, so the period is
    ceil(0.5 / (0.05 * 1)) = 10 steps once the second run's cost is known, and the share of wall time it
    takes tends to 0.5 / 10.5. A period over 10x the minimum is said once, with what to do."""
    clock, sink, model = FakeClock(), RecordingSink(), _model_with_grads()
    _costly_spectra(monkeypatch, clock, 0.5, first=2.0)
    config = gradwatch.SpectraConfig(every=gradwatch.Cadence.within_budget(minimum=5))
    watcher = _watch(model, sink, clock, spectra=config, max_overhead=0.1)
    runs = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(1, 102):
            if _step(watcher, step):
                runs.append(step)
            clock.advance(1.0)  # the training step itself
    # step 1; the first cost (2 s, one-off costs included) gives ceil(2 / 0.05) = 40; the second, 0.5 s: 10
    assert runs[:3] == [1, 41, 51] and all(b - a == 10 for a, b in zip(runs[2:], runs[3:])), runs
    assert watcher.postponed_steps == 0  # the spacing itself keeps within the budget
    assert not [w for w in caught if "runs every" in str(w.message)]  # 40, then 10 steps: not worth a word
    share = (0.5 * (len(runs) - 1)) / (clock.now - 2.0)
    assert share < 0.05
    state = watcher.state_dict()
    fresh = Watcher(watcher.config, clock=clock)
    fresh.load_state_dict(state)
    fresh.attach(model, sinks=[RecordingSink()])
    assert fresh._budgeted[0]["last"] == runs[-1] and fresh._budgeted[0]["cost"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="within_budget"):
        gradwatch.Cadence.within_budget() | gradwatch.Cadence.every(3)
    costly, clock2 = RecordingSink(), FakeClock()  # a run costing 30 steps' time: every 600 steps, said once
    _costly_spectra(monkeypatch, clock2, 30.0)
    slow = _watch(model, costly, clock2, spectra=config, max_overhead=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(1, 1300):
            _step(slow, step)
            clock2.advance(1.0)
    said = [str(w.message) for w in caught if "runs every" in str(w.message)]
    assert len(said) == 1 and "every 600 steps" in said[0] and "probe_size" in said[0], said
    assert "30 training steps' time (its first run, one-off costs included)" in said[0]
    assert sorted(costly.scalars) == [1, 601, 1201]


def test_a_slow_first_run_does_not_silence_a_diagnostic(monkeypatch):
    clock, sink, model = FakeClock(), RecordingSink(), _model_with_grads()
    _costly_spectra(monkeypatch, clock, 0.0, first=0.5)  # one-off start-up cost (imports, pools, a probe draw)
    watcher = _watch(model, sink, clock, spectra=gradwatch.SpectraConfig(every=5), max_overhead=0.2)
    for step in range(1, 41):
        _step(watcher, step)
        clock.advance(0.01)
    assert sorted(sink.scalars) == [1, 5, 10, 15, 20, 25, 30, 35, 40]
    # reported (0.5 s of 0.5 + 39 x 0.01 s of wall time when step 40 is logged), not budgeted
    assert sink.scalars[40]["gradwatch/overhead"] == pytest.approx(0.5 / 0.89)


def test_failing_diagnostic_warns_exactly_once_naming_it_and_logs_nan(monkeypatch):
    model, sink = _model_with_grads(), RecordingSink()

    def broken(self, ctx):
        raise RuntimeError("boom")

    monkeypatch.setattr(GradSpectrum, "observe", broken)
    watcher = _watch(model, sink, spectra=gradwatch.SpectraConfig(every=1), max_overhead=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(1, 6):
            _step(watcher, step)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages  # no torchmetrics "compute before update" warning either
    assert "GradSpectrum (grad_spectrum) failed at step 1" in messages[0] and "boom" in messages[0]
    assert np.isnan(sink.scalars[3]["grad_spectrum/nuclear_norm/0.weight"])

    strict = _watch(model, RecordingSink(), spectra=gradwatch.SpectraConfig(every=1), on_error="raise")
    with pytest.raises(GradWatchError, match="boom"):
        _step(strict, 1)


def test_skipped_scaler_step_is_not_reported():
    model, sink = _model_with_grads(), RecordingSink()
    watcher = _watch(model, sink, spectra=gradwatch.SpectraConfig(every=1), max_overhead=None)
    model[0].weight.grad[0, 0] = float("inf")
    _step(watcher, 1, check_skipped=True)
    assert sink.scalars == {} and watcher.skipped_steps == 1
    _step(watcher, 2)  # without a scaler the step is taken: NaN stats, counted
    assert sink.scalars[2]["grad_spectrum/nonfinite_layers"] == 1
    assert np.isnan(sink.scalars[2]["grad_spectrum/nuclear_norm/0.weight"])
    assert np.isfinite(sink.scalars[2]["grad_spectrum/nuclear_norm/2.weight"])


def test_heatmaps_emitted_at_their_cadence_by_the_sink(tmp_path):
    model = _model_with_grads()
    sink = TensorBoardSink(log_dir=str(tmp_path))
    drawn = []
    sink.log_heatmap = lambda name, step, values, labels, steps, log_scale: drawn.append((name, step, values))
    watcher = _watch(model, sink, spectra=gradwatch.SpectraConfig(every=1, heatmap_every=4), max_overhead=None)
    logged = {step: _step(watcher, step) for step in range(1, 9)}
    assert {name for name, _, _ in drawn} == {f"grad_spectrum/heatmap/{s}" for s in gradwatch.SPECTRUM_STATS}
    steps = sorted({step for _, step, _ in drawn})
    assert steps == [4, 8]  # due at 1 too, but one column is not a picture
    _, _, values = [h for h in drawn if h[0] == "grad_spectrum/heatmap/nuclear_norm"][-1]
    assert values.shape == (3, 8)  # 3 layers x 8 logging events
    assert values[1, -1] == pytest.approx(logged[8]["grad_spectrum/nuclear_norm/2.weight"])
    sink.close()


def test_heatmap_due_during_a_postponement_is_drawn_at_the_next_run(monkeypatch, tmp_path):
    clock, model = FakeClock(), _model_with_grads()
    sink = TensorBoardSink(log_dir=str(tmp_path))
    drawn = []
    sink.log_heatmap = lambda name, step, values, labels, steps, log_scale: drawn.append(step)
    _costly_spectra(monkeypatch, clock, 0.03)
    watcher = _watch(model, sink, clock, spectra=gradwatch.SpectraConfig(every=1, heatmap_every=5,
                                                                          stats=["nuclear_norm"]), max_overhead=0.25)
    runs = [s for s in range(1, 41) if (_step(watcher, s), clock.advance(0.01))[0]]
    assert len(runs) < 40  # the budget postponed work
    # each heatmap due step d (5, 10, ...) is drawn at the first run at or after d
    want = sorted({min(r for r in runs if r >= d) for d in range(5, 41, 5) if any(r >= d for r in runs)})
    assert drawn == want and any(s % 5 for s in drawn), (runs, drawn)
    sink.close()


def test_state_dict_round_trip_before_attach():
    model, sink = _model_with_grads(), RecordingSink()
    watcher = _watch(model, sink, spectra=gradwatch.SpectraConfig(every=1), max_overhead=None)
    for step in range(1, 4):
        _step(watcher, step)
    state = watcher.state_dict()
    fresh = Watcher(gradwatch.WatchConfig(spectra=gradwatch.SpectraConfig(every=1), max_overhead=None))
    fresh.load_state_dict(state)  # as Lightning does: before train start
    restored_sink = RecordingSink()
    fresh.attach(model, sinks=[restored_sink])
    assert fresh.steps_seen == 3
    assert restored_sink.restored == {"steps": [1, 2, 3]}  # the sinks' memory (heatmap history) comes back
    # the state loads with torch.load(weights_only=True): nothing but tensors, numbers, strings and lists
    import io
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True)["steps_seen"] == 3


def test_extra_pass_is_observe_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))
    model.train()
    model[1].eval()  # a user's mixed modes are restored as they were
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    with extra_pass(model) as extra:
        assert not any(mod.training for mod in extra.model.modules())
        extra.model(torch.randn(8, 4)).sum()
        torch.rand(3)
    with extra_pass(model, grad=False) as extra:
        assert not torch.is_grad_enabled()
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training and model[0].training and not model[1].training and model[2].training
    assert all(torch.equal(buffers[k], v) for k, v in model.state_dict().items())


def test_extra_pass_gives_float32_copies_of_a_bf16_model():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).to(torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with extra_pass(model, grad=True) as extra:
        assert extra.float32 and all(p.dtype == torch.float32 for p in extra.params.values())
        x = extra.cast(torch.randn(3, 4, dtype=torch.bfloat16))
        assert x.dtype == torch.float32
        out = extra.model(x)
        assert out.dtype == torch.float32
        g = torch.autograd.grad(out.sum(), [extra.params["0.weight"]])[0]
        assert g.dtype == torch.float32
    assert all(p.dtype == torch.bfloat16 and p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---- a toy diagnostic exercising the rest of the contract --------------------------------------------------


class ToyActivations(Diagnostic):
    """Counts forward reports of one module and raises an alert when asked."""

    stem = "toy"
    needs = frozenset({"activations", "weights_before", "loss"})
    phase = "step_end"

    def __init__(self, module_name: str, every: Cadence, log_every: Cadence | None = None, alert_at=()) -> None:
        super().__init__()
        self.module_name = module_name
        self.every, self.log_every, self.alert_at = every, log_every, set(alert_at)
        self.add_state("seen", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum", persistent=True)
        self.add_state("peak", torch.zeros((), dtype=torch.float64), dist_reduce_fx="max", persistent=True)
        self.calls = 0
        self.observed: list[tuple[int, float, float]] = []

    def observe_cadence(self):
        return self.every

    def log_cadence(self):
        return self.log_every

    def activation_sites(self, model):
        module = dict(model.named_modules())[self.module_name]

        def on_forward(mod, args, kwargs, output):
            self.calls += 1
            self.peak = torch.maximum(self.peak, output.detach().abs().max().double())

        return [ActivationSite(self.module_name, module, on_forward=on_forward)]

    def observe(self, ctx):
        before = ctx.weights_before()
        moved = sum(float((ctx.params[n] - w).norm()) for n, w in before.items())
        self.observed.append((ctx.step, float(ctx.loss), moved))
        self.update(ctx.step)

    def update(self, step):  # type: ignore[override]
        self.seen += 1
        self._last_step = step

    def compute(self):
        alerts = [Alert("toy/rule", "warning", "toy alert", {"step": self._last_step}, ["do less"])] \
            if self._last_step in self.alert_at else []
        return Results(scalars={"toy/seen": self.seen, "toy/peak": self.peak},
                       records={"toy": [{"step": self._last_step}]}, alerts=alerts)


def _toy_watcher(model, sink, toy, clock=None, max_overhead=None, **kwargs):
    from dataclasses import dataclass

    from gradwatch.registry import Family, register, unregister

    @dataclass(frozen=True)
    class ToyConfig:
        every: int = 1

    register(Family("toy", "toy", ToyConfig, False, lambda cfg, inputs: [toy]))
    try:
        watcher = Watcher(gradwatch.WatchConfig(spectra=False, toy=True, max_overhead=max_overhead, **kwargs),
                          **({"clock": clock} if clock else {}))
        watcher.attach(model, sinks=[sink])
    finally:
        unregister("toy")
    return watcher


def test_time_in_forward_hooks_and_gradient_hooks_is_gradwatch_time():
    """Reductions inside the user's forward (activation sites) and backward (micro-batch gradient hooks) run
    outside the engine's events; their seconds still count in gradwatch/overhead and the budget."""
    from gradwatch.engine.hooks import ActivationCapture, MicroBatchGradients

    clock = FakeClock()
    spent: list[float] = []
    capture = ActivationCapture(on_error=lambda owner, exc: None, on_spent=spent.append, clock=clock)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    capture.arm([(0, ActivationSite("0", model[0], on_forward=lambda *a: clock.advance(0.25)))])
    model(torch.randn(3, 4))
    capture.disarm()
    assert spent == [0.0, 0.25]  # each hook's whole time: the pre-hook (no fake time) and the reduction's
    tap = MicroBatchGradients(on_spent=spent.append, clock=clock)
    tap.arm(list(model.parameters()))
    model(torch.randn(3, 4)).sum().backward()
    tap.disarm()
    assert len(spent) == 2 + 4  # one per parameter's hook (each took no fake time)


    class SlowToy(ToyActivations):  # its reduction takes 2 s of the user's forward
        def activation_sites(self, model):
            (site,) = super().activation_sites(model)
            reduce = site.on_forward
            site.on_forward = lambda *a: (clock.advance(2.0), reduce(*a))
            return [site]

    model2 = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    watcher = _toy_watcher(model2, RecordingSink(), SlowToy("1", every=Cadence.every(1)), clock=clock)
    watcher.on_step_start(1)
    model2(torch.randn(5, 4)).sum().backward()
    clock.advance(2.0)  # the user's own work
    assert watcher.overhead() == pytest.approx(0.5)  # 2 s of 4 s since attach


def test_activation_hooks_live_on_due_steps_only_and_fire_once_per_micro_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    toy = ToyActivations("1", every=Cadence.every(2, first=False))
    watcher = _toy_watcher(model, RecordingSink(), toy)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(1, 5):
        watcher.on_step_start(step)
        assert bool(model[1]._forward_hooks) == (step % 2 == 0)  # armed on due steps only
        for _ in range(3):  # three micro-batches, the middle segment re-run by gradient checkpointing
            x = torch.randn(5, 4)
            h = torch.utils.checkpoint.checkpoint(lambda t: model[1](model[0](t)), x, use_reentrant=False)
            model[2](h).sum().backward()
        watcher.on_gradients_ready(step, optimizer=opt)
        assert not model[1]._forward_hooks and not model[1]._forward_pre_hooks  # removed before the step
        opt.step()
        watcher.on_step_end(step, loss=torch.tensor(float(step)))
        opt.zero_grad()
    assert toy.calls == 2 * 3  # two due steps x three micro-batches; recomputation not counted
    assert [s for s, _, _ in toy.observed] == [2, 4] and [loss for _, loss, _ in toy.observed] == [2.0, 4.0]
    assert all(moved > 0 for _, _, moved in toy.observed)  # weights before the step differ from after


def test_log_cadence_aggregates_an_interval_records_and_alerts_once_per_rule():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    toy = ToyActivations("1", every=Cadence.every(1), log_every=Cadence.every(3, first=False), alert_at={3, 6, 9})
    seen_alerts = []
    sink = RecordingSink()
    watcher = _toy_watcher(model, sink, toy, on_alert=seen_alerts.append, alert_cooldown=5)
    for step in range(1, 10):
        watcher.on_step_start(step)
        model(torch.randn(2, 4)).sum().backward()
        watcher.on_gradients_ready(step)
        watcher.on_step_end(step, loss=1.0)
    assert sorted(sink.scalars) == [3, 6, 9]
    assert [sink.scalars[s]["toy/seen"] for s in (3, 6, 9)] == [3, 3, 3]  # an interval of three observations
    assert sink.emissions[6].records == {"toy": [{"step": 6}]}
    # the rule fired at 3; 6 is inside the 5-step cooldown; 9 is past it
    assert [a.step for a in seen_alerts] == [3, 9] and seen_alerts[0].rule == "toy/rule"
    assert [len(sink.emissions[s].alerts) for s in (3, 6, 9)] == [1, 0, 1]


def test_strict_mode_raises_alerts_and_on_alert_failures_are_said_once():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))

    def run(**kwargs):
        toy = ToyActivations("1", every=Cadence.every(1), alert_at={1, 2, 3})
        watcher = _toy_watcher(model, RecordingSink(), toy, alert_cooldown=0, **kwargs)
        for step in range(1, 4):
            watcher.on_step_start(step)
            watcher.on_gradients_ready(step)
            watcher.on_step_end(step, loss=0.0)

    with pytest.raises(GradWatchAlert, match="toy/rule at step 1"):
        run(on_error="raise")

    def bad_handler(alert):
        raise OSError("disk full")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(on_alert=bad_handler)
    said = [str(w.message) for w in caught if "on_alert" in str(w.message)]
    assert len(said) == 1 and "disk full" in said[0]


def test_a_failing_activation_reduction_never_breaks_the_forward():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    toy = ToyActivations("1", every=Cadence.every(1))
    toy.activation_sites = lambda m: [ActivationSite("1", m[1], on_forward=lambda *a: 1 / 0)]
    watcher = _toy_watcher(model, RecordingSink(), toy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in (1, 2):
            watcher.on_step_start(step)
            out = model(torch.randn(2, 4))  # the user's forward goes on
            watcher.on_gradients_ready(step)
            watcher.on_step_end(step, loss=0.0)
    assert out.shape == (2, 2)
    said = [str(w.message) for w in caught]
    assert len(said) == 1 and "ToyActivations (toy) failed while reducing a forward activation" in said[0]


def test_two_armed_captures_disarmed_in_any_order_leave_sdpa_as_it_was():
    import torch.nn.functional as F

    from gradwatch.engine.hooks import ActivationCapture

    original = F.scaled_dot_product_attention
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    seen: dict[str, int] = {"a": 0, "b": 0}

    def site(name):
        return ActivationSite("attn", mha, on_attention=lambda *a: seen.__setitem__(name, seen[name] + 1))

    a, b = ActivationCapture(on_error=print), ActivationCapture(on_error=print)
    a.arm([(0, site("a"))])
    b.arm([(0, site("b"))])
    x = torch.randn(1, 3, 8)
    mha(x, x, x, need_weights=False)
    assert seen == {"a": 1, "b": 1}  # both report, through one wrapper
    a.disarm()
    assert F.scaled_dot_product_attention is not original  # b is still armed
    mha(x, x, x, need_weights=False)
    assert seen == {"a": 1, "b": 2}
    b.disarm()
    assert F.scaled_dot_product_attention is original


# ---- bursts: Diagnostic.continues ------------------------------------------------------------------------


class BurstToy(Diagnostic):
    """Observes in bursts of ``1 + length`` consecutive steps (as the signals family does); each observation
    advances the fake clock by ``cost`` seconds."""

    stem = "toy"
    needs = frozenset()
    phase = "step_end"

    def __init__(self, every: Cadence, clock: FakeClock, cost: float, length: int = 3) -> None:
        super().__init__()
        self.every, self.clock, self.cost, self.length = every, clock, cost, length
        self.add_state("seen", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.left, self.last, self.observed = 0, None, []

    def observe_cadence(self):
        return self.every

    def continues(self, step):
        return self.left > 0 and self.last == step - 1

    def observe(self, ctx):
        self.clock.advance(self.cost)
        self.left = self.length if self.last != ctx.step - 1 else self.left - 1
        self.last = ctx.step
        self.observed.append(ctx.step)
        self.update()

    def update(self):  # type: ignore[override]
        self.seen += 1

    def compute(self):
        return Results(scalars={"toy/seen": self.seen})


def test_a_burst_runs_on_consecutive_steps_costs_its_sum_and_is_never_postponed():
    """Cadence.within_budget(minimum=5) with bursts of 4 observations of 0.5 s and training steps of 1 s, at
    max_overhead 0.1 (the diagnostic's share 0.05): a run costs 4 x 0.5 = 2 s, so the period is
    ceil(2 / 0.05) = 40 (counted per observation it would be 10). With a fixed cadence far over the budget,
    the burst begun at step 1 still runs at 2, 3, 4; the due step 20 waits."""
    clock, sink = FakeClock(), RecordingSink()
    toy = BurstToy(Cadence.within_budget(minimum=5), clock, 0.5)
    watcher = _toy_watcher(_model_with_grads(), sink, toy, clock, max_overhead=0.1)
    for step in range(1, 101):
        _step(watcher, step)
        clock.advance(1.0)
    assert toy.observed == [1, 2, 3, 4, 41, 42, 43, 44, 81, 82, 83, 84], toy.observed
    assert sorted(sink.scalars) == toy.observed

    clock, sink = FakeClock(), RecordingSink()
    toy = BurstToy(Cadence.every(20), clock, 5.0)
    watcher = _toy_watcher(_model_with_grads(), sink, toy, clock, max_overhead=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(1, 31):
            _step(watcher, step)
            clock.advance(1.0)
    assert toy.observed[:4] == [1, 2, 3, 4] and 20 not in toy.observed and watcher.postponed_steps > 0
