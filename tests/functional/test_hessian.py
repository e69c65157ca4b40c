"""Hessian operator and matrix-free estimators against dense float64 references."""

from __future__ import annotations

import copy
import math

import pytest
import scipy.linalg
import torch
from _support.references import dense_hessian_of_forward
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from gradwatch.functional.hessian import (
    HessianOperator,
    flatten,
    hutchinson_trace,
    hutchpp_trace,
    lanczos_top_eigenvalues,
    power_iteration,
    unflatten,
)
from gradwatch.functional.thresholds import adam_preconditioner


def _dense_hessian(model: nn.Module, loss_of_output, x: torch.Tensor, *, func: bool = True) -> torch.Tensor:
    """float64 Hessian of ``loss_of_output(model(x))`` w.r.t. all parameters, on a float64 copy of ``model``
    (``func=False``: torch.autograd's, checked against central differences; see ``dense_hessian``)."""
    return dense_hessian_of_forward(copy.deepcopy(model).double(), lambda forward: loss_of_output(forward(x.double())),
                                    func=func, check=not func)


def _mlp(dtype: torch.dtype = torch.float64, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)
    x = torch.randn(20, 5, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randn(20, 3, generator=g, dtype=torch.float64).to(dtype)
    return model, x, y


def _random_symmetric(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = eigenvalues.numel()
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q @ torch.diag(eigenvalues.double()) @ q.T


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def test_flatten_roundtrip() -> None:
    ts = [torch.randn(2, 3), torch.randn(4)]
    back = unflatten(flatten(ts), ts)
    assert all(torch.equal(a, b) for a, b in zip(ts, back))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lanczos_mlp_matches_dense(dtype: torch.dtype) -> None:
    model, x, y = _mlp(dtype)
    dense = _dense_hessian(model, lambda out: nn.functional.mse_loss(out, y.double()), x)
    params = list(model.parameters())
    with HessianOperator(lambda: nn.functional.mse_loss(model(x), y), params) as op:
        assert op.dim == dense.shape[0] == 75
        v = torch.randn(op.dim, dtype=torch.float64)
        assert torch.allclose(op.matvec(v).double(), dense @ v, rtol=1e-4 if dtype == torch.float32 else 1e-10,
                              atol=1e-5 if dtype == torch.float32 else 1e-12)
        res = lanczos_top_eigenvalues(op, op.dim, k=1, tol=1e-6 if dtype == torch.float64 else 1e-4)
    lam = torch.linalg.eigvalsh(dense)
    assert res.converged
    assert _rel(float(res.eigenvalues[0]), float(lam[-1])) < 1e-4
    assert res.eigenvalues.dtype == torch.float64 and res.eigenvectors.shape == (75, 1)
    assert all(p.grad is None for p in params)


def test_lanczos_transformer_layer_matches_dense() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0,
                                       batch_first=True, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 8, generator=g, dtype=torch.float64)
    target = torch.randn(3, 4, 8, generator=g, dtype=torch.float64)
    loss_of_output = lambda out: nn.functional.mse_loss(out, target)  # noqa: E731
    with sdpa_kernel(SDPBackend.MATH):
        dense = _dense_hessian(layer, loss_of_output, x, func=False)
        op = HessianOperator(lambda: loss_of_output(layer(x)), list(layer.parameters()))
    res = lanczos_top_eigenvalues(op, op.dim, k=1, tol=1e-6)
    op.close()
    lam = torch.linalg.eigvalsh(dense)
    assert res.converged and op.dim == 600
    assert _rel(float(res.eigenvalues[0]), float(lam[-1])) < 1e-4
    assert all(p.grad is None for p in layer.parameters())


def test_top_k_match_dense_and_residuals_are_true() -> None:
    model, x, y = _mlp()
    dense = _dense_hessian(model, lambda out: nn.functional.mse_loss(out, y), x)
    with HessianOperator(lambda: nn.functional.mse_loss(model(x), y), list(model.parameters())) as op:
        res = lanczos_top_eigenvalues(op, op.dim, k=3, tol=1e-8, verify=True)
    lam = torch.linalg.eigvalsh(dense).flip(0)[:3]
    assert res.converged
    assert torch.allclose(res.eigenvalues, lam, rtol=1e-8)
    true_res = (dense @ res.eigenvectors - res.eigenvectors * res.eigenvalues).norm(dim=0)
    assert torch.allclose(res.residuals, true_res, atol=1e-10)
    assert (res.residuals <= 1e-8 * res.eigenvalues.abs()).all()


def test_hvp_never_writes_grad_and_close_frees() -> None:
    model, x, y = _mlp()
    params = list(model.parameters())
    with HessianOperator(lambda: nn.functional.mse_loss(model(x), y), params) as op:
        lanczos_top_eigenvalues(op, op.dim, k=2)
        hutchinson_trace(op, op.dim, num_samples=3)
        assert op.num_matvecs > 3
    assert all(p.grad is None for p in params)
    with pytest.raises(RuntimeError, match="closed"):
        op.matvec(torch.zeros(op.dim))
    # Existing gradients are left bitwise untouched.
    for p in params:
        p.grad = torch.full_like(p, 0.5)
    HessianOperator(lambda: nn.functional.mse_loss(model(x), y), params).matvec(torch.ones(75))
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in params)


