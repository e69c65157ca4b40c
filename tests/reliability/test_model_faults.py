"""Faults in the model: training finishes, each faulty layer is named in exactly one warning, a statistic that is
undefined logs NaN (never 0), and no numpy/torch division warning escapes.

One faulty model carries every layer-level fault at once (each test reads its own layer's series back from
TensorBoard): an Inf gradient in ``fc1`` at step 2 and a NaN gradient in ``fc2`` at step 3 (written into
``.grad`` by a post-accumulate hook, so only the training backward sees them, and the user's guard then
skips those steps, as a user's NaN guard does), a branch the forward never uses, a frozen layer, a layer
whose gradient is all zeros (its output multiplied by 0), a 1 x 16 weight and two 0-size weights (3 x 0
and 0 x 4). A second run has a NaN loss at step 3. Spectra, stability and sharpness observe every step.
Through Lightning (both runs) and the Hugging Face Trainer (the faulty model).
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from _support.tensorboard import read_series
from torch import Tensor, nn

from gradwatch import SharpnessConfig, SpectraConfig, StabilityConfig, WatchConfig

STEPS = 4
OURS = ("grad_spectrum/", "stability/", "sharpness/")
DIVISION = r".*(divide|invalid value|overflow|encountered)"
RATIOS = ("stable_rank", "effective_rank", "top1_ratio")
NORMS = ("nuclear_norm", "spectral_norm", "frobenius_norm")


def config() -> WatchConfig:
    return WatchConfig(spectra=SpectraConfig(every=1), stability=StabilityConfig(every=1, spike_every=1),
                       sharpness=SharpnessConfig(every=1, probe_size=16, max_iter=5), max_overhead=None)


class FaultyNet(nn.Module):
    """8 -> 16 -> 16 -> 3 with every layer-level fault (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.head = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 3)
        self.unused = nn.Linear(16, 16)
        self.frozen = nn.Linear(16, 16).requires_grad_(False)
        self.zero = nn.Linear(16, 16)
        self.thin = nn.Linear(16, 1)
        self.empty_in, self.empty_out = nn.Linear(0, 3), nn.Linear(4, 0)
        self.forwards = 0  # training forwards: one per step
        self.fc1.weight.register_post_accumulate_grad_hook(lambda p: self._plant(p, 2, math.inf))
        self.fc2.weight.register_post_accumulate_grad_hook(lambda p: self._plant(p, 3, math.nan))

    def _plant(self, p: Tensor, step: int, value: float) -> None:
        if self.forwards == step:  # probe passes run in eval mode and never accumulate into .grad
            p.grad[0, 0] = value

    def forward(self, x: Tensor) -> Tensor:
        self.forwards += self.training
        h = torch.tanh(self.fc1(x))
        h = torch.tanh(self.fc2(h)) + self.frozen(h)
        h = h + 0.0 * self.zero(h) + self.thin(h)
        return self.head(h) + self.empty_in(x[:, :0]) + self.empty_out(x[:, :4]).sum(1, keepdim=True)


def skip_nonfinite(params: Any, optimizer: Any) -> None:
    """The user's guard, after gradwatch has read the gradients: a step with an inf/NaN gradient is skipped."""
    if any(not torch.isfinite(p.grad).all() for p in params if p.grad is not None):
        optimizer.zero_grad(set_to_none=True)


