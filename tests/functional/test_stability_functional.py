"""log Z, update ratios, Adam's eps share against direct computations; spike scores and the gradient noise
scale on planted data."""

from __future__ import annotations

import math

import pytest
import torch

from gradwatch.functional.stability import (
    NoiseScaleEstimator,
    RobustSpikeDetector,
    adam_eps_statistics,
    adam_states,
    logit_statistics,
    noise_scale_estimates,
    robust_zscore,
    update_ratio,
)


def test_log_z_and_max_abs() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g, dtype=torch.float64) * 7 + 2
    stats = logit_statistics(logits)
    lse = [math.log(sum(math.exp(v) for v in row)) for row in logits.reshape(-1, 11).tolist()]
    assert stats.count.item() == 15
    assert stats.log_z_mean.item() == pytest.approx(sum(lse) / 15, rel=1e-6)
    assert stats.log_z_max.item() == pytest.approx(max(lse), rel=1e-6)
    assert stats.max_abs.item() == pytest.approx(logits.abs().max().item(), rel=1e-6)
    mask = torch.ones(3, 5)
    mask[1, 3:] = 0
    mask[2, 1:] = 0
    masked = logit_statistics(logits.float(), mask, chunk_elements=20)  # float32 input, small chunks
    kept = [v for v, m in zip(lse, mask.reshape(-1).tolist()) if m]
    assert masked.count.item() == len(kept) == 9
    assert masked.log_z_mean.item() == pytest.approx(sum(kept) / len(kept), rel=1e-6)
    assert masked.log_z_max.item() == pytest.approx(max(kept), rel=1e-6)
    keep = mask.reshape(-1).bool()
    assert masked.max_abs.item() == pytest.approx(logits.reshape(-1, 11)[keep].abs().max().item(), rel=1e-6)