def test_algebraic_vs_magnitude_with_large_negative_eigenvalue() -> None:
    eig = torch.tensor([-10.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.0, -1.0, -2.0, -3.0])
    a = _random_symmetric(eig)
    lanczos = lanczos_top_eigenvalues(lambda v: a @ v, 10, k=1, tol=1e-10)
    power = power_iteration(lambda v: a @ v, 10, tol=1e-10, max_iter=500)
    assert lanczos.converged and abs(float(lanczos.eigenvalues[0]) - 4.0) < 1e-9
    assert power.converged and abs(power.value + 10.0) < 1e-6


def test_least_squares_closed_form() -> None:
    g = torch.Generator().manual_seed(0)
    n, d = 60, 40
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.logspace(0, -1.5, d, dtype=torch.float64)
    y = torch.randn(n, generator=g, dtype=torch.float64)
    w = torch.zeros(d, dtype=torch.float64, requires_grad=True)
    hessian = 2.0 * x.T @ x / n
    trace = float(hessian.trace())
    with HessianOperator(lambda: ((x @ w - y) ** 2).mean(), [w]) as op:
        top = lanczos_top_eigenvalues(op, d, tol=1e-8)
        assert _rel(float(top.eigenvalues[0]), float(torch.linalg.eigvalsh(hessian)[-1])) < 1e-10
        samples = 400
        hutch = hutchinson_trace(op, d, num_samples=samples, generator=torch.Generator().manual_seed(1))
        # Rademacher variance: 2 * sum_{i != j} H_ij^2 per probe.
        sigma = math.sqrt(2.0 * float((hessian**2).sum() - (hessian.diag() ** 2).sum()) / samples)
        assert abs(hutch.estimate - trace) < 4 * sigma
        assert 0.7 * sigma < hutch.stderr < 1.3 * sigma and hutch.num_matvecs == samples
        pp = hutchpp_trace(op, d, num_matvecs=60, generator=torch.Generator().manual_seed(2))
        assert pp.num_matvecs == 60 and abs(pp.estimate - trace) < 5 * pp.stderr
        assert pp.stderr < sigma  # 60 products beat 400 here: the spectrum decays
    one = hutchinson_trace(lambda v: hessian @ v, d, num_samples=1)
    assert math.isnan(one.stderr)


def test_hutchpp_exact_when_sketch_spans_space() -> None:
    a = _random_symmetric(torch.linspace(-1.0, 3.0, 10))
    est = hutchpp_trace(lambda v: a @ v, 10, num_matvecs=30)
    assert abs(est.estimate - float(a.trace())) < 1e-10 and est.num_matvecs == 20


def test_warm_start_needs_fewer_matvecs() -> None:
    dim = 300
    eig = torch.cat([torch.tensor([1.0]), torch.linspace(0.95, 0.0, dim - 1)])
    a = _random_symmetric(eig, seed=3)
    e = _random_symmetric(torch.randn(dim, generator=torch.Generator().manual_seed(4)), seed=5)
    b = a + 1e-4 * e
    previous = lanczos_top_eigenvalues(lambda v: a @ v, dim, tol=1e-8)
    cold = lanczos_top_eigenvalues(lambda v: b @ v, dim, tol=1e-8)
    warm = lanczos_top_eigenvalues(lambda v: b @ v, dim, tol=1e-8, init=previous.eigenvectors)
    assert cold.converged and warm.converged
    assert abs(float(warm.eigenvalues[0] - cold.eigenvalues[0])) < 1e-10
    assert warm.num_matvecs < cold.num_matvecs


