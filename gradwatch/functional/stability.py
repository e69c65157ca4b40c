"""Instability proxies on tensors: output-logit log Z, update/weight ratios, Adam's epsilon share, robust
spike scores and the gradient noise scale.

- Output logits (Wortsman et al. 2023, "Small-scale proxies for large-scale Transformer training
  instabilities"): log Z = logsumexp_c logit_c per position; it drifting far from its start is the
  "output logit divergence" that z-loss 1e-4 * (log Z)^2 prevents. :func:`logit_statistics` gives the sum,
  max and count of log Z and max |logit| over the positions a mask keeps.
- Update/weight ratio of a layer: ||W_after - W_before||_F / ||W_before||_F (:func:`update_ratio`).
- Adam's epsilon (Wortsman et al. 2023, section on AdamW epsilon): the update is m_hat / (sqrt(v_hat) + eps)
  with v_hat = exp_avg_sq / (1 - beta2^t); once sqrt(v_hat) < eps for an entry, eps dominates and its
  update shrinks. :func:`adam_eps_statistics` gives the share of such entries and sqrt(mean v_hat) (the
  gradient RMS Adam sees) over eps.
- Spikes: the robust z-score z = (x - median) / (1.4826 MAD) of a value against a window of past values
  (:func:`robust_zscore`, :class:`RobustSpikeDetector`).
- Gradient noise scale (McCandlish et al. 2018, "An empirical model of large-batch training", appendix A):
  from squared gradient norms at two batch sizes b < B, unbiased estimates
  |G|^2 ~ (B |G_B|^2 - b |G_b|^2) / (B - b) and tr(Sigma) ~ (|G_b|^2 - |G_B|^2) / (1/b - 1/B), each
  smoothed by an exponential moving average before B_simple = tr(Sigma) / |G|^2
  (:func:`noise_scale_estimates`, :class:`NoiseScaleEstimator`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

#: The MAD of a normal distribution is 0.6745 sigma; 1.4826 MAD estimates sigma.
MAD_TO_SIGMA: float = 1.4826


# ---- output logits ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogitStatistics:
    """log Z and |logit| statistics over the kept positions of one batch of logits (0-d tensors).

    Attributes:
        log_z_sum: sum over positions of log Z = logsumexp over the last dim.
        log_z_max: max over positions of log Z (-inf when no position was kept).
        max_abs: max |logit| over kept positions and classes (0 when none was kept).
        count: number of kept positions.
    """

    log_z_sum: Tensor
    log_z_max: Tensor
    max_abs: Tensor
    count: Tensor

    @property
    def log_z_mean(self) -> Tensor:
        return self.log_z_sum / self.count


def logit_statistics(logits: Tensor, mask: Tensor | None = None, *, chunk_elements: int = 1 << 24) -> LogitStatistics:
    """log Z = logsumexp over the last (class / vocabulary) dim of ``logits`` at every position, and max |logit|.

    Args:
        logits: (..., C); computed in float32, or float64 when given in float64.
        mask: optional, broadcastable to ``logits.shape[:-1]``; positions where it is 0/False (padding)
            are left out (an HF ``attention_mask``).
        chunk_elements: logits processed at once at most (bounds the float32 copy).
    """
    with torch.no_grad():
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        x = logits.detach().reshape(-1, logits.shape[-1])
        keep = None
        if mask is not None:
            keep = torch.broadcast_to(mask.detach().to(x.device) != 0, logits.shape[:-1]).reshape(-1)
        rows = max(1, chunk_elements // max(1, x.shape[-1]))
        z_sum = torch.zeros((), dtype=dtype, device=x.device)
        z_max = torch.full((), -math.inf, dtype=dtype, device=x.device)
        a_max = torch.zeros((), dtype=dtype, device=x.device)
        count = torch.zeros((), dtype=dtype, device=x.device)
        for start in range(0, x.shape[0], rows):
            chunk = x[start:start + rows].to(dtype)
            lse = torch.logsumexp(chunk, dim=-1)
            amax = chunk.abs().amax(dim=-1)
            if keep is not None:
                k = keep[start:start + rows]
                lse_kept = lse.masked_fill(~k, 0.0)
                z_sum = z_sum + lse_kept.sum()
                z_max = torch.maximum(z_max, lse.masked_fill(~k, -math.inf).amax())
                a_max = torch.maximum(a_max, amax.masked_fill(~k, 0.0).amax())
                count = count + k.sum().to(dtype)
            else:
                z_sum = z_sum + lse.sum()
                z_max = torch.maximum(z_max, lse.amax())
                a_max = torch.maximum(a_max, amax.amax())
                count = count + lse.numel()
        return LogitStatistics(log_z_sum=z_sum, log_z_max=z_max, max_abs=a_max, count=count)


# ---- optimizer ----------------------------------------------------------------------------------


def update_ratio_terms(before: Tensor, after: Tensor) -> Tensor:
    """(||after - before||_F^2, ||before||_F^2) as a (2,) float64 tensor on ``after``'s device: sums of squares,
    so that row shards (FSDP2) can be summed over ranks before the ratio is taken."""
    with torch.no_grad():
        a, b = after.detach(), before.detach().to(after.device)
        return torch.stack([torch.linalg.vector_norm((a - b).reshape(-1), dtype=torch.float64),
                            torch.linalg.vector_norm(b.reshape(-1), dtype=torch.float64)]).square()


def update_ratio(before: Tensor, after: Tensor) -> Tensor:
    """||after - before||_F / ||before||_F as a 0-d float64 tensor (inf if ``before`` is zero and the
    update is not; NaN if both are zero)."""
    terms = update_ratio_terms(before, after)
    return (terms[0] / terms[1]).sqrt()


@dataclass(frozen=True)
class AdamState:
    """One parameter's Adam second moment as the optimizer keeps it."""

    param: Tensor
    exp_avg_sq: Tensor
    step: float
    beta2: float
    eps: float