def test_update_ratio() -> None:
    g = torch.Generator().manual_seed(0)
    before = torch.randn(7, 5, generator=g)
    after = before - 1e-3 * torch.randn(7, 5, generator=g)
    want = math.sqrt(sum((a - b) ** 2 for a, b in zip(after.double().reshape(-1).tolist(),
                                                         before.double().reshape(-1).tolist())))
    want /= math.sqrt(sum(b * b for b in before.double().reshape(-1).tolist()))
    assert update_ratio(before, after).item() == pytest.approx(want, rel=1e-6)
    assert update_ratio(before, before).item() == 0.0


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_eps_share_from_state(amsgrad: bool) -> None:
    """Against second moments recomputed from the gradient sequence, not read from the optimizer."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(40, 8))
    scales = torch.logspace(-12, -2, 40)[:, None]  # rows of very different gradient sizes
    opt = torch.optim.AdamW([p], lr=1e-3, betas=(0.9, 0.99), eps=1e-8, amsgrad=amsgrad)
    v = torch.zeros(40, 8, dtype=torch.float64)
    vmax = torch.zeros_like(v)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        grad = torch.randn(40, 8, generator=g) * scales
        p.grad = grad.clone()
        opt.step()
        v = 0.99 * v + 0.01 * grad.double() ** 2
        vmax = torch.maximum(vmax, v)
    states = list(adam_states(opt))
    assert len(states) == 1 and states[0].step == 5.0 and states[0].eps == 1e-8 and states[0].beta2 == 0.99
    share, rms = adam_eps_statistics(states[0].exp_avg_sq, states[0].step, states[0].beta2, states[0].eps)
    v_hat = (vmax if amsgrad else v) / (1 - 0.99 ** 5)
    want_share = (v_hat.sqrt() < 1e-8).double().mean().item()
    assert 0.1 < want_share < 0.9
    assert share.item() == pytest.approx(want_share, abs=1e-6)
    assert rms.item() == pytest.approx(v_hat.mean().sqrt().item() / 1e-8, rel=1e-6)


def test_adam_states_skip_other_optimizers() -> None:
    p = torch.nn.Parameter(torch.randn(3))
    sgd = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.ones(3)
    sgd.step()
    assert list(adam_states(sgd)) == []
    adam = torch.optim.Adam([p])
    assert list(adam_states(adam)) == []  # no step taken yet
    assert list(adam_states(object())) == []


def test_robust_zscore() -> None:
    h = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0, math.nan])
    # median 3, MAD = median(|[-2,-1,0,1,97]|) = 1
    assert robust_zscore(torch.tensor(9.0), h).item() == pytest.approx(6 / 1.4826)
    assert robust_zscore(torch.tensor(math.nan), h).item() == math.inf
    flat = torch.full((10,), 2.0, dtype=torch.float64)  # MAD 0: the scale is floored at 1e-3 |median|
    assert robust_zscore(torch.tensor(2.002, dtype=torch.float64), flat).item() == pytest.approx(1.0)


def test_spike_detector_planted() -> None:
    g = torch.Generator().manual_seed(0)
    series = 1.0 + 0.01 * torch.randn(120, generator=g, dtype=torch.float64)
    series[60] += 0.2  # a 20-sigma spike
    series[90] = math.nan
    det = RobustSpikeDetector(window=30, warmup=10)
    scores = [det.score(x) for x in series]
    assert all(z is None for z in scores[:10])
    zs = torch.stack([z for z in scores[10:]])
    spikes = (zs > 6).nonzero().reshape(-1) + 10
    assert spikes.tolist() == [60, 90]
    assert zs[60 - 10].item() > 15 and zs[90 - 10].item() == math.inf
    # after the spike the window's median is unmoved: the next value scores as usual
    assert abs(zs[61 - 10].item()) < 4
    # carried state round trip: a fresh detector continues identically
    first = RobustSpikeDetector(window=30, warmup=10)
    for x in series[:100]:
        first.score(x)
    restored = RobustSpikeDetector(window=30, warmup=10)
    restored.load_state_dict(first.state_dict())
    for x in series[100:]:
        a, b = first.score(x), restored.score(x)
        assert a.item() == pytest.approx(b.item())
    with pytest.raises(ValueError, match="window"):
        RobustSpikeDetector(window=5, warmup=6)


def test_noise_scale_estimates_exact_expectations() -> None:
    """E|G_b|^2 = |G|^2 + tr(Sigma)/b: fed the expectations, the estimators return |G|^2 and tr(Sigma)."""
    g2, trace = 3.0, 40.0
    small, big = g2 + trace / 4, g2 + trace / 32
    est_g2, est_tr = noise_scale_estimates(small, 4, big, 32)
    assert est_g2.item() == pytest.approx(g2)
    assert est_tr.item() == pytest.approx(trace)
    with pytest.raises(ValueError, match="b_small < b_big"):
        noise_scale_estimates(small, 8, big, 8)


def test_noise_scale_planted() -> None:
    """Per-example gradients G + N(0, sigma^2 I): B_simple = d sigma^2 / |G|^2, from 4 micro-batches of 8."""
    g = torch.Generator().manual_seed(0)
    d, sigma = 50, 0.5
    mean = torch.randn(d, generator=g, dtype=torch.float64) * 0.3
    want = d * sigma ** 2 / mean.square().sum().item()
    est = NoiseScaleEstimator(decay=0.99)
    assert math.isnan(est.value.item())
    for _ in range(600):
        examples = mean + sigma * torch.randn(32, d, generator=g, dtype=torch.float64)
        micro = examples.reshape(4, 8, d).mean(1)
        small = micro.square().sum(1).mean()
        big = micro.mean(0).square().sum()
        est.update(small, 8, big, 32)
    assert est.value.item() == pytest.approx(want, rel=0.15)
    again = NoiseScaleEstimator(decay=0.99)
    again.load_state_dict(est.state_dict())
    assert again.value.item() == pytest.approx(est.value.item())
