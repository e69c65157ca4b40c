"""Observe-only with every family on at every step, through Lightning and Hugging Face.

A model with dropout (so any extra draw from the torch RNG in a training forward would change the run) and
BatchNorm (so a probe pass in train mode would move its running statistics), a shuffled loader (the sampler
draws from the RNG) and a dataset that augments each example with torch, numpy and Python ``random`` noise
(so a probe draw that reads examples outside a preserved RNG would change every later batch). Spectra (with
per-example spectra), sharpness, signals, stability and example quality all observe and log at every step,
the overhead budget off. The run must end bitwise where the same run without gradwatch ends: weights,
buffers, optimizer state, the global torch, numpy and Python RNG states, and every batch it trained on.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from gradwatch import ExampleQualityConfig, SharpnessConfig, SignalsConfig, SpectraConfig, StabilityConfig, WatchConfig

STEPS = 5
N = 48


def every_family() -> WatchConfig:
    return WatchConfig(
        spectra=SpectraConfig(every=1, per_example=True, per_example_every=1, per_example_size=4),
        sharpness=SharpnessConfig(every=1, probe_size=16, max_iter=6, trace_samples=1),
        signals=SignalsConfig(every=1, burst=2, window=5, probe_size=16),
        stability=StabilityConfig(every=1, spike_every=1),
        example_quality=ExampleQualityConfig(every=1, size=4),
        max_overhead=None, on_error="warn", on_alert=lambda alert: None)  # tiny runs trip alerts: not the point


def network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 16),
                         nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 3))


class Augmented(Dataset):
    """Fixed examples plus fresh noise from all three global generators at every read."""

    def __init__(self, dicts: bool) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(N, 8, generator=g)
        self.y = (self.x @ torch.randn(8, 3, generator=g)).argmax(1)
        self.dicts = dicts

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> Any:
        noise = 0.01 * (torch.randn(8) + float(np.random.randn()) + random.random())
        x = self.x[i] + noise
        return {"x": x, "labels": self.y[i]} if self.dicts else (x, self.y[i])


def rng_states() -> tuple[Tensor, Any, Any]:
    return torch.get_rng_state(), np.random.get_state(), random.getstate()


def assert_same_rng(a: tuple, b: tuple) -> None:
    assert torch.equal(a[0], b[0]), "torch RNG state differs"
    assert a[1][0] == b[1][0] and np.array_equal(a[1][1], b[1][1]) and a[1][2:] == b[1][2:], "numpy RNG differs"
    assert a[2] == b[2], "Python random state differs"


def assert_same_tensors(a: Any, b: Any, what: str) -> None:
    """Bitwise equality of nested dicts/lists of tensors (optimizer state dicts, state dicts, batches)."""
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor) and a.dtype == b.dtype and torch.equal(a, b), what
    elif isinstance(a, dict):
        assert set(a) == set(b), (what, set(a) ^ set(b))
        for k in a:
            assert_same_tensors(a[k], b[k], f"{what}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for k, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{what}[{k}]")
    else:
        assert a == b, (what, a, b)


def clone(batch: Any) -> Any:
    if isinstance(batch, Tensor):
        return batch.detach().clone()
    if isinstance(batch, dict):
        return {k: clone(v) for k, v in batch.items()}
    return [clone(v) for v in batch]


# ---- Lightning ------------------------------------------------------------------------------------------


def lightning_run(root: Any, watch: bool) -> dict[str, Any]:
    import lightning as L
    import torch.nn.functional as F
    from _support.lit import fit

    from gradwatch.callbacks.lightning import GradWatch

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = network()

        def forward(self, x: Tensor) -> Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            x, y = batch
            loss = F.cross_entropy(self.net(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=0.05)

    class Batches(L.Callback):
        def __init__(self) -> None:
            self.seen: list[Any] = []

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            self.seen.append(clone(batch))

    batches = Batches()
    callbacks: list[Any] = [batches] + ([GradWatch(every_family())] if watch else [])
    data = DataLoader(Augmented(dicts=False), batch_size=8, shuffle=True)
    trainer, module = fit(root, callbacks, max_steps=STEPS, module=Module(), data=data)
    return dict(state=clone(module.state_dict()), optimizer=trainer.optimizers[0].state_dict(),
                rng=rng_states(), batches=batches.seen, logged=callbacks[-1].watcher.last_logged if watch else {})


# ---- Hugging Face ---------------------------------------------------------------------------------------


def hf_run(root: Any, watch: bool) -> dict[str, Any]:
    from _support.hf import training_args
    from _support.models import DictNet
    from transformers import Trainer

    from gradwatch.callbacks.transformers import GradWatch

    model = DictNet(net=network())
    seen: list[Any] = []
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(clone(kwargs)) if m.training else None,
                                    with_kwargs=True)
    gw = GradWatch(every_family()) if watch else None
    args = training_args(root, max_steps=STEPS, per_device_train_batch_size=8, report_to=[],
                         max_grad_norm=1.0)
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    t = Trainer(model=model, args=args, train_dataset=Augmented(dicts=True), callbacks=[gw] if gw else [])
    t.train()
    return dict(state=clone(model.state_dict()), optimizer=t.optimizer.state_dict(), rng=rng_states(),
                batches=seen, logged=gw.watcher.last_logged if gw else {})


HOSTS = {"lightning": lightning_run, "hf": hf_run}


@pytest.fixture(scope="module", params=list(HOSTS))
def runs(request, tmp_path_factory):
    run = HOSTS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    return request.param, run(root / "plain", False), run(root / "watched", True)


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_every_family_at_every_step_changes_nothing(runs):
    host, plain, watched = runs
    assert len(plain["batches"]) == STEPS
    assert_same_tensors(plain["batches"], watched["batches"], f"{host}: the batches trained on")
    assert_same_tensors(plain["state"], watched["state"], f"{host}: weights and buffers")
    assert any("running_mean" in k for k in plain["state"])  # BatchNorm's statistics are among them
    assert_same_tensors(plain["optimizer"], watched["optimizer"], f"{host}: optimizer state")
    assert_same_rng(plain["rng"], watched["rng"])
    # every family really ran at the last step (else the comparison proves nothing)
    logged = watched["logged"]
    for stem in ("grad_spectrum/nuclear_norm/", "grad_spectrum/per_example/", "sharpness/lambda_max",
                 "signals/", "stability/update_ratio/", "example_quality/"):
        assert any(tag.startswith(stem) for tag in logged), (host, stem, sorted(logged)[:20])
