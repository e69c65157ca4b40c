"""The Sharpness diagnostic driven through a Watcher on tiny models, against dense float64 Hessians."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from _support.references import dense_hessian, top_eigenvalue
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import TensorDataset

from gradwatch import SharpnessConfig, WatchConfig
from gradwatch.engine.probe import ProbeSet
from gradwatch.engine.watcher import Watcher
from gradwatch.functional.thresholds import adam_preconditioner


def sum_sq_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """0.5 * SUM of squares over outputs, mean over examples (the edge-of-stability MSE)."""
    x, y = batch
    return 0.5 * (model(x) - y).square().sum(1).mean()


def watcher_for(model: nn.Module, dataset: TensorDataset, *, batch_size: int, training_loss=sum_sq_loss,
                **sharp) -> Watcher:
    sharp = {"every": 1, "probe_size": len(dataset), "max_iter": 200, "tol": 1e-8, **sharp}
    w = Watcher(WatchConfig(spectra=False, sharpness=SharpnessConfig(**sharp), max_overhead=None, on_error="raise"))
    w.attach(model, probe_source=lambda size: ProbeSet.from_dataset(
        dataset, size, device=torch.device("cpu"), training_loss_fn=training_loss, batch_size=batch_size))
    return w


def mlp(seed: int = 0, dims=(4, 6, 3)) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).double()


def data(n: int = 16, d_in: int = 4, d_out: int = 3, seed: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, d_in, generator=g, dtype=torch.float64),
                         torch.randn(n, d_out, generator=g, dtype=torch.float64))


def test_lambda_max_matches_dense_hessian_and_sgd_threshold() -> None:
    model, ds = mlp(), data()
    x, y = ds.tensors
    h = dense_hessian(model, lambda p: 0.5 * (functional_call(model, p, (x,)) - y).square().sum(1).mean())
    exact = top_eigenvalue(h)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = watcher_for(model, ds, batch_size=len(ds)).run_step(1, optimizer=opt)
    assert out["sharpness/lambda_max"] == pytest.approx(exact, rel=1e-4)
    assert exact > 0.1  # a non-trivial value
    assert out["sharpness/threshold"] == pytest.approx(2 / 0.1)
    assert out["sharpness/ratio"] == pytest.approx(out["sharpness/lambda_max"] / (2 / 0.1), rel=1e-12)
    assert out["sharpness/converged"] == 1.0
    assert 1 <= out["sharpness/hvps"] <= 200


def test_linear_least_squares_closed_form() -> None:
    ds = data(n=32, d_in=5, d_out=1, seed=3)
    x, y = ds.tensors
    model = nn.Linear(5, 1, bias=False).double()

    def mse(m: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        return (m(batch[0]) - batch[1]).square().mean()

    exact = top_eigenvalue(2 * x.T @ x / len(x))
    out = watcher_for(model, ds, batch_size=len(ds), training_loss=mse).run_step(
        1, optimizer=torch.optim.SGD(model.parameters(), lr=0.01))
    assert out["sharpness/lambda_max"] == pytest.approx(exact, rel=1e-6)
    assert out["sharpness/converged"] == 1.0


def test_summed_loss_keeps_training_batch_scale() -> None:
    """Training loss 0.5 * SUM of squares over a batch of 8: the Hessian is that of the summed loss on a
    training-size batch (averaged over the probe's batches), not of a per-example mean."""
    model, ds = mlp(seed=2), data(n=24, seed=4)
    x, y = ds.tensors

    def summed(m: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        return 0.5 * (m(batch[0]) - batch[1]).square().sum()

    def loss_of(p: dict) -> Tensor:  # mean over the three probe batches of the summed loss
        return sum(0.5 * (functional_call(model, p, (x[i:i + 8],)) - y[i:i + 8]).square().sum()
                   for i in range(0, 24, 8)) / 3

    exact = top_eigenvalue(dense_hessian(model, loss_of))
    per_example_mean = exact / 8
    for opt, threshold in ((torch.optim.SGD(model.parameters(), lr=0.05), 2 / 0.05),
                           (torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), (2 + 2 * 0.9) / 0.05)):
        out = watcher_for(model, ds, batch_size=8, training_loss=summed).run_step(1, optimizer=opt)
        assert out["sharpness/lambda_max"] == pytest.approx(exact, rel=1e-4)
        assert abs(out["sharpness/lambda_max"] - per_example_mean) > 1.0 * per_example_mean
        assert out["sharpness/threshold"] == pytest.approx(threshold, rel=1e-12)
        assert out["sharpness/ratio"] == pytest.approx(exact / threshold, rel=1e-4)


def test_adam_preconditioned_sharpness() -> None:
    model, ds = mlp(seed=5), data(seed=6)
    x, y = ds.tensors
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.999))
    for _ in range(3):  # optimizer state at t = 3
        opt.zero_grad()
        sum_sq_loss(model, (x, y)).backward()
        opt.step()
    opt.zero_grad()
    h = dense_hessian(model, lambda p: 0.5 * (functional_call(model, p, (x,)) - y).square().sum(1).mean())
    p = adam_preconditioner(opt, list(model.parameters())).double()
    # P from the state by hand: (1 - b1^t)(sqrt(v / (1 - b2^t)) + eps)
    v = torch.cat([opt.state[q]["exp_avg_sq"].reshape(-1) for q in model.parameters()]).double()
    assert torch.allclose(p, (1 - 0.9**3) * ((v / (1 - 0.999**3)).sqrt() + 1e-8))
    s = p.rsqrt()
    exact_pre = top_eigenvalue(s[:, None] * h * s[None, :])
    out = watcher_for(model, ds, batch_size=len(ds)).run_step(4, optimizer=opt)
    assert out["sharpness/lambda_max"] == pytest.approx(top_eigenvalue(h), rel=1e-4)
    assert out["sharpness/lambda_max_precond"] == pytest.approx(exact_pre, rel=1e-4)
    assert exact_pre > 10 * top_eigenvalue(h)  # the preconditioner matters here
    assert out["sharpness/threshold"] == pytest.approx(38 / 1e-3, rel=1e-12)
    assert out["sharpness/ratio"] == pytest.approx(exact_pre / (38 / 1e-3), rel=1e-4)
    assert out["sharpness/converged"] == 1.0


