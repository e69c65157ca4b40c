"""Edge-of-stability thresholds for the sharpness of common optimizers.

On a quadratic with curvature ``lambda`` an optimizer is stable only while ``lambda`` stays below a
threshold set by its hyperparameters; Cohen et al. 2021 ("Gradient descent on neural networks
typically occurs at the edge of stability") found that full-batch training drives the sharpness up
to that threshold and keeps it there. For adaptive methods (Cohen et al. 2022, "Adaptive gradient
methods at the edge of stability") the quantity compared is the preconditioned sharpness
``lambda_1(P^-1 H)``, computed as the top eigenvalue of ``P^-1/2 H P^-1/2``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch
from torch import Tensor

__all__ = [
    "ThresholdInfo",
    "adam_preconditioner",
    "adam_threshold",
    "gd_threshold",
    "momentum_threshold",
    "nesterov_threshold",
    "optimizer_threshold",
]

OptimizerKind = Literal["sgd", "momentum", "nesterov", "adam", "unknown"]


def gd_threshold(lr: float) -> float:
    """Plain gradient descent: stable while ``lambda_max < 2 / lr`` (Cohen et al. 2021)."""
    return 2.0 / lr if lr > 0 else math.inf


def momentum_threshold(lr: float, beta: float) -> float:
    """Heavy-ball momentum ``beta``: stable while ``lambda_max < (2 + 2 beta) / lr`` (Cohen et al. 2021)."""
    return (2.0 + 2.0 * beta) / lr if lr > 0 else math.inf


def nesterov_threshold(lr: float, beta: float) -> float:
    """Nesterov momentum ``beta``: ``(2 + 2 beta) / ((1 + 2 beta) lr)``.

    Unverified: derived from the quadratic model of PyTorch's Nesterov update, not checked against
    published edge-of-stability measurements.
    """
    return (2.0 + 2.0 * beta) / ((1.0 + 2.0 * beta) * lr) if lr > 0 else math.inf


def adam_threshold(lr: float, beta1: float) -> float:
    """Adam/AdamW: ``lambda_1(P^-1 H) < (2 + 2 beta1) / ((1 - beta1) lr)``, i.e. ``38 / lr`` at
    ``beta1 = 0.9`` (Cohen et al. 2022)."""
    return (2.0 + 2.0 * beta1) / ((1.0 - beta1) * lr) if lr > 0 else math.inf


@dataclass(frozen=True)
class ThresholdInfo:
    """The stability threshold of an optimizer.

    Attributes:
        kind: Update rule the threshold is for (that of the group that sets ``threshold``).
        threshold: The smallest per-group threshold (``nan`` for unknown optimizers).
        group_thresholds: One threshold per parameter group, in ``optimizer.param_groups`` order.
        preconditioned: True when the threshold applies to the preconditioned sharpness
            ``lambda_1(P^-1 H)`` rather than ``lambda_1(H)``.
    """

    kind: OptimizerKind
    threshold: float
    group_thresholds: tuple[float, ...]
    preconditioned: bool


def _group_threshold(optimizer: torch.optim.Optimizer, group: dict[str, Any]
                     ) -> tuple[OptimizerKind, float]:
    lr = float(group["lr"])
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return "adam", adam_threshold(lr, float(group["betas"][0]))
    if isinstance(optimizer, torch.optim.SGD):
        beta = float(group.get("momentum", 0.0))
        if beta == 0.0:
            return "sgd", gd_threshold(lr)
        if group.get("nesterov", False):
            return "nesterov", nesterov_threshold(lr, beta)
        # Dampening d scales each gradient by (1 - d): heavy ball with learning rate lr (1 - d).
        return "momentum", momentum_threshold(lr * (1.0 - float(group.get("dampening", 0.0))), beta)
    return "unknown", math.nan


def optimizer_threshold(optimizer: torch.optim.Optimizer) -> ThresholdInfo:
    """Reads the stability threshold off an optimizer's class and parameter groups.

    ``SGD`` maps to :func:`gd_threshold`, :func:`momentum_threshold` (with dampening ``d`` folded
    into the learning rate as ``lr (1 - d)``) or :func:`nesterov_threshold`; ``Adam`` and ``AdamW``
    to :func:`adam_threshold` (``preconditioned=True``; AdamW's decoupled weight decay is ignored).
    Any other optimizer gives kind ``"unknown"`` and ``nan``. Coupled weight decay ``wd`` adds
    ``wd`` to the curvature of the objective actually descended and is not subtracted here.

    With several parameter groups the threshold is a per-group quantity; the reported ``threshold``
    is the smallest (most restrictive) one, i.e. that of the LARGEST learning rate when the
    momentum settings agree. All per-group values are in ``group_thresholds``.

    Args:
        optimizer: A ``torch.optim.Optimizer``.
    """
    per_group = [_group_threshold(optimizer, g) for g in optimizer.param_groups]
    if not per_group or per_group[0][0] == "unknown":
        return ThresholdInfo("unknown", math.nan, tuple(t for _, t in per_group), False)
    kind, threshold = min(per_group, key=lambda kt: kt[1])
    return ThresholdInfo(kind, threshold, tuple(t for _, t in per_group), kind == "adam")


def adam_preconditioner(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]
                        ) -> Tensor | None:
    """Adam's diagonal preconditioner ``P`` as a flat vector over ``params`` (Cohen et al. 2022).

    ``P = (1 - beta1^t) (sqrt(v / (1 - beta2^t)) + eps)`` elementwise, with ``v`` the optimizer's
    ``exp_avg_sq`` (``max_exp_avg_sq`` with ``amsgrad``) and ``t`` its ``step``, so that Adam's
    update is ``lr * m / P``. Pass it as ``diag`` to
    :class:`gradwatch.functional.hessian.HessianOperator` to get ``P^-1/2 H P^-1/2``.

    Args:
        optimizer: A ``torch.optim.Adam`` or ``torch.optim.AdamW``.
        params: The parameters, in the flat-vector order of the Hessian operator.

    Under FSDP2 the state is a DTensor shard; it is gathered (a collective: call this on every rank).

    Returns:
        The flat vector (dtype of the optimizer state), or None if the optimizer is not Adam/AdamW
        or any parameter has no state yet (before the first step, or not managed by the optimizer).
    """
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return None
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    pieces = []
    for p in params:
        state, group = optimizer.state.get(p), group_of.get(id(p))
        if not state or group is None or "exp_avg_sq" not in state:
            return None
        beta1, beta2 = (float(b) for b in group["betas"])
        step = float(state["step"])
        v = state["max_exp_avg_sq"] if group.get("amsgrad", False) else state["exp_avg_sq"]
        if hasattr(v, "full_tensor"):  # FSDP2 keeps each rank's shard of the state: gathered on every rank
            v = v.full_tensor()
        denom = (v / (1.0 - beta2**step)).sqrt() + float(group["eps"])
        pieces.append(((1.0 - beta1**step) * denom).reshape(-1))
    return torch.cat(pieces) if pieces else None