def recorded(run: Any) -> tuple[Any, list[str]]:
    """``run()``'s result and the messages of every warning it raised; a division warning is an error."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("error", message=DIVISION, category=RuntimeWarning)
        out = run()
    return out, [str(w.message) for w in caught]


def lightning_run(root: Any, *, nan_loss: bool = False) -> tuple[Any, list[str]]:
    import lightning as L
    from _support.lit import fit, loader

    from gradwatch.callbacks.lightning import GradWatch

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = FaultyNet()

        def forward(self, x: Tensor) -> Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            x, y = batch
            loss = F.cross_entropy(self.net(x), y)
            return loss * math.nan if nan_loss and self.global_step == 2 else loss

        def on_before_optimizer_step(self, optimizer: Any) -> None:  # runs after the callbacks' hook
            skip_nonfinite(self.parameters(), optimizer)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.05)

    module = Module()
    if nan_loss:  # only the loss is at fault in this run
        module.net.forwards = -100
    (trainer, _), messages = recorded(lambda: fit(root, [GradWatch(config())], max_steps=STEPS, module=module,
                                                  data=loader(32, 8)))
    return dict(steps=trainer.global_step, net=module.net, series=read_series(root, OURS)), messages


def hf_run(root: Any) -> tuple[Any, list[str]]:
    from _support.hf import training_args
    from _support.models import DictData, DictNet
    from transformers import Trainer, TrainerCallback

    from gradwatch.callbacks.transformers import GradWatch

    class Guard(TrainerCallback):
        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                                  **kwargs: Any) -> None:
            skip_nonfinite(model.parameters(), optimizer)

    model = DictNet(net=FaultyNet())
    # no clipping: HF's clip multiplies every gradient by max_norm / nan once one holds a NaN
    args = training_args(root, max_steps=STEPS, per_device_train_batch_size=8, optim="sgd", max_grad_norm=0.0,
                         report_to=[])
    gw = GradWatch(config(), log_dir=str(root / "tb"))
    trainer = Trainer(model=model, args=args, train_dataset=DictData(32), callbacks=[gw, Guard()])
    _, messages = recorded(trainer.train)
    return dict(steps=trainer.state.global_step, net=model.net, series=read_series(root / "tb", OURS)), messages


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    return {"lightning": lightning_run(tmp_path_factory.mktemp("faulty_pl")),
            "hf": hf_run(tmp_path_factory.mktemp("faulty_hf"))}


@pytest.fixture(scope="module")
def nan_loss(tmp_path_factory):
    return lightning_run(tmp_path_factory.mktemp("nan_loss"), nan_loss=True)


HOSTS = ["lightning", "hf"]
PREFIX = {"lightning": "net.", "hf": "net."}  # the LightningModule's and DictNet's ``net``


def naming(messages: list[str], tag: str) -> list[str]:
    return [m for m in messages if re.search(re.escape(tag) + r"\b", m)]


def spectrum(series: dict, stat: str, tag: str) -> dict[int, float]:
    return series[f"grad_spectrum/{stat}/{tag}"]


@pytest.mark.parametrize("host", HOSTS)
def test_training_finishes_with_no_division_warning_and_no_failed_diagnostic(faulty, host):
    run, messages = faulty[host]
    assert run["steps"] == STEPS
    assert all(torch.isfinite(p).all() for p in run["net"].parameters())  # the guard skipped the bad steps
    assert not [m for m in messages if re.match(DIVISION, m)]
    assert not [m for m in messages if "failed" in m], messages


@pytest.mark.parametrize("host", HOSTS)
def test_inf_and_nan_gradient_at_one_step_in_one_layer(faulty, host):
    run, messages = faulty[host]
    s, p = run["series"], PREFIX[host]
    for layer, bad_step in (("fc1", 2), ("fc2", 3)):
        tag = f"{p}{layer}.weight"
        for stat in (*NORMS, *RATIOS):
            values = spectrum(s, stat, tag)
            assert sorted(values) == list(range(1, STEPS + 1))
            assert math.isnan(values[bad_step]), (tag, stat, values)
            assert all(math.isfinite(v) and v > 0 for k, v in values.items() if k != bad_step), (tag, stat, values)
        (said,) = naming(messages, tag)
        assert f"step {bad_step}" in said and "inf/NaN" in said
    assert s["grad_spectrum/nonfinite_layers"] == {1: 0.0, 2: 1.0, 3: 1.0, 4: 0.0}


@pytest.mark.parametrize("host", HOSTS)
def test_unused_branch_has_no_gradient(faulty, host):
    run, messages = faulty[host]
    tag = f"{PREFIX[host]}unused.weight"
    for stat in (*NORMS, *RATIOS):
        assert all(math.isnan(v) for v in spectrum(run["series"], stat, tag).values()), stat
    (said,) = naming(messages, tag)
    assert "no gradient" in said


@pytest.mark.parametrize("host", HOSTS)
def test_frozen_layer_is_skipped_and_named_once(faulty, host):
    run, messages = faulty[host]
    tag = f"{PREFIX[host]}frozen.weight"
    assert not [t for t in run["series"] if tag in t]
    (said,) = naming(messages, tag)
    assert "do not require a gradient" in said


@pytest.mark.parametrize("host", HOSTS)
def test_all_zero_gradient_norms_are_zero_and_ratios_nan(faulty, host):
    run, messages = faulty[host]
    tag = f"{PREFIX[host]}zero.weight"
    for stat in NORMS:
        assert set(spectrum(run["series"], stat, tag).values()) == {0.0}, stat
    for stat in RATIOS:
        assert all(math.isnan(v) for v in spectrum(run["series"], stat, tag).values()), stat
    (said,) = naming(messages, tag)
    assert "all zeros" in said


@pytest.mark.parametrize("host", HOSTS)
def test_one_by_n_weight_is_rank_one(faulty, host):
    run, messages = faulty[host]
    tag = f"{PREFIX[host]}thin.weight"
    s = run["series"]
    for step in range(1, STEPS + 1):
        nuclear = spectrum(s, "nuclear_norm", tag)[step]
        assert nuclear > 0
        for stat in ("spectral_norm", "frobenius_norm"):
            assert spectrum(s, stat, tag)[step] == pytest.approx(nuclear, rel=1e-6)
        for stat in RATIOS:
            assert spectrum(s, stat, tag)[step] == pytest.approx(1.0, rel=1e-6)
    assert not naming(messages, tag)


@pytest.mark.parametrize("host", HOSTS)
def test_zero_size_weights_log_nan_and_are_named_once(faulty, host):
    run, messages = faulty[host]
    for name, shape in (("empty_in", "(3, 0)"), ("empty_out", "(0, 4)")):
        tag = f"{PREFIX[host]}{name}.weight"
        for stat in (*NORMS, *RATIOS):
            values = spectrum(run["series"], stat, tag)
            assert len(values) == STEPS and all(math.isnan(v) for v in values.values()), (tag, stat)
        (said,) = naming(messages, tag)
        assert "0-size" in said and shape in said
    # the other layers are unaffected by them (a 0-size matrix once made the whole family fail)
    assert math.isfinite(spectrum(run["series"], "nuclear_norm", f"{PREFIX[host]}head.weight")[1])


def test_nan_loss(nan_loss):
    run, messages = nan_loss
    s, p = run["series"], PREFIX["lightning"]
    assert run["steps"] == STEPS
    assert s["grad_spectrum/nonfinite_layers"][3] == 5.0  # every layer with a gradient: fc1, fc2, head, thin, zero
    for layer in ("fc1", "fc2", "head"):
        tag = f"{p}{layer}.weight"
        values = spectrum(s, "nuclear_norm", tag)
        assert math.isnan(values[3]) and all(math.isfinite(values[k]) for k in (1, 2, 4))
        assert len(naming(messages, tag)) == 1
    # the Hessian of a NaN loss is undefined: NaN at that step, one clear warning, and the next step is fine
    lam = s["sharpness/lambda_max"]
    assert math.isnan(lam[3]) and all(math.isfinite(lam[k]) for k in (1, 2, 4))
    (said,) = [m for m in messages if "Sharpness" in m]
    assert "training loss on the probe set is nan" in said
    assert not [m for m in messages if re.match(DIVISION, m)]


def test_layer_over_the_per_example_memory_cap_is_skipped_and_said_once(tmp_path, monkeypatch):
    """The one memory cap of the spectra: the per-example pass keeps one example's gradients under
    ``PerExampleGradSpectrum.max_bytes`` (512 MiB; here 2 KiB). A layer whose single-example gradient is over
    it (64 x 16 float32: 4 KiB) is left out of that pass, said once; the mini-batch spectra still cover it."""
    from functools import partialmethod

    from _support.lit import Classifier, fit, loader

    from gradwatch.callbacks.lightning import GradWatch
    from gradwatch.metrics.grad_spectrum import PerExampleGradSpectrum

    monkeypatch.setattr(PerExampleGradSpectrum, "__init__",
                        partialmethod(PerExampleGradSpectrum.__init__, max_bytes=2048))
    module = Classifier()
    torch.manual_seed(0)
    module.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 3))
    gw = GradWatch(spectra=SpectraConfig(every=1, per_example=True, per_example_every=1, per_example_size=4),
                   max_overhead=None)
    (trainer, _), messages = recorded(lambda: fit(tmp_path, [gw], max_steps=3, module=module, data=loader(32, 8)))
    assert trainer.global_step == 3
    s = read_series(tmp_path, ["grad_spectrum/"])
    big = "grad_spectrum/per_example/nuclear_norm/net.2.weight"
    assert len(s[big]) == 3 and all(math.isnan(v) for v in s[big].values())
    for tag in ("grad_spectrum/per_example/nuclear_norm/net.0.weight", "grad_spectrum/nuclear_norm/net.2.weight"):
        assert len(s[tag]) == 3 and all(math.isfinite(v) and v > 0 for v in s[tag].values()), tag
    (said,) = naming(messages, "net.2.weight")
    assert "memory cap" in said and "4,096 bytes" in said and "2,048-byte" in said
    assert not [m for m in messages if re.match(DIVISION, m) or "failed" in m], messages
