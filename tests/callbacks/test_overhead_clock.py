"""gradwatch's clock runs from entering a callback method to leaving it (exact, with a fake clock): the host
glue around the engine's events (reading the loss, the gradient factor, the sinks) is gradwatch's time too,
counted once, and the user's own time is not."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from gradwatch.callbacks.lightning import GradWatch
from gradwatch.engine.watcher import Watcher
from gradwatch.integrations import lightning as glue


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class UserWork(Callback):
    """The user's own second per step, on the same clock, outside gradwatch."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock

    def on_train_batch_start(self, *args: Any) -> None:
        self.clock.advance(1.0)


def _slow(clock: FakeClock, fn: Any, seconds: float) -> Any:
    def slow(*args: Any, **kwargs: Any) -> Any:
        clock.advance(seconds)
        return fn(*args, **kwargs)

    return slow


def test_time_inside_the_lightning_callback_methods_is_counted_once(tmp_path, monkeypatch) -> None:
    from _support.lit import fit

    clock = FakeClock()
    # glue the engine's own events never see: only the callback's counting() blocks put it on the clock
    for name, seconds in (("sinks_for", 0.5), ("accumulation", 0.01), ("true_gradient_factor", 0.02),
                          ("step_loss", 0.03)):
        monkeypatch.setattr(glue, name, _slow(clock, getattr(glue, name), seconds))
    gw = GradWatch(spectra=False, stability=False, max_overhead=None)
    gw.watcher = Watcher(gw.config, clock=clock)
    steps = 3
    _, module = fit(tmp_path, [UserWork(clock), gw], max_steps=steps, logger=False)
    budget = gw.watcher.budget
    assert budget.engine_seconds == pytest.approx(0.5 + steps * 0.06, abs=1e-12)
    assert budget.warmup_seconds == pytest.approx(0.5, abs=1e-12)  # on_train_start's block is one-off
    assert budget.wall_start == 0.0  # the clock starts when on_train_start is entered, not at attach
    assert gw.watcher.overhead() == pytest.approx(0.68 / 3.68, abs=1e-12)
    assert gw.watcher.budgeted_overhead() == pytest.approx(0.18 / 3.68, abs=1e-12)
    # observe-only: the same weights as a run without gradwatch
    _, plain = fit(tmp_path / "plain", [], max_steps=steps, logger=False)
    assert all(torch.equal(a, b) for a, b in zip(module.state_dict().values(), plain.state_dict().values()))


def test_nested_blocks_and_the_events_inside_count_once() -> None:
    clock = FakeClock()
    watcher = Watcher(GradWatch(spectra=False, max_overhead=None).config, clock=clock)
    watcher.attach(torch.nn.Linear(3, 2))
    start = watcher.budget.engine_seconds
    with watcher.counting():
        clock.advance(0.25)
        with watcher.counting():
            watcher.on_step_start(1)  # an event inside: its own report is not added again
            clock.advance(0.5)
            watcher._spent_in_hooks(7.0)  # a hook firing inside a block: already on the clock
        clock.advance(0.25)
    assert watcher.budget.engine_seconds - start == pytest.approx(1.0, abs=1e-12)
    watcher._spent_in_hooks(0.125)  # outside any block: added
    assert watcher.budget.engine_seconds - start == pytest.approx(1.125, abs=1e-12)


def test_the_hf_training_step_wrapper_reports_its_own_time_only(monkeypatch) -> None:
    from types import SimpleNamespace

    from gradwatch.integrations import huggingface as hf

    clock = FakeClock()
    monkeypatch.setattr(hf.time, "perf_counter", clock)
    spent: list[float] = []
    recorder = hf.StepLossRecorder(on_inputs=lambda inputs: clock.advance(0.25), on_spent=spent.append)

    def training_step(model: Any, inputs: Any) -> torch.Tensor:
        clock.advance(10.0)  # the host's own step: not gradwatch's
        return torch.tensor(2.0)

    trainer = SimpleNamespace(training_step=training_step)
    recorder.install(trainer)
    assert float(trainer.training_step(None, {"x": 1})) == 2.0
    recorder.uninstall()
    assert spent == [0.25] and float(recorder.pop()) == 2.0