def adam_states(optimizer: Any) -> Iterator[AdamState]:
    """Every parameter of a torch Adam/AdamW-like optimizer (``state[p]["exp_avg_sq"]`` and ``"step"``,
    the group's ``betas`` and ``eps``) that has taken a step. With ``amsgrad`` the denominator's
    ``max_exp_avg_sq`` is read instead. Optimizers without that state yield nothing."""
    state = getattr(optimizer, "state", None)
    groups = getattr(optimizer, "param_groups", None)
    if state is None or groups is None:
        return
    for group in groups:
        betas, eps = group.get("betas"), group.get("eps")
        if betas is None or eps is None:
            continue
        for p in group["params"]:
            st = state.get(p)
            if not st or "exp_avg_sq" not in st or "step" not in st:
                continue
            v = st["max_exp_avg_sq"] if group.get("amsgrad") and "max_exp_avg_sq" in st else st["exp_avg_sq"]
            step = st["step"]
            step = float(step.item() if isinstance(step, Tensor) else step)
            if step <= 0:
                continue
            yield AdamState(param=p, exp_avg_sq=v, step=step, beta2=float(betas[1]), eps=float(eps))


def adam_eps_statistics(exp_avg_sq: Tensor, step: float, beta2: float, eps: float) -> tuple[Tensor, Tensor]:
    """(share of entries with sqrt(v_hat) < eps, sqrt(mean(v_hat)) / eps), v_hat = exp_avg_sq / (1 - beta2^step);
    both 0-d float64 tensors on the state's device."""
    with torch.no_grad():
        correction = 1.0 - beta2 ** step
        v_hat = exp_avg_sq.detach().to(torch.float64) / correction
        share = (v_hat.sqrt() < eps).to(torch.float64).mean()
        rms = v_hat.mean().sqrt() / eps
        return share, rms


# ---- spikes -------------------------------------------------------------------------------------


def robust_zscore(value: Tensor, history: Tensor, *, rel_floor: float = 1e-3) -> Tensor:
    """(value - median) / (1.4826 MAD) against the finite entries of ``history`` (NaN entries are ignored).

    The scale is floored at ``rel_floor * |median|`` (and 1e-12), so a nearly constant history does not turn
    rounding noise into a spike. A non-finite ``value`` scores +inf. Returns a 0-d float64 tensor.
    """
    with torch.no_grad():
        h = history.detach().to(torch.float64)
        x = value.detach().to(torch.float64).reshape(())
        med = torch.nanmedian(h)
        mad = torch.nanmedian((h - med).abs())
        scale = torch.maximum(MAD_TO_SIGMA * mad, rel_floor * med.abs()).clamp_min(1e-12)
        z = (x - med) / scale
        return torch.where(torch.isfinite(x), z, torch.full_like(z, math.inf))