def test_breakdown_restarts_and_short_runs_report_non_convergence() -> None:
    a = torch.diag(torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0], dtype=torch.float64))
    # Start in an eigenvector: invariant subspace after one step, must restart to find k = 2.
    res = lanczos_top_eigenvalues(lambda v: a @ v, 5, k=2, init=torch.eye(5, dtype=torch.float64)[2], tol=1e-10)
    assert res.converged and torch.allclose(res.eigenvalues, torch.tensor([5.0, 4.0], dtype=torch.float64))
    low_rank = torch.outer(torch.ones(50), torch.ones(50)).double()
    res = lanczos_top_eigenvalues(lambda v: low_rank @ v, 50)
    assert res.converged and res.num_matvecs <= 2 and abs(float(res.eigenvalues[0]) - 50.0) < 1e-10
    big = _random_symmetric(torch.linspace(0.0, 1.0, 200))
    short = lanczos_top_eigenvalues(lambda v: big @ v, 200, max_iter=3)
    assert not short.converged and short.num_matvecs == 3 and float(short.residuals[0]) > 1e-4
    with pytest.raises(ValueError, match="k must be"):
        lanczos_top_eigenvalues(lambda v: v, 5, k=6)


def test_preconditioned_operator_matches_dense() -> None:
    model, x, y = _mlp()
    dense = _dense_hessian(model, lambda out: nn.functional.mse_loss(out, y), x)
    diag = torch.rand(75, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 1.5 + 0.5
    scaled = dense / diag.sqrt()[:, None] / diag.sqrt()[None, :]
    with HessianOperator(lambda: nn.functional.mse_loss(model(x), y), list(model.parameters()), diag=diag) as op:
        v = torch.randn(75, dtype=torch.float64)
        assert torch.allclose(op.matvec(v), scaled @ v, rtol=1e-10, atol=1e-12)
        res = lanczos_top_eigenvalues(op, 75, tol=1e-8)
    assert _rel(float(res.eigenvalues[0]), float(torch.linalg.eigvalsh(scaled)[-1])) < 1e-8
    with pytest.raises(ValueError, match="positive"):
        HessianOperator(lambda: nn.functional.mse_loss(model(x), y), list(model.parameters()), diag=-diag)


def test_adam_preconditioned_sharpness() -> None:
    model, x, y = _mlp()
    params = list(model.parameters())
    beta1, beta2, eps, lr = 0.9, 0.999, 1e-8, 1e-2
    opt = torch.optim.Adam(params, lr=lr, betas=(beta1, beta2), eps=eps)
    assert adam_preconditioner(opt, params) is None  # no state before the first step
    v = [torch.zeros_like(p) for p in params]
    for _ in range(3):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        v = [beta2 * vi + (1 - beta2) * p.grad**2 for vi, p in zip(v, params)]
        opt.step()
    t = 3
    by_hand = torch.cat([((1 - beta1**t) * ((vi / (1 - beta2**t)).sqrt() + eps)).reshape(-1) for vi in v])
    precond = adam_preconditioner(opt, params)
    assert precond is not None and torch.allclose(precond, by_hand, rtol=1e-10, atol=0)
    opt.zero_grad(set_to_none=True)

    dense = _dense_hessian(model, lambda out: nn.functional.mse_loss(out, y), x)
    with HessianOperator(lambda: nn.functional.mse_loss(model(x), y), params, diag=precond) as op:
        res = lanczos_top_eigenvalues(op, op.dim, tol=1e-8)
    # lambda_1(P^-1 H) from the generalized problem H u = lambda P u, independently of P^-1/2 H P^-1/2.
    lam = scipy.linalg.eigh(dense.numpy(), torch.diag(by_hand).numpy(), eigvals_only=True)[-1]
    assert res.converged and _rel(float(res.eigenvalues[0]), float(lam)) < 1e-4
    assert all(p.grad is None for p in params)
