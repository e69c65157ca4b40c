"""The gradient noise scale B_simple (``stability/noise_scale``) and the engine capability behind it
(``"micro_batches"``: gradient hooks inside the user's backward, on due steps only).

- exact: the engine's per-micro-batch and accumulated norms against float64 gradients computed by hand, with
  and without a loss scale (B_simple does not depend on it), and the per-rank route against two simulated ranks;
- planted: linear regression with frozen weights, where B_true = tr(Sigma) / |G|^2 over the whole dataset is
  known in closed form, trained through Lightning (``accumulate_grad_batches=4``) and the HF Trainer
  (``gradient_accumulation_steps=4``), read back from TensorBoard;
- quiet where there is one batch size; said once when asked for; observe-only; hooks gone after the step.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from _support import regression
from _support.tensorboard import read_series
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from gradwatch.config import WatchConfig
from gradwatch.engine import Watcher
from gradwatch.engine.context import batch_gradient_norms
from gradwatch.engine.hooks import MicroBatchGradients, batch_examples
from gradwatch.functional.stability import noise_scale_estimates
from gradwatch.metrics.stability import StabilityConfig

ONLY_NOISE = dict(attention=False, logits=False, activations=False, update_ratio=False, adam=False, spikes=False)
N, D_IN, D_OUT = 4096, 8, 3


def config(every: int = 1, noise_scale: bool | None = True, **general: Any) -> WatchConfig:
    return WatchConfig(spectra=False, stability=StabilityConfig(every=every, noise_scale=noise_scale, **ONLY_NOISE),
                       max_overhead=None, on_error="raise", **general)


def regression_data(seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D_IN, generator=g)
    w = torch.randn(D_OUT, D_IN, generator=g)
    y = x @ w.T + 0.5 * torch.randn(N, D_OUT, generator=g)
    return x, y


def linear() -> nn.Linear:
    return regression.linear(D_IN, D_OUT)


def b_true(weight: Tensor, x: Tensor, y: Tensor) -> float:
    """tr(Sigma) / |G|^2 of the per-example gradients of mean((W x - y)^2) over the dataset, in float64:
    each is (2 / D_OUT) r x^T with r = W x - y."""
    w, x, y = weight.detach().double(), x.double(), y.double()
    g = ((2.0 / D_OUT) * (x @ w.T - y))[:, :, None] * x[:, None, :]
    g = g.reshape(len(x), -1)
    mean = g.mean(0)
    trace = (g - mean).square().sum(1).mean()
    return float(trace / mean.square().sum())


def hand_loop(model: nn.Module, batches: list[list[tuple[Tensor, Tensor]]], watcher: Watcher,
              loss_scale: float = 1.0) -> list[dict[str, float]]:
    """A hand-written accumulation loop driving the engine's events (SGD at lr 0: the weights stay put)."""
    logged = []
    for step, micro in enumerate(batches, start=1):
        watcher.on_step_start(step)
        for xb, yb in micro:
            watcher.on_micro_batch((xb, yb))
            (F.mse_loss(model(xb), yb) * loss_scale / len(micro)).backward()
        watcher.on_gradients_ready(step, grad_scale=1.0 / loss_scale, loss_scale=loss_scale)
        logged.append(watcher.on_step_end(step, loss=0.0))
        model.zero_grad(set_to_none=True)
    return logged


def explicit_b_simple(model: nn.Module, micro: list[tuple[Tensor, Tensor]]) -> float:
    """The first estimate from float64 gradients computed one micro-batch at a time."""
    w = model.weight.detach().double().requires_grad_(True)
    grads = [torch.autograd.grad(F.mse_loss(xb.double() @ w.T, yb.double()), w)[0] for xb, yb in micro]
    small = torch.stack([g.square().sum() for g in grads]).mean()
    big = torch.stack(grads).mean(0).square().sum()
    b = len(micro[0][0])
    g2, trace = noise_scale_estimates(small, b, big, b * len(micro))
    return float(trace / g2)


@pytest.mark.parametrize("loss_scale", [1.0, 1024.0])
def test_micro_batch_norms_equal_hand_computed_gradients(loss_scale: float) -> None:
    x, y = regression_data()
    model = linear()
    micro = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 32, 8)]
    watcher = Watcher(config())
    watcher.attach(model)
    logged = hand_loop(model, [micro], watcher, loss_scale)
    want = explicit_b_simple(model, micro)
    assert logged[0]["stability/noise_scale"] == pytest.approx(want, rel=1e-5)
    assert logged[0]["stability/noise_scale/examples"] == 32
    assert not watcher.micro_batches.armed and not watcher.micro_batches._handles  # hooks gone after the step
    assert all(not p._backward_hooks for p in model.parameters())