class RobustSpikeDetector:
    """Robust running spike scores of a scalar series, kept on the device (no host sync per value).

    Each value is scored against the last ``window`` values before it (:func:`robust_zscore`); the first
    ``warmup`` values are not scored (``score`` returns None for them). Every value enters the window,
    non-finite ones as NaN (ignored by the median), so a lasting new level becomes the baseline.
    """

    def __init__(self, window: int = 100, warmup: int = 20, rel_floor: float = 1e-3) -> None:
        if window < 3 or not 2 <= warmup <= window:
            raise ValueError(f"gradwatch: a spike detector needs window >= 3 and 2 <= warmup <= window, "
                             f"got window={window}, warmup={warmup}")
        self.window = window
        self.warmup = warmup
        self.rel_floor = rel_floor
        self.values: Tensor | None = None  # (window,) ring buffer, NaN = empty or non-finite
        self.seen = 0  # values scored or not, for the warm-up
        self._pos = 0  # next write position in the ring

    def score(self, value: Tensor) -> Tensor | None:
        """The robust z-score of ``value`` against the window (None during warm-up), then add it to the window."""
        v = value.detach().to(torch.float64).reshape(())
        if self.values is None or self.values.device != v.device:
            self.values = (torch.full((self.window,), math.nan, dtype=torch.float64, device=v.device)
                           if self.values is None else self.values.to(v.device))
        z = robust_zscore(v, self.values, rel_floor=self.rel_floor) if self.seen >= self.warmup else None
        self.values[self._pos] = v  # a non-finite value is kept as NaN below: it never becomes a baseline
        self.values.nan_to_num_(nan=math.nan, posinf=math.nan, neginf=math.nan)
        self._pos = (self._pos + 1) % self.window
        self.seen += 1
        return z

    def history(self) -> Tensor:
        """The window's values, oldest first (NaN for non-finite ones)."""
        if self.values is None:
            return torch.zeros(0, dtype=torch.float64)
        n = min(self.seen, self.window)
        ordered = torch.cat([self.values[self._pos:], self.values[:self._pos]])
        return ordered[self.window - n:].detach().cpu().clone()

    def state_dict(self) -> dict[str, Any]:
        return {"values": self.history(), "seen": self.seen}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        values = torch.as_tensor(state.get("values", ()), dtype=torch.float64).reshape(-1)[-self.window:]
        self.values = torch.full((self.window,), math.nan, dtype=torch.float64)
        self.values[:values.numel()] = values
        self._pos = values.numel() % self.window
        self.seen = int(state.get("seen", values.numel()))


# ---- gradient noise scale -----------------------------------------------------------------------


def noise_scale_estimates(sq_norm_small: Tensor | float, b_small: float, sq_norm_big: Tensor | float,
                          b_big: float) -> tuple[Tensor, Tensor]:
    """Unbiased (|G|^2, tr(Sigma)) from squared gradient norms at batch sizes ``b_small`` < ``b_big``
    (McCandlish et al. 2018, eqs. A.2-A.3):

        |G|^2     ~ (B |G_B|^2 - b |G_b|^2) / (B - b)
        tr(Sigma) ~ (|G_b|^2 - |G_B|^2) / (1/b - 1/B)

    With k equal micro-batches of size b and G_B their mean, pass the mean of the k micro-batches' squared
    norms as ``sq_norm_small`` (an average of unbiased estimates stays unbiased) and B = k b.
    """
    if not 0 < b_small < b_big:
        raise ValueError(f"gradwatch: the noise scale needs 0 < b_small < b_big, got {b_small}, {b_big}")
    small = torch.as_tensor(sq_norm_small, dtype=torch.float64)
    big = torch.as_tensor(sq_norm_big, dtype=torch.float64).to(small.device)
    g2 = (b_big * big - b_small * small) / (b_big - b_small)
    trace = (small - big) / (1.0 / b_small - 1.0 / b_big)
    return g2, trace


class NoiseScaleEstimator:
    """B_simple = EMA(tr Sigma) / EMA(|G|^2) over successive estimates (McCandlish et al. 2018, appendix A:
    each estimate is noisy and can be negative; they are smoothed before the ratio is taken).

    ``update`` takes squared norms at two batch sizes; ``value`` is B_simple (NaN before the first update,
    or while the smoothed |G|^2 is not positive). ``decay`` is the EMA's weight on the past (bias-corrected,
    so the first value is the first estimate).
    """

    def __init__(self, decay: float = 0.95) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"gradwatch: the noise-scale EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.g2 = torch.zeros((), dtype=torch.float64)
        self.trace = torch.zeros((), dtype=torch.float64)
        self.weight = 0.0

    def update(self, sq_norm_small: Tensor | float, b_small: float, sq_norm_big: Tensor | float, b_big: float) -> None:
        g2, trace = noise_scale_estimates(sq_norm_small, b_small, sq_norm_big, b_big)
        self.g2 = self.decay * self.g2.to(g2.device) + (1 - self.decay) * g2
        self.trace = self.decay * self.trace.to(trace.device) + (1 - self.decay) * trace
        self.weight = self.decay * self.weight + (1 - self.decay)

    @property
    def value(self) -> Tensor:
        if self.weight == 0.0:
            return torch.tensor(math.nan, dtype=torch.float64)
        g2 = self.g2 / self.weight
        ratio = (self.trace / self.weight) / g2
        return torch.where(g2 > 0, ratio, torch.full_like(ratio, math.nan))

    def state_dict(self) -> dict[str, Any]:
        return {"g2": self.g2.detach().cpu().clone(), "trace": self.trace.detach().cpu().clone(), "weight": self.weight}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.g2 = torch.as_tensor(state["g2"], dtype=torch.float64).clone()
        self.trace = torch.as_tensor(state["trace"], dtype=torch.float64).clone()
        self.weight = float(state["weight"])


__all__ = ["MAD_TO_SIGMA", "AdamState", "LogitStatistics", "NoiseScaleEstimator", "RobustSpikeDetector",
           "adam_eps_statistics", "adam_states", "logit_statistics", "noise_scale_estimates", "robust_zscore",
           "update_ratio", "update_ratio_terms"]
