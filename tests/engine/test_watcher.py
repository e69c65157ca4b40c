"""The engine without any host: cadence, overhead budget, errors, observe-only extra passes, state."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.engine import GradWatchError, Watcher, extra_pass
from gradwatch.metrics import GradSpectrum


class RecordingSink:
    def __init__(self) -> None:
        self.scalars: dict[int, dict[str, float]] = {}
        self.layouts: list[dict] = []
        self.heatmaps: list[tuple[str, int, np.ndarray]] = []

    def write_layout(self, layout):
        self.layouts.append(layout)

    def log_scalars(self, step, scalars):
        self.scalars.setdefault(step, {}).update(scalars)

    def log_heatmap(self, name, step, values, labels, steps, log_scale):
        self.heatmaps.append((name, step, values))

    def log_text(self, tag, text, step):
        pass

    def flush(self):
        pass

    def close(self):
        pass


def _model_with_grads(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    nn.functional.cross_entropy(model(x), y).backward()
    return model


def _watch(model, sink, **kwargs) -> Watcher:
    watcher = Watcher(gradwatch.WatchConfig(**kwargs))
    watcher.attach(model, sinks=[sink])
    return watcher


def test_logs_at_cadence_with_values_of_the_gradients():
    model, sink = _model_with_grads(), RecordingSink()
    watcher = _watch(model, sink, spectra=gradwatch.SpectraConfig(every=3), max_overhead=None)
    for step in range(1, 10):
        watcher.on_gradients_ready(step)
    assert sorted(sink.scalars) == [1, 3, 6, 9]
    ref = np.linalg.svd(model[2].weight.grad.double().numpy(), compute_uv=False)
    got = sink.scalars[3]["grad_spectrum/nuclear_norm/2.weight"]
    assert got == pytest.approx(ref.sum(), rel=1e-9)
    assert 0 < sink.scalars[9]["gradwatch/overhead"] < 1
    assert "grad_spectrum/nuclear_norm" in sink.layouts[0] and "gradwatch" in sink.layouts[0]


def test_grad_scale_rescales_norms_not_ranks():
    model, sink = _model_with_grads(), RecordingSink()
    watcher = _watch(model, sink, spectra=gradwatch.SpectraConfig(every=1), max_overhead=None)
    watcher.on_gradients_ready(1)
    watcher.on_gradients_ready(2, grad_scale=4.0)
    a, b = sink.scalars[1], sink.scalars[2]
    assert b["grad_spectrum/spectral_norm/0.weight"] == pytest.approx(4 * a["grad_spectrum/spectral_norm/0.weight"])
    assert b["grad_spectrum/stable_rank/0.weight"] == pytest.approx(a["grad_spectrum/stable_rank/0.weight"])


def _slow_spectra(monkeypatch, seconds: float) -> None:
    """Every GradSpectrum computation takes ``seconds`` longer."""
    original = GradSpectrum.observe

    def slow_observe(self, ctx):
        time.sleep(seconds)
        original(self, ctx)

    monkeypatch.setattr(GradSpectrum, "observe", slow_observe)


def test_overhead_budget_postpones_due_work(monkeypatch):
    model, sink = _model_with_grads(), RecordingSink()
    _slow_spectra(monkeypatch, 0.05)
    watcher = _watch(model, sink, spectra=gradwatch.SpectraConfig(every=1), max_overhead=0.2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(1, 31):
            watcher.on_gradients_ready(step)
            time.sleep(0.02)  # the "training step": 20 ms against 50 ms of diagnostics
    said = [str(w.message) for w in caught if "postponing" in str(w.message)]
    assert len(said) == 1 and "max_overhead=0.2" in said[0], said  # said once, naming the knob
    logged = sorted(sink.scalars)
    assert watcher.postponed_steps == 30 - len(logged)
    # the first due computation always runs (warm-up, outside the budget); the next ones wait until the
    # share is back under 20%: with 50 ms per computation and 30 x 20 ms of training, 2 to 6 of 30 run
    assert logged[0] == 1 and 2 <= len(logged) <= 6, logged
    assert watcher._budgeted_share() < 0.3
    assert watcher.overhead() < 0.45


def test_a_slow_first_run_does_not_silence_a_diagnostic(monkeypatch):
    model, sink = _model_with_grads(), RecordingSink()
    original = GradSpectrum.observe
    calls = []

    def slow_first(self, ctx):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(0.5)  # one-off start-up cost (imports, thread pools, a probe draw)
        original(self, ctx)

    monkeypatch.setattr(GradSpectrum, "observe", slow_first)
    watcher = _watch(model, sink, spectra=gradwatch.SpectraConfig(every=5), max_overhead=0.2)
    for step in range(1, 41):
        watcher.on_gradients_ready(step)
        time.sleep(0.01)
    assert sorted(sink.scalars) == [1, 5, 10, 15, 20, 25, 30, 35, 40]
    assert sink.scalars[40]["gradwatch/overhead"] > 0.4  # the warm-up is still reported, just not budgeted


def test_failing_diagnostic_warns_once_and_logs_nan(monkeypatch):
    model, sink = _model_with_grads(), RecordingSink()

    def broken(self, ctx):
        raise RuntimeError("boom")

    monkeypatch.setattr(GradSpectrum, "observe", broken)
    watcher = _watch(model, sink, spectra=gradwatch.SpectraConfig(every=1), max_overhead=None)
    with pytest.warns(RuntimeWarning, match="GradSpectrum failed") as record:
        for step in range(1, 4):
            watcher.on_gradients_ready(step)
    assert len([w for w in record if "GradSpectrum failed" in str(w.message)]) == 1
    assert np.isnan(sink.scalars[3]["grad_spectrum/nuclear_norm/0.weight"])

    strict = _watch(model, RecordingSink(), spectra=gradwatch.SpectraConfig(every=1), on_error="raise")
    with pytest.raises(GradWatchError, match="boom"):
        strict.on_gradients_ready(1)


def test_skipped_scaler_step_is_not_reported():
    model, sink = _model_with_grads(), RecordingSink()
    watcher = _watch(model, sink, spectra=gradwatch.SpectraConfig(every=1), max_overhead=None)
    model[0].weight.grad[0, 0] = float("inf")
    watcher.on_gradients_ready(1, check_skipped=True)
    assert sink.scalars == {} and watcher.skipped_steps == 1
    watcher.on_gradients_ready(2)  # without a scaler the step is taken: NaN stats, counted
    assert sink.scalars[2]["grad_spectrum/nonfinite_layers"] == 1
    assert np.isnan(sink.scalars[2]["grad_spectrum/nuclear_norm/0.weight"])
    assert np.isfinite(sink.scalars[2]["grad_spectrum/nuclear_norm/2.weight"])


def test_non_zero_rank_computes_and_writes_nothing():
    model, sink = _model_with_grads(), RecordingSink()
    watcher = Watcher(gradwatch.WatchConfig(max_overhead=None))
    watcher.attach(model, sinks=[sink], is_rank_zero=False)
    assert watcher.on_gradients_ready(1) == {} and sink.scalars == {} and sink.layouts == []


def test_heatmaps_emitted_at_their_cadence():
    model, sink = _model_with_grads(), RecordingSink()
    watcher = _watch(model, sink, spectra=gradwatch.SpectraConfig(every=1, heatmap_every=4), max_overhead=None)
    for step in range(1, 9):
        watcher.on_gradients_ready(step)
    names = {name for name, _, _ in sink.heatmaps}
    assert "grad_spectrum/heatmap/effective_rank" in names
    _, step, values = [h for h in sink.heatmaps if h[0] == "grad_spectrum/heatmap/nuclear_norm"][-1]
    assert step == 8 and values.shape == (3, 8)  # 3 layers x 8 logging events
    assert values[1, -1] == pytest.approx(sink.scalars[8]["grad_spectrum/nuclear_norm/2.weight"])


def test_state_dict_round_trip_before_attach():
    model, sink = _model_with_grads(), RecordingSink()
    watcher = _watch(model, sink, spectra=gradwatch.SpectraConfig(every=1), max_overhead=None)
    for step in range(1, 4):
        watcher.on_gradients_ready(step)
    state = watcher.state_dict()
    fresh = Watcher(gradwatch.WatchConfig(spectra=gradwatch.SpectraConfig(every=1), max_overhead=None))
    fresh.load_state_dict(state)  # as Lightning does: before train start
    fresh.attach(model, sinks=[RecordingSink()])
    assert fresh.steps_seen == 3
    assert fresh._history.keys() == watcher._history.keys()
    assert len(fresh._history["grad_spectrum/heatmap/nuclear_norm"][0]) == 3


def test_extra_pass_is_observe_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))
    model.train()
    model[1].eval()  # a user's mixed modes are restored as they were
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    with extra_pass(model) as m:
        assert not any(mod.training for mod in m.modules())
        m(torch.randn(8, 4)).sum()
        torch.rand(3)
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training and model[0].training and not model[1].training and model[2].training
    assert all(torch.equal(buffers[k], v) for k, v in model.state_dict().items())


def test_heatmap_due_during_a_postponement_is_drawn_at_the_next_run(monkeypatch):
    model, sink = _model_with_grads(), RecordingSink()
    _slow_spectra(monkeypatch, 0.03)
    watcher = _watch(model, sink, spectra=gradwatch.SpectraConfig(every=1, heatmap_every=5), max_overhead=0.25)
    for step in range(1, 41):
        watcher.on_gradients_ready(step)
        time.sleep(0.01)
    runs = sorted(sink.scalars)
    drawn = sorted({step for name, step, _ in sink.heatmaps})
    assert len(runs) < 40  # the budget postponed work
    assert drawn and set(drawn) <= set(runs)
    assert any(step % 5 for step in drawn) or all(step % 5 == 0 for step in runs[1:])
