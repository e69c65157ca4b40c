"""Edge-of-stability thresholds and Adam's preconditioner."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradwatch.functional.thresholds import (
    ThresholdInfo,
    adam_preconditioner,
    adam_threshold,
    gd_threshold,
    momentum_threshold,
    nesterov_threshold,
    optimizer_threshold,
)


def test_formulas() -> None:
    assert gd_threshold(0.05) == pytest.approx(40.0)
    assert momentum_threshold(0.1, 0.9) == pytest.approx(3.8 / 0.1)
    assert nesterov_threshold(0.1, 0.9) == pytest.approx(3.8 / (2.8 * 0.1))
    assert adam_threshold(1e-3, 0.9) == pytest.approx(38.0 / 1e-3)
    assert momentum_threshold(0.1, 0.0) == gd_threshold(0.1)
    assert gd_threshold(0.0) == math.inf


def _params() -> list[nn.Parameter]:
    return [nn.Parameter(torch.randn(3, 2)), nn.Parameter(torch.randn(3))]


@pytest.mark.parametrize(
    ("make", "kind", "threshold", "preconditioned"),
    [
        (lambda p: torch.optim.SGD(p, lr=0.1), "sgd", 20.0, False),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), "momentum", 38.0, False),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.5), "momentum", 76.0, False),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True), "nesterov", 3.8 / 0.28, False),
        (lambda p: torch.optim.Adam(p, lr=1e-3), "adam", 38_000.0, True),
        (lambda p: torch.optim.AdamW(p, lr=1e-3, betas=(0.8, 0.99)), "adam", 3.6 / 0.2e-3, True),
    ],
)
def test_optimizer_detection(make, kind: str, threshold: float, preconditioned: bool) -> None:
    info = optimizer_threshold(make(_params()))
    assert isinstance(info, ThresholdInfo)
    assert info.kind == kind and info.preconditioned is preconditioned
    assert info.threshold == pytest.approx(threshold) and info.group_thresholds == (info.threshold,)


def test_unknown_optimizer() -> None:
    info = optimizer_threshold(torch.optim.RMSprop(_params(), lr=0.01))
    assert info.kind == "unknown" and math.isnan(info.threshold) and not info.preconditioned
    assert adam_preconditioner(torch.optim.RMSprop(_params(), lr=0.01), _params()) is None


def test_multiple_groups_use_largest_lr() -> None:
    a, b = _params()
    opt = torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.01}], lr=0.05, momentum=0.9)
    info = optimizer_threshold(opt)
    assert info.group_thresholds == pytest.approx((38.0, 380.0))
    assert info.threshold == pytest.approx(38.0) and info.kind == "momentum"
    adam = torch.optim.Adam([{"params": [a], "lr": 1e-4}, {"params": [b], "lr": 1e-3}])
    assert optimizer_threshold(adam).threshold == pytest.approx(38_000.0)


def test_adam_preconditioner_states() -> None:
    p, q = _params()
    opt = torch.optim.Adam([p], lr=1e-2, amsgrad=True)
    assert adam_preconditioner(opt, [p]) is None
    for _ in range(2):
        opt.zero_grad()
        (p**2).sum().backward()
        opt.step()
    state = opt.state[p]
    expected = (1 - 0.9**2) * ((state["max_exp_avg_sq"] / (1 - 0.999**2)).sqrt() + 1e-8)
    precond = adam_preconditioner(opt, [p])
    assert precond is not None and torch.allclose(precond, expected.reshape(-1))
    assert adam_preconditioner(opt, [p, q]) is None  # q is not managed by the optimizer