class TwoRanks:
    """Rank 0 of a simulated two-rank group: every all-reduce adds (or takes the min with) rank 1's vector."""

    distributed = True
    rank, world_size = 0, 2

    def __init__(self, other: Tensor) -> None:
        self.other = other

    def all_reduce(self, tensor: Tensor, op: str = "sum") -> Tensor:
        other = self.other if tensor.numel() == self.other.numel() else self.other[2:3]
        return tensor + other if op == "sum" else torch.minimum(tensor, other)


def test_per_rank_route_with_one_micro_batch() -> None:
    x, y = regression_data()
    model = linear()
    watcher = Watcher(config())
    watcher.attach(model)
    assert watcher.layers is not None
    scale = 512.0  # the fp16 loss scale the backward carried: divided out of the per-rank norms
    local_sums = []
    for lo in (0, 16):  # rank 0's batch, then rank 1's, each through the real hooks
        tap = MicroBatchGradients()
        tap.arm(list(watcher.layers.params.values()))
        tap.micro_batch(16)
        (F.mse_loss(model(x[lo:lo + 16]), y[lo:lo + 16]) * scale).backward()
        tap.disarm()
        local_sums.append((tap, model.weight.grad.clone()))
        model.zero_grad(set_to_none=True)
    (tap0, g0), (tap1, g1) = local_sums
    model.weight.grad = (g0 + g1) / 2  # what DDP's all-reduce leaves (still times the loss scale)
    small1, total1 = tap1.sums()
    other = torch.tensor([float(small1), float(total1), 1.0, 16.0, 1.0], dtype=torch.float64)
    got, why = batch_gradient_norms(tap0, TwoRanks(other), watcher.layers, 1.0 / scale, scale)
    assert got is not None, why
    assert got.source == "ranks" and got.b_small == 16 and got.b_big == 32
    w = model.weight.detach().double().requires_grad_(True)
    grads = [torch.autograd.grad(F.mse_loss(x[lo:lo + 16].double() @ w.T, y[lo:lo + 16].double()), w)[0]
             for lo in (0, 16)]
    assert float(got.sq_norm_small) == pytest.approx(float(torch.stack([g.square().sum() for g in grads]).mean()),
                                                     rel=1e-5)
    assert float(got.sq_norm_big) == pytest.approx(float(((grads[0] + grads[1]) / 2).square().sum()), rel=1e-5)