def test_adam_before_first_step_has_no_ratio() -> None:
    model, ds = mlp(), data()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    out = watcher_for(model, ds, batch_size=len(ds)).run_step(1, optimizer=opt)
    assert "sharpness/lambda_max_precond" not in out
    assert math.isfinite(out["sharpness/lambda_max"])
    assert out["sharpness/threshold"] == pytest.approx(38 / 1e-3)


def test_unknown_optimizer_warns_once_without_threshold() -> None:
    model, ds = mlp(), data()
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-3)
    w = watcher_for(model, ds, batch_size=len(ds))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [w.run_step(step, optimizer=opt) for step in (1, 2, 3)]
    said = [c for c in caught if "no stability threshold" in str(c.message)]
    assert len(said) == 1 and "RMSprop" in str(said[0].message)
    for out in outs:
        assert "sharpness/threshold" not in out and "sharpness/ratio" not in out
        assert out["sharpness/lambda_max"] > 0


def test_warm_start_uses_fewer_hvps() -> None:
    model = mlp(seed=7, dims=(4, 16, 16, 3))
    ds = data(n=64, seed=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    w = watcher_for(model, ds, batch_size=len(ds), tol=1e-4)
    first = w.run_step(1, optimizer=opt)
    second = w.run_step(2, optimizer=opt)  # same weights: warm start from the converged vector
    assert first["sharpness/converged"] == second["sharpness/converged"] == 1.0
    assert second["sharpness/lambda_max"] == pytest.approx(first["sharpness/lambda_max"], rel=1e-6)
    assert second["sharpness/hvps"] < first["sharpness/hvps"]
    assert second["sharpness/hvps"] <= 3
    cold = watcher_for(model, ds, batch_size=len(ds), tol=1e-4, warm_start=False)
    cold.run_step(1, optimizer=opt)
    assert cold.run_step(2, optimizer=opt)["sharpness/hvps"] == first["sharpness/hvps"]


def test_short_lanczos_reports_not_converged() -> None:
    model = mlp(seed=7, dims=(4, 16, 16, 3))
    out = watcher_for(model, data(n=64, seed=8), batch_size=64, max_iter=2, tol=1e-8).run_step(
        1, optimizer=torch.optim.SGD(model.parameters(), lr=0.01))
    assert out["sharpness/converged"] == 0.0
    assert out["sharpness/hvps"] == 2.0


def test_observe_only() -> None:
    model, ds = mlp(), data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    model.train()
    watcher_for(model, ds, batch_size=len(ds)).run_step(1, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())


def test_own_probe_size_when_another_family_draws_a_larger_probe() -> None:
    """Signals asks for 48 examples, sharpness for 8: the shared draw holds 48, and the Hessian is that of the 8
    drawn first (``ProbeSet.first``), not of all 48 (which cost six times the Hessian-vector work)."""
    from gradwatch import SignalsConfig

    model, ds = mlp(seed=7), data(n=64, seed=8)
    x, y = ds.tensors
    probes: list[ProbeSet] = []

    def source(size: int) -> ProbeSet:
        probes.append(ProbeSet.from_dataset(ds, size, device=torch.device("cpu"), training_loss_fn=sum_sq_loss,
                                            batch_size=8))
        return probes[-1]

    w = Watcher(WatchConfig(spectra=False, signals=SignalsConfig(probe_size=48, every=1),
                            sharpness=SharpnessConfig(every=1, probe_size=8, max_iter=200, tol=1e-8),
                            max_overhead=None, on_error="raise"))
    w.attach(model, probe_source=source)
    out = w.run_step(1, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    assert [len(p) for p in probes] == [48]
    own = probes[0].first(8).indices
    assert len(own) == 8 and set(own) < set(probes[0].indices)

    def loss_on(rows: list[int]):
        return lambda p: 0.5 * (functional_call(model, p, (x[rows],)) - y[rows]).square().sum(1).mean()

    exact = top_eigenvalue(dense_hessian(model, loss_on(own)))
    assert out["sharpness/lambda_max"] == pytest.approx(exact, rel=1e-4)
    everything = top_eigenvalue(dense_hessian(model, loss_on(probes[0].indices)))
    assert abs(everything - exact) > 1e-2 * exact  # the two probes tell apart


def test_first_of_a_draw_is_the_seeded_sample_of_that_size() -> None:
    """``first(n)`` holds the n examples drawn first (a uniform sample, nested in every larger one), in dataset
    order; a size at or above the draw's is the draw itself."""
    ds = data(n=100, seed=9)
    probe = ProbeSet.from_dataset(ds, 40, seed=3, device=torch.device("cpu"))
    order = torch.randperm(100, generator=torch.Generator().manual_seed(3)).tolist()
    assert probe.indices == sorted(order[:40])
    for n in (1, 7, 25):
        sub = probe.first(n)
        assert sub.indices == sorted(order[:n])
        assert sub is probe.first(n)
        assert all(torch.equal(a[0], ds[i][0]) for a, i in zip(sub.examples, sub.indices))
    assert set(probe.first(7).indices) < set(probe.first(25).indices)
    assert probe.first(40) is probe and probe.first(500) is probe
    assert ProbeSet.from_dataset(ds, 10, seed=3, device=torch.device("cpu")).indices == probe.first(10).indices
