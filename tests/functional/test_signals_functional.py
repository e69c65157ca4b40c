"""The opposing-signals math (``gradwatch.functional.signals``) against hand-computed float64 answers, and the
detector on planted loss trajectories: two groups in anti-phase among many examples are found (recall,
precision, purity, score), and pure noise raises no alarm."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradwatch.functional.signals import (
    MAD_TO_SIGMA,
    MEAN_AD_TO_SIGMA,
    MIN_CHANGES_FOR_PAIRS,
    correlation,
    correlation_matrix,
    find_opposing_signals,
    gradient_cosine,
    group_by_correlation,
    group_gradient_cosine,
    loss_changes,
    movement,
    opposing_signals,
    outliers,
    pair_statistics,
    relative_swing,
    robust_z,
    shared_direction,
    top_share,
)

ALARM = 0.6  # SignalsConfig's default


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# ---- the pieces, by hand ----------------------------------------------------------------------------


def test_robust_z_odd_count() -> None:
    # median 3, |x - 3| = 2 1 0 1 97, MAD = 1
    x = t([1.0, 2.0, 3.0, 4.0, 100.0])
    assert torch.allclose(robust_z(x), (x - 3.0) / 1.4826, atol=0, rtol=1e-15)
    assert MAD_TO_SIGMA == pytest.approx(1 / 0.6745, rel=1e-4)  # Iglewicz-Hoaglin's 0.6745 (x - med) / MAD


def test_robust_z_even_count_uses_the_mean_of_the_middle_two() -> None:
    # median (2 + 3) / 2 = 2.5; |x - 2.5| = 1.5 .5 .5 7.5, median 1.0
    x = t([1.0, 2.0, 3.0, 10.0])
    assert torch.allclose(robust_z(x), (x - 2.5) / 1.4826, atol=0, rtol=1e-15)


def test_robust_z_falls_back_to_the_mean_absolute_deviation_then_zero() -> None:
    x = t([0.0, 0.0, 0.0, 0.0, 5.0])  # MAD 0; mean |x - 0| = 1
    assert torch.allclose(robust_z(x), t([0, 0, 0, 0, 5.0 / MEAN_AD_TO_SIGMA]), atol=0, rtol=1e-15)
    assert torch.equal(robust_z(t([2.0, 2.0, 2.0])), t([0.0, 0.0, 0.0]))
    assert MEAN_AD_TO_SIGMA == pytest.approx(math.sqrt(math.pi / 2), rel=1e-4)


def test_loss_changes_and_movement() -> None:
    losses = t([[1.0, 2.0], [2.0, 2.0], [0.0, 5.0]])
    d = loss_changes(losses)
    assert torch.equal(d, t([[1.0, 0.0], [-2.0, 3.0]]))
    # (mean of squares)^(1/3): ((1 + 4) / 2)^(1/3), ((0 + 9) / 2)^(1/3)
    assert torch.allclose(movement(d), t([2.5 ** (1 / 3), 4.5 ** (1 / 3)]), rtol=1e-15)
    with pytest.raises(ValueError, match=r"losses expected shape \[steps, examples\], got \(3,\)"):
        loss_changes(t([1.0, 2.0, 3.0]))


def test_outliers_are_the_large_robust_z_of_movement_largest_first() -> None:
    changes = torch.full((4, 20), 0.1, dtype=torch.float64)
    changes[:, :10] = 0.2  # the bulk moves by 0.1 or 0.2: median between, MAD > 0
    changes[:, 13] = 3.0
    changes[:, 7] = 5.0
    pos, z = outliers(changes, z_cut=3.5)
    assert pos.tolist() == [7, 13]
    m = movement(changes)
    assert torch.allclose(z, robust_z(m))
    assert outliers(changes, z_cut=3.5, max_outliers=1)[0].tolist() == [7]


def test_top_share_by_hand() -> None:
    # N = 250: the top 1% is ceil(2.5) = 3 examples
    change = torch.ones(250, dtype=torch.float64)
    change[:3] = t([-10.0, 5.0, 5.0])
    assert float(top_share(change)) == pytest.approx(20.0 / (20.0 + 247.0), rel=1e-15)
    # at least one example; equal changes: k / N
    assert float(top_share(torch.ones(50, dtype=torch.float64))) == pytest.approx(1 / 50, rel=1e-15)
    assert float(top_share(torch.ones(512, dtype=torch.float64))) == pytest.approx(6 / 512, rel=1e-15)
    assert math.isnan(float(top_share(torch.zeros(10, dtype=torch.float64))))


def test_correlations_match_numpy_and_constant_series_correlate_zero() -> None:
    g = np.random.default_rng(0)
    x = g.normal(size=(12, 5))
    c = correlation_matrix(torch.from_numpy(x))
    assert np.allclose(c.numpy(), np.corrcoef(x.T), atol=1e-14)
    x[:, 2] = 4.0
    c = correlation_matrix(torch.from_numpy(x)).numpy()
    assert c[2, 2] == 1.0 and np.all(c[2, [0, 1, 3, 4]] == 0.0) and np.all(c[[0, 1, 3, 4], 2] == 0.0)
    assert float(correlation(t([1.0, 2.0, 3.0]), t([3.0, 1.0, -1.0]))) == pytest.approx(-1.0, abs=1e-15)


def test_grouping_links_correlated_series_and_keeps_anti_phase_ones_apart() -> None:
    s = t([1.0, -1.0, 2.0, -2.0, 1.0, -1.0])
    series = torch.stack([s, 2 * s, -s, -3 * s, torch.arange(6.0, dtype=torch.float64), s + 0.1 * t([1, 0, 0, 0, 0, 0])], 1)
    groups = group_by_correlation(series, rho=0.8, min_group=2)
    assert groups == [[0, 1, 5], [2, 3]]
    assert group_by_correlation(series, rho=0.8, min_group=3) == [[0, 1, 5]]
    assert [4] in group_by_correlation(series, rho=0.8, min_group=1)


def test_pair_statistics_by_hand() -> None:
    # window of 4 changes, 6 examples: a = {0, 1}, b = {2}; the rest move a little
    d = t([[1.0, 3.0, -2.0, 0.5, 0.0, 0.0],
           [-1.0, -3.0, 2.0, 0.0, 0.5, 0.0],
           [1.0, 1.0, -1.0, 0.0, 0.0, 0.5],
           [-1.0, -1.0, 1.0, 0.5, 0.0, 0.0]])
    p = pair_statistics(d, [2], [0, 1], full_share=0.5)
    assert (p.a, p.b) == ((0, 1), (2,))  # a holds the smallest position
    # mean changes: a = 2, -2, 1, -1; b = -2, 2, -1, 1: correlation -1, opposite at every step
    assert p.correlation == pytest.approx(-1.0, abs=1e-15)
    assert p.consistency == 1.0
    assert p.share == pytest.approx(18.0 / 20.0, rel=1e-15)  # |a| + |b| = 12 + 6 of a total of 20
    assert p.strength == 1.0 and p.score == pytest.approx(1.0, abs=1e-15)
    q = pair_statistics(d, [0, 1], [2], full_share=1.0)
    assert q.strength == pytest.approx(0.9) and q.score == pytest.approx(0.9)
    assert math.isnan(q.shared) and math.isnan(q.swing)  # neither representations nor losses given: untested


def test_shared_direction_by_hand_margin_against_shared_feature() -> None:
    """Two classes in 3-D, class means (0, 0, 0) and (2, 0, 0). The margin's sides (hard examples of each
    class, near the other class) deviate toward each other: cosine -1. Two groups of opposite labels that
    carry a feature e3 = 5 the rest lacks deviate the same way: cosine +1. The reference is the rest of each
    side's own class, outside both sides."""
    rest0 = t([[0.0, 1.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, 0.0]])  # class 0, mean (0, 0, 0)
    rest1 = t([[2.0, 1.0, 0.0], [2.0, -1.0, 0.0], [2.0, 0.0, 0.0]])  # class 1, mean (2, 0, 0)
    hard0, hard1 = t([[1.5, 0.0, 0.0], [1.5, 0.0, 0.0]]), t([[0.5, 0.0, 0.0], [0.5, 0.0, 0.0]])
    h = torch.cat([rest0, rest1, hard0, hard1])
    labels = [0, 0, 0, 1, 1, 1, 0, 0, 1, 1]
    # d_a = (1.5, 0, 0) - (0, 0, 0); d_b = (0.5, 0, 0) - (2, 0, 0) = (-1.5, 0, 0)
    assert shared_direction(h, [6, 7], [8, 9], labels) == pytest.approx(-1.0, abs=1e-15)
    shared = torch.cat([rest0, rest1, t([[0.0, 0.0, 5.0], [0.0, 0.0, 5.0]]), t([[2.0, 0.0, 5.0], [2.0, 1.0, 5.0]])])
    # d_a = (0, 0, 5); d_b = mean((0, 0, 5), (0, 1, 5)) = (0, 0.5, 5): cos = 25 / (5 * sqrt(25.25))
    assert shared_direction(shared, [6, 7], [8, 9], labels) == pytest.approx(25 / (5 * math.sqrt(25.25)), rel=1e-14)
    # without labels the reference is the rest of the whole probe set, mean (1, 0, 0)
    ref = shared_direction(shared, [6, 7], [8, 9])
    da, db = np.array([-1.0, 0.0, 5.0]), np.array([1.0, 0.5, 5.0])
    assert ref == pytest.approx(da @ db / np.linalg.norm(da) / np.linalg.norm(db), rel=1e-14)
    # a side holding at least as many of a class as the rest of it: no reference, undefined
    assert math.isnan(shared_direction(h, [0, 1, 6, 7], [8, 9], labels))
    assert math.isnan(shared_direction(torch.zeros(10, 3), [6, 7], [8, 9], labels))  # no deviation at all
    with pytest.raises(ValueError, match="3 labels for 10 feature rows"):
        shared_direction(h, [6], [8], [0, 1, 0])