def test_one_batch_size_is_quiet_by_default_and_said_once_when_asked_for() -> None:
    x, y = regression_data()
    steps = [[(x[i:i + 16], y[i:i + 16])] for i in range(0, 48, 16)]  # one micro-batch per step, one process
    for asked, says in ((None, False), (True, True)):
        model = linear()
        watcher = Watcher(config(noise_scale=asked))
        watcher.attach(model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            logged = hand_loop(model, steps, watcher)
        said = [w for w in caught if "noise_scale is not logged" in str(w.message)]
        assert len(said) == (1 if says else 0)
        if says:
            assert "gradient accumulation" in str(said[0].message)
        assert not any("stability/noise_scale" in row for row in logged)
        noise = next(d for d in watcher.diagnostics if type(d).__name__ == "NoiseScale")
        assert noise.inactive is not says  # the default goes quiet: no more hooks on later due steps


def test_batch_examples_reads_the_leading_size() -> None:
    assert batch_examples((torch.zeros(5, 3), torch.zeros(5))) == 5
    assert batch_examples({"input_ids": torch.zeros(7, 4, dtype=torch.long), "labels": torch.zeros(7)}) == 7
    assert batch_examples([{"meta": "x"}, torch.zeros(3)]) == 3
    assert batch_examples({"text": "no tensors"}) is None


# ---- through the hosts ----------------------------------------------------------------------------


def lightning_run(root: str, lr: float, steps: int, with_gradwatch: bool = True) -> tuple[Any, Any]:
    from lightning.pytorch.loggers import TensorBoardLogger

    from gradwatch.callbacks.lightning import GradWatch

    L.seed_everything(0, verbose=False)
    x, y = regression_data()
    module = regression.LitRegression(linear(), lr)
    callbacks = [GradWatch(config(noise_scale=None))] if with_gradwatch else []
    trainer = L.Trainer(max_steps=steps, accumulate_grad_batches=4, accelerator="cpu", devices=1, deterministic=True,
                        logger=TensorBoardLogger(root, name="tb"), callbacks=callbacks, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=50)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    trainer.fit(module, loader)
    return module, trainer


def test_lightning_accumulation_estimates_the_planted_noise_scale(tmp_path: Any) -> None:
    module, _ = lightning_run(str(tmp_path), lr=0.0, steps=200)
    x, y = regression_data()
    want = b_true(module.net.weight, x, y)
    series = read_series(tmp_path, ("stability/noise_scale",))
    got = series["stability/noise_scale"]
    assert sorted(got) == list(range(1, 201))
    assert series["stability/noise_scale/examples"][200] == 64
    assert got[200] == pytest.approx(want, rel=0.2), (got[200], want)


def test_lightning_observe_only_with_accumulation_hooks(tmp_path: Any) -> None:
    with_gw, _ = lightning_run(str(tmp_path / "a"), lr=0.05, steps=12)
    without, _ = lightning_run(str(tmp_path / "b"), lr=0.05, steps=12, with_gradwatch=False)
    assert torch.equal(with_gw.net.weight, without.net.weight)
    assert not with_gw.net.weight._backward_hooks


def test_hf_accumulation_estimates_the_planted_noise_scale(tmp_path: Any) -> None:
    pytest.importorskip("transformers")
    from transformers import Trainer, TrainingArguments

    from gradwatch.callbacks.transformers import GradWatch

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, save_strategy="no", report_to=["tensorboard"],
                             disable_tqdm=True, per_device_train_batch_size=16, gradient_accumulation_steps=4,
                             max_steps=200, logging_steps=50, seed=0, data_seed=0, learning_rate=0.0,
                             lr_scheduler_type="constant", optim="sgd", remove_unused_columns=False,
                             dataloader_num_workers=0)
    model = regression.HFRegression(linear())
    Trainer(model=model, args=args, train_dataset=regression.DictPairs(*regression_data()),
            callbacks=[GradWatch(config(noise_scale=None))]).train()
    x, y = regression_data()
    want = b_true(model.net.weight, x, y)
    got = read_series(tmp_path, ("stability/noise_scale",))["stability/noise_scale"]
    assert len(got) == 200
    assert got[max(got)] == pytest.approx(want, rel=0.2), (got[max(got)], want)
    assert math.isfinite(want)


# ---- two ranks ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ddp_two_ranks_equal_the_estimate_from_each_ranks_batches(tmp_path: Any) -> None:
    """Both routes under real DDP (2 CPU processes): every logged step equals the EMA of the estimates computed
    in float64 from the micro-batches each rank trained on (saved by the worker)."""
    import os

    from _support.launch import run_worker

    from gradwatch.functional.stability import NoiseScaleEstimator

    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    worker = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "callbacks",
                          "_noise_scale_ddp_worker.py")
    run_worker(worker, str(tmp_path), timeout=180)
    w = linear().weight.detach().double().requires_grad_(True)

    def grad(batch: list[Tensor]) -> Tensor:
        xb, yb = batch
        return torch.autograd.grad(F.mse_loss(xb.double() @ w.T, yb.double()), w)[0]

    for run, micro in (("ranks", 1), ("micro", 2)):
        per_rank = [torch.load(tmp_path / f"{run}_rank{r}.pt", weights_only=False) for r in (0, 1)]
        logged = read_series(tmp_path / run, ("stability/noise_scale",))
        est = NoiseScaleEstimator(0.95)
        for step in range(1, 7):
            steps = [rank[(step - 1) * micro:step * micro] for rank in per_rank]  # [rank][micro-batch]
            grads = [[grad(b) for b in rank] for rank in steps]
            if micro == 1:  # small: one rank's gradient; big: their mean
                small = torch.stack([g[0].square().sum() for g in grads]).mean()
                big = ((grads[0][0] + grads[1][0]) / 2).square().sum()
                est.update(small, 16, big, 32)
            else:  # small: one micro-batch; big: a rank's accumulated gradient; averaged over the ranks
                small = torch.stack([g.square().sum() for rank in grads for g in rank]).mean()
                big = torch.stack([((rank[0] + rank[1]) / 2).square().sum() for rank in grads]).mean()
                est.update(small, 16, big, 32)
            assert logged["stability/noise_scale"][step] == pytest.approx(float(est.value), rel=1e-4), (run, step)
        assert logged["stability/noise_scale/examples"][6] == 32