def test_relative_swing_by_hand() -> None:
    d = t([[0.2, -0.4, 0.0], [-0.2, 0.4, 0.1], [0.2, -0.2, 0.0]])
    losses = t([1.0, 2.0, 5.0])
    # side {0}: mean |change| 0.2 over loss 1.0 -> 0.2; side {1}: (0.4 + 0.4 + 0.2) / 3 / 2.0 -> 1/6; the smaller
    assert relative_swing(d, [0], [1], losses) == pytest.approx(1.0 / 6.0, rel=1e-14)
    assert math.isnan(relative_swing(d, [0], [1], t([0.0, 2.0, 5.0])))
    p = pair_statistics(d, [0], [1], features=None, losses=losses, full_swing=0.5)
    assert p.swing == pytest.approx(1.0 / 6.0) and p.score == pytest.approx(p.consistency * -p.correlation * p.strength / 3)


def test_the_score_is_zero_for_a_margin_pair_and_full_for_a_shared_feature() -> None:
    """The same anti-phase loss changes scored with the two representations of the hand-made example above:
    the margin pair scores 0 (its sides deviate toward each other), the shared-feature pair keeps its score."""
    changes = torch.zeros(6, 10, dtype=torch.float64)
    swing = t([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    changes[:, [6, 7]] = swing[:, None] * 0.5
    changes[:, [8, 9]] = -swing[:, None] * 0.5
    changes[:, :6] = 0.01 * torch.randn(6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels = [0, 0, 0, 1, 1, 1, 0, 0, 1, 1]
    losses = torch.full((10,), 1.0, dtype=torch.float64)
    margin = torch.cat([t([[0.0, 1.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, 0.0], [2.0, 1.0, 0.0], [2.0, -1.0, 0.0],
                           [2.0, 0.0, 0.0], [1.5, 0.0, 0.0], [1.5, 0.0, 0.0], [0.5, 0.0, 0.0], [0.5, 0.0, 0.0]])])
    shared = margin.clone()
    shared[6:, 0] = t([0.0, 0.0, 2.0, 2.0])
    shared[6:, 2] = 5.0
    kwargs = {"z_cut": 1.0, "min_group": 2, "labels": labels, "losses": losses}
    by_margin = opposing_signals(changes, features=margin, **kwargs).pairs
    by_shared = opposing_signals(changes, features=shared, **kwargs).pairs
    assert by_margin and by_shared and (by_margin[0].a, by_margin[0].b) == ((6, 7), (8, 9))
    assert by_margin[0].shared == pytest.approx(-1.0) and by_margin[0].score == 0.0
    assert by_shared[0].shared == pytest.approx(1.0) and by_shared[0].score == pytest.approx(1.0, abs=1e-12)
    untested = opposing_signals(changes, z_cut=1.0).pairs
    assert untested[0].score == pytest.approx(1.0, abs=1e-12) and math.isnan(untested[0].shared)


def test_find_needs_two_steps_and_finite_losses_and_pairs_need_enough_changes() -> None:
    with pytest.raises(ValueError, match="losses at >= 2 probe steps, got 1"):
        find_opposing_signals(torch.zeros(1, 10))
    with pytest.raises(ValueError, match="non-finite"):
        find_opposing_signals(t([[1.0, 2.0], [math.inf, 1.0]]))
    losses = torch.randn(MIN_CHANGES_FOR_PAIRS, 30, generator=torch.Generator().manual_seed(0))
    rep = find_opposing_signals(losses)
    assert rep.changes == MIN_CHANGES_FOR_PAIRS - 1 and rep.pairs is None and rep.groups is None
    assert math.isfinite(rep.top1pct_share)
    rep = find_opposing_signals(torch.cat([losses, losses[:1]]))
    assert rep.changes == MIN_CHANGES_FOR_PAIRS and rep.pairs is not None


def test_gradient_cosines() -> None:
    a, b = t([[1.0, 0.0], [0.0, 1.0]]), t([[-1.0, 0.0], [0.0, -2.0]])
    assert float(gradient_cosine(a, b)) == pytest.approx(-3.0 / (math.sqrt(2) * math.sqrt(5)), rel=1e-15)  # <a, b> = -1 - 2
    assert math.isnan(float(gradient_cosine(a, torch.zeros(2, 2))))
    grads = torch.stack([a, 3 * a, b])
    assert float(group_gradient_cosine(grads, [0, 1], [2])) == pytest.approx(float(gradient_cosine(a, b)), rel=1e-15)


def test_mean_per_example_gradient_is_the_gradient_of_the_mean_loss() -> None:
    """The metric's confirmation takes each side's gradient of its mean loss; it equals the mean of the
    per-example gradients that ``group_gradient_cosine`` takes."""
    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(5, 3).double()
    x, y = torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)
    per = torch.stack([torch.autograd.grad(torch.nn.functional.cross_entropy(layer(x[i:i + 1]), y[i:i + 1]),
                                           layer.weight)[0] for i in range(8)])
    a, b = [0, 2, 5], [1, 7]
    ga = torch.autograd.grad(torch.nn.functional.cross_entropy(layer(x[a]), y[a]), layer.weight)[0]
    gb = torch.autograd.grad(torch.nn.functional.cross_entropy(layer(x[b]), y[b]), layer.weight)[0]
    assert float(group_gradient_cosine(per, a, b)) == pytest.approx(float(gradient_cosine(ga, gb)), rel=1e-12)


# ---- planted trajectories ------------------------------------------------------------------------
# (on loss changes alone: the anti-phase statistics; sharedness and swing are tested above and on real models)


def student_t(shape: tuple[int, ...], g: torch.Generator, dof: int = 3) -> torch.Tensor:
    """Student t samples (``dof`` degrees of freedom) from ``g``: z / sqrt(chi2_dof / dof), clamped to +-30."""
    z = torch.randn(shape, generator=g, dtype=torch.float64)
    chi2 = torch.randn((dof, *shape), generator=g, dtype=torch.float64).square().sum(0)
    return (z / (chi2 / dof).sqrt()).clamp(-30, 30)


def planted_losses(seed: int, steps: int = 160, n: int = 512, size: int = 24) -> tuple[torch.Tensor, list[int], list[int]]:
    """Per-example losses [steps, n]: everyone a random walk with heavy-tailed (Student t, 3 dof) steps of
    scale 0.005 to 0.015; two groups of ``size`` examples also swing in anti-phase (a shared oscillation of
    random period and slowly varying amplitude, plus each member's own noise)."""
    g = torch.Generator().manual_seed(seed)
    scale = 0.01 * torch.rand(n, generator=g, dtype=torch.float64).add(0.5)
    noise = student_t((steps, n), g) * scale
    losses = 1.0 + noise.cumsum(0)
    perm = torch.randperm(n, generator=g)
    a, b = sorted(perm[:size].tolist()), sorted(perm[size:2 * size].tolist())
    time = torch.arange(steps, dtype=torch.float64)
    period = 3.0 + 5.0 * float(torch.rand(1, generator=g))  # sampled once per step: periods near 2 alias
    swing = 0.3 * torch.sin(2 * math.pi * time / period) * (1 + 0.3 * torch.sin(time / 17.0))
    own = 0.01 * torch.randn(steps, 2 * size, generator=g, dtype=torch.float64)
    losses[:, a] += swing[:, None] + own[:, :size]
    losses[:, b] -= swing[:, None] + own[:, size:]
    return losses, a, b


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_groups_are_found_as_the_two_sides_of_one_alarming_pair(seed: int) -> None:
    losses, a, b = planted_losses(seed)
    window = 20
    planted = set(a) | set(b)
    counts: dict[int, int] = {}
    purities, scores, windows = [], [], 0
    for end in range(window + 1, losses.shape[0] + 1):
        rep = opposing_signals(loss_changes(losses[end - window - 1:end]))
        windows += 1
        for i in rep.outliers:
            counts[i] = counts.get(i, 0) + 1
        assert rep.pairs, f"no pair in the window ending at {end}"
        top = rep.pairs[0]
        scores.append(top.score)
        sa, sb = set(top.a), set(top.b)
        purities.append(max(min(len(sa & set(a)) / len(sa), len(sb & set(b)) / len(sb)),
                            min(len(sa & set(b)) / len(sa), len(sb & set(a)) / len(sb))))
    often = {i for i, c in counts.items() if c >= windows / 2}
    recall, precision = len(often & planted) / len(planted), len(often & planted) / max(1, len(often))
    assert recall >= 0.9 and precision >= 0.8, (recall, precision)
    assert min(purities) >= 0.9, min(purities)
    assert min(scores) >= ALARM, min(scores)


@pytest.mark.parametrize(("tails", "options"), [("student_t", {}), ("loud", {}), ("loud", {"rho": 0.5, "min_group": 1})])
def test_pure_noise_raises_no_alarm_over_hundreds_of_steps(tails: str, options: dict) -> None:
    """Independent random walks probed at every one of 300 steps: heavy-tailed (Student t) steps of
    heterogeneous scale (some examples move 36x more than others), or Gaussian steps with 40 "loud" examples
    moving 10x more (outliers every window; with loose grouping, rho 0.5 and singletons allowed, pairs of them
    do form). No pair reaches the alarm."""
    g = torch.Generator().manual_seed(7)
    n, steps, window = 512, 300, 20
    if tails == "student_t":
        scale = 0.01 * torch.rand(n, generator=g, dtype=torch.float64).add(0.2) ** 2
        steps_ = student_t((steps, n), g) * scale
    else:
        scale = torch.full((n,), 0.01, dtype=torch.float64)
        scale[:40] = 0.1
        steps_ = torch.randn((steps, n), generator=g, dtype=torch.float64) * scale
    losses = 1.0 + steps_.cumsum(0)
    best, outliers_seen, pairs_seen = 0.0, 0, 0
    for end in range(window + 1, steps + 1):
        rep = opposing_signals(loss_changes(losses[end - window - 1:end]), **options)
        outliers_seen += len(rep.outliers)
        pairs_seen += len(rep.pairs or ())
        best = max([best, *(p.score for p in rep.pairs or ())])
    assert outliers_seen > 0
    if options:
        assert pairs_seen > 0
    assert best < ALARM, best


def test_anti_phase_spread_over_the_whole_probe_set_is_no_opposing_signal() -> None:
    """Half the probe set against the other half (a class-wide swing, e.g. the bias moving), everyone by about
    the same amount: no example's movement is an outlier, so no pair forms and nothing raises the alarm."""
    g = torch.Generator().manual_seed(11)
    n, steps, window = 512, 200, 20
    swing = 0.05 * torch.sin(torch.arange(steps, dtype=torch.float64) * 2.1)
    sign = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0).double()
    losses = 1.0 + swing[:, None] * sign[None, :] * (1 + 0.2 * torch.rand(n, generator=g, dtype=torch.float64))
    losses += (0.002 * student_t((steps, n), g)).cumsum(0)
    for end in range(window + 1, steps + 1):
        rep = opposing_signals(loss_changes(losses[end - window - 1:end]))
        assert all(p.score < ALARM for p in rep.pairs or ()), end
