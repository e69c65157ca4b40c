"""Opposing signals: examples whose losses swing against each other on a fixed probe set.

Rosenfeld and Risteski 2023, "Outliers with opposing signals have an outsized effect on neural network
optimization": a few groups of training examples carry a large, consistent feature (a background, a
token) whose gradients point in opposite directions for the two groups (their labels differ). The network
balances them in a narrow valley; as it sharpens, the two groups' losses oscillate in anti-phase and
carry a large share of the total loss movement. The paper finds them as the examples with the largest
change in per-example loss between steps; its exact selection rule is not public, so ours is stated here.

Notation: a probe set of N examples is evaluated at consecutive optimizer steps; ``L[s, i]`` is the loss
of example i at step t_s and a loss change is measured over one optimizer step,

    D[s, i] = L(t_s + 1, i) - L(t_s, i)                             (:func:`loss_changes`)

(the oscillation at the edge of stability has a period of about two steps, so changes across a longer
gap alias it away). A window holds the last W such one-step changes, from bursts of consecutive probe
steps. Detection (:func:`opposing_signals` on changes, :func:`find_opposing_signals` on losses at
consecutive steps):

1. **Movement** of example i over the window: ``m_i = (mean_s D[s, i]^2)^(1/3)``, the cube root of its
   mean squared change (the Wilson and Hilferty 1931 transform, which makes a mean of squares close to
   normal; raw root-mean-square changes are heavy-tailed, see :func:`movement`).
2. **Outliers**: the examples whose robust z-score of ``m`` over the probe set reaches the cut,
   ``z_i = (m_i - median(m)) / (1.4826 * MAD(m)) >= z_cut`` (default 3.5: Iglewicz and Hoaglin 1993,
   "How to detect and handle outliers": |modified z| > 3.5 flags an outlier; 1.4826 = 1 / 0.6745 makes the
   MAD a consistent estimate of a normal standard deviation). Where the MAD is 0 (more than half the
   probe set did not move) the scale is ``1.2533 * mean|m - median(m)|`` (1.2533 = sqrt(pi / 2)); where
   that is 0 too, nothing is an outlier. One-sided: only large movement counts. At most ``max_outliers``
   (the largest z) go on to grouping.
3. **Groups**: two outliers are linked when the Pearson correlation of their change series over the
   window is at least ``rho`` (default 0.8); the groups are the connected components of that graph with
   at least ``min_group`` members (default 2). A high ``rho`` because linking is single-linkage: at 0.5,
   examples that merely follow a group loosely (hard examples near the boundary) chain into it. Two series
   each correlated >= rho with a third correlate >= 2 rho^2 - 1 (0.28 for rho = 0.8), so two groups in
   anti-phase (correlation <= -rho) are never bridged into one.
4. **Pairs**: two groups g, h whose mean change series ``m_g[s] = mean_{i in g} D[s, i]`` correlate at
   ``corr(m_g, m_h) <= -rho``. Each pair has

   - ``anti = max(0, -corr(m_g, m_h))`` in [0, 1]: how opposed the two series are;
   - ``consistency`` = share of window steps s with ``m_g[s] * m_h[s] < 0`` in [0, 1]: how often they
     move in opposite directions (a correlation made by a single swing has a low consistency);
   - ``share`` = ``sum_s sum_{i in g u h} |D[s, i]| / sum_s sum_i |D[s, i]|`` in [0, 1]: the share of the
     probe set's loss movement the pair carries (the paper's "outsized effect");
     ``strength = min(1, share / full_share)`` (default ``full_share`` 0.5);
   - ``shared`` (:func:`shared_direction`) in [-1, 1]: whether the two sides share a feature. Each side's
     deviation in the model's input representation ``h`` (the input embeddings' output, or the first
     layer's input: the feature is a property of the data) from the rest of its own class,
     ``d_g = mean_{i in g} (h_i - mean{h_j : y_j = y_i, j not in g u h})``, and ``shared = cos(d_g, d_h)``.
     An opposing signal is two groups carrying one feature the rest of the data lacks (a sky background)
     while their labels differ: both deviate along that feature, ``shared > 0``. The two sides of a
     classifier's decision margin (the hard examples of class 0 against those of class 1, which any
     classifier moves in anti-phase while it fits them) deviate toward each other's class, ``shared < 0``.
     Undefined (NaN) where a side holds more than half of a class (the rest of its class is no reference);
     ``sharedness = clamp(shared / full_shared, 0, 1)`` (default ``full_shared`` 0.5; NaN counts 0);
   - ``swing`` (:func:`relative_swing`): the smaller of the two sides' mean absolute one-step change of
     their mean loss, relative to that side's current mean loss, ``mean_s |m_g[s]| / mean_{i in g} L_i``.
     The paper's groups swing by a large part of their own loss at each step; ordinary stochastic
     training moves hard examples by a few percent. ``swinginess = min(1, swing / full_swing)`` (default
     ``full_swing`` 0.1, a tenth of the loss per step; it was 0.2, set on planted tabular data, until the
     planted MiniLM case, whose groups swing by 10-12% of their loss per step, stayed below the alarm
     with it; every null control was run again after the change);
   - **carriers** (:func:`shared_carriers`): where the sides share a direction, each side keeps the members
     whose own deviation projected on it is at least half their side's upper-quartile projection; the others
     (``followers``: examples that moved with the group without carrying its feature, e.g. hard examples
     of the same class) are reported apart. The statistics are those of the whole groups, so that the cut
     cannot raise ``shared``;
   - **score** ``= anti * consistency * strength * sharedness * swinginess`` in [0, 1]. Without features
     (``features=None``) or current losses the last two factors are not tested (1); the ``signals``
     metric always gives both.

   A pair whose score reaches the alarm threshold is what the metric reports as an opposing signal.
   Pairs need at least :data:`MIN_CHANGES_FOR_PAIRS` changes in the window. The thresholds were chosen
   on planted tabular data and checked on null controls (memorising classifiers, label noise, class
   imbalance, MiniLM fine-tuning, a small language model; ``benchmarks/signals.py``): there the margin
   pairs score 0 by their negative ``shared``, and a side that is (nearly) a whole minority class by its
   undefined one.
5. ``top1pct_share`` (:func:`top_share`): the share of the latest step's total absolute loss change
   carried by the top 1% of the probe set (``ceil(N / 100)`` examples, at least one). With equal changes
   it is ``ceil(N/100) / N``; it rises toward 1 when a few examples dominate.

Gradient confirmation (:func:`gradient_cosine`, :func:`group_gradient_cosine`): the two sides of an
opposing pair should pull the shared weights in opposite directions; at the last layer the cosine of the
two groups' mean per-example gradients is then negative. The mean of per-example gradients is the
gradient of the mean loss, so the metric gets each side's mean gradient from one backward of that side's
mean loss.

Everything here is pure tensor math on the CPU or any device (float64 is used for the statistics); the
grouping runs on host copies of the (small) outlier series.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from gradwatch.functional.shared_feature import shared_carriers, shared_direction

MAD_TO_SIGMA = 1.4826  # 1 / Phi^-1(3/4): MAD * 1.4826 estimates sigma for normal data
MEAN_AD_TO_SIGMA = 1.2533  # sqrt(pi / 2): mean absolute deviation * 1.2533 estimates sigma for normal data
MIN_CHANGES_FOR_PAIRS = 5  # a correlation of two points is +-1; five opposite moves in a row by chance: 1 in 32

__all__ = ["MAD_TO_SIGMA", "MEAN_AD_TO_SIGMA", "MIN_CHANGES_FOR_PAIRS", "OpposingPair", "SignalsReport",
           "correlation", "correlation_matrix", "find_opposing_signals", "gradient_cosine",
           "group_by_correlation", "group_gradient_cosine", "loss_changes", "movement", "opposing_signals",
           "outliers", "pair_statistics", "relative_swing", "robust_z", "shared_direction", "top_share"]


def loss_changes(losses: Tensor) -> Tensor:
    """``D[s, i] = L[s + 1, i] - L[s, i]`` for losses ``L`` of shape [T, N] (T probe steps): shape [T-1, N]."""
    if losses.ndim != 2:
        raise ValueError(f"gradwatch: losses expected shape [steps, examples], got {tuple(losses.shape)}")
    return losses[1:] - losses[:-1]


def robust_z(values: Tensor) -> Tensor:
    """Robust z-scores of a 1-D tensor: ``(x - median(x)) / (1.4826 * MAD(x))``.

    ``MAD(x) = median(|x - median(x)|)``; the median is the usual one (mean of the two middle values for
    an even count). Iglewicz and Hoaglin 1993 call ``0.6745 (x - median) / MAD`` the modified z-score;
    it is the same number. Where the MAD is 0, the scale is ``1.2533 * mean|x - median(x)|``; where that
    is 0 as well (all values equal) every score is 0. Non-finite values are not allowed.
    """
    x = values.to(torch.float64).reshape(-1)
    if x.numel() == 0:
        return x
    med = torch.quantile(x, 0.5)
    dev = (x - med).abs()
    scale = MAD_TO_SIGMA * torch.quantile(dev, 0.5)
    if scale <= 0:
        scale = MEAN_AD_TO_SIGMA * dev.mean()
    if scale <= 0:
        return torch.zeros_like(x)
    return (x - med) / scale


def movement(changes: Tensor) -> Tensor:
    """Movement of each example over a window of changes [W, N]: ``m_i = (mean_s D[s, i]^2)^(1/3)``, shape [N].

    The cube root of a mean of squares is close to normally distributed (Wilson and Hilferty 1931), so a
    z-score reads its tail as a normal tail; the root-mean-square change itself is heavy-tailed by nature
    (an example's loss change scales with its gradient norm), and a robust z of it flags the upper ~13% of
    an ordinarily trained probe set.
    """
    return changes.to(torch.float64).square().mean(0).pow(1.0 / 3.0)


def outliers(changes: Tensor, z_cut: float = 3.5, max_outliers: int | None = None) -> tuple[Tensor, Tensor]:
    """Outliers of a window of changes [W, N]: positions with ``robust_z(movement) >= z_cut``.

    Returns:
        (positions, z): the outliers' positions in the probe set, largest z first (at most
        ``max_outliers``), and the z-scores of every example.
    """
    z = robust_z(movement(changes))
    pos = torch.nonzero(z >= z_cut).reshape(-1)
    pos = pos[torch.argsort(z[pos], descending=True, stable=True)]
    if max_outliers is not None:
        pos = pos[:max_outliers]
    return pos, z


def top_share(change: Tensor, fraction: float = 0.01) -> Tensor:
    """Share of ``sum_i |change_i|`` carried by the ``max(1, ceil(fraction * N))`` largest ``|change_i|``.

    NaN when nothing changed (the share is undefined). A 0-d float64 tensor.
    """
    a = change.to(torch.float64).reshape(-1).abs()
    total = a.sum()
    if a.numel() == 0 or total <= 0:
        return torch.tensor(math.nan, dtype=torch.float64, device=change.device)
    k = max(1, math.ceil(fraction * a.numel() - 1e-9))
    return torch.topk(a, min(k, a.numel())).values.sum() / total


def correlation_matrix(series: Tensor) -> Tensor:
    """Pearson correlations between the columns of ``series`` [W, K] over its rows: shape [K, K].

    A column that does not vary correlates 0 with every other column (and 1 with itself).
    """
    x = series.to(torch.float64)
    x = x - x.mean(0, keepdim=True)
    norm = x.norm(dim=0)
    ok = norm > 0
    safe = torch.where(ok, norm, torch.ones_like(norm))
    c = (x.T @ x) / (safe[:, None] * safe[None, :])
    c = torch.where(ok[:, None] & ok[None, :], c, torch.zeros_like(c)).clamp(-1.0, 1.0)
    c.fill_diagonal_(1.0)
    return c


def correlation(x: Tensor, y: Tensor) -> Tensor:
    """Pearson correlation of two 1-D series (0 when either does not vary). A 0-d float64 tensor."""
    return correlation_matrix(torch.stack([x.reshape(-1), y.reshape(-1)], 1))[0, 1]


def group_by_correlation(series: Tensor, rho: float = 0.8, min_group: int = 2) -> list[list[int]]:
    """Connected components of the graph linking columns of ``series`` [W, K] whose correlation is >= ``rho``.

    Returns the components with at least ``min_group`` members, each a sorted list of column numbers,
    largest first (ties: smallest first member first).
    """
    k = series.shape[1]
    if k == 0:
        return []
    linked = (correlation_matrix(series) >= rho).cpu()
    parent = list(range(k))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in torch.nonzero(torch.triu(linked, diagonal=1)).tolist():
        ri, rj = root(i), root(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    members: dict[int, list[int]] = {}
    for i in range(k):
        members.setdefault(root(i), []).append(i)
    groups = [m for m in members.values() if len(m) >= min_group]
    return sorted(groups, key=lambda m: (-len(m), m[0]))


@dataclass(frozen=True)
class OpposingPair:
    """Two groups of probe examples whose losses move in anti-phase.

    Attributes:
        a, b: probe positions of the two sides (``a`` holds the smallest position of the two).
        correlation: Pearson correlation of the two sides' mean change series (negative).
        consistency: share of window steps at which the two mean changes have opposite signs.
        share: share of the probe set's absolute loss movement over the window carried by ``a`` and ``b``.
        strength: ``min(1, share / full_share)``.
        score: ``anti * consistency * strength * sharedness * swinginess`` in [0, 1] (module docstring).
        shared: :func:`shared_direction` of the two sides (NaN: no features given, or undefined).
        swing: :func:`relative_swing` of the two sides (NaN: no current losses given).
        followers_a, followers_b: members of the groups found that do not carry the shared direction
            (:func:`shared_carriers`), left out of ``a`` and ``b``; the statistics are those of the whole
            groups.
    """

    a: tuple[int, ...]
    b: tuple[int, ...]
    correlation: float
    consistency: float
    share: float
    strength: float
    score: float
    shared: float = math.nan
    swing: float = math.nan
    followers_a: tuple[int, ...] = ()
    followers_b: tuple[int, ...] = ()


def relative_swing(changes: Tensor, a: Sequence[int], b: Sequence[int], losses: Tensor) -> float:
    """``min over the sides g of mean_s |m_g[s]| / mean_{i in g} L_i``: how far each side's mean loss moves per
    step against its own level (``changes`` [W, N] one-step changes, ``losses`` [N] the current losses).
    NaN where a side's loss level is not positive."""
    d = changes.to(torch.float64)
    level = losses.detach().to(device=d.device, dtype=torch.float64).reshape(-1)
    out = math.inf
    for side in (a, b):
        idx = torch.as_tensor(list(side), dtype=torch.long, device=d.device)
        mean_level = float(level[idx].mean())
        if not mean_level > 0:
            return math.nan
        out = min(out, float(d[:, idx].mean(1).abs().mean()) / mean_level)
    return out


def pair_statistics(changes: Tensor, a: Sequence[int], b: Sequence[int], full_share: float = 0.5,
                    total_movement: float | None = None, *, features: Tensor | None = None,
                    labels: Sequence[Any] | None = None, losses: Tensor | None = None, full_shared: float = 0.5,
                    full_swing: float = 0.1) -> OpposingPair:
    """The pair statistics (see the module docstring) of sides ``a`` and ``b`` of a window of changes [W, N];
    ``features`` [N, H] with ``labels`` give ``shared``, the current ``losses`` [N] give ``swing``."""
    d = changes.to(torch.float64)
    ia = torch.as_tensor(list(a), dtype=torch.long, device=d.device)
    ib = torch.as_tensor(list(b), dtype=torch.long, device=d.device)
    ma, mb = d[:, ia].mean(1), d[:, ib].mean(1)
    corr = float(correlation(ma, mb))
    consistency = float((ma * mb < 0).to(torch.float64).mean())
    total = float(d.abs().sum()) if total_movement is None else total_movement
    share = float((d[:, ia].abs().sum() + d[:, ib].abs().sum()) / total) if total > 0 else 0.0
    strength = min(1.0, share / full_share)
    score = max(0.0, -corr) * consistency * strength
    shared = swing = math.nan
    if features is not None:
        shared = shared_direction(features, a, b, labels)
        score *= min(1.0, max(0.0, shared / full_shared)) if math.isfinite(shared) else 0.0
    if losses is not None:
        swing = relative_swing(d, a, b, losses)
        score *= min(1.0, swing / full_swing) if math.isfinite(swing) else 0.0
    if min(a) > min(b):
        a, b = b, a
    return OpposingPair(tuple(int(i) for i in a), tuple(int(i) for i in b), corr, consistency, share,
                        strength, min(1.0, max(0.0, score)), shared, swing)


@dataclass(frozen=True)
class SignalsReport:
    """What :func:`opposing_signals` finds in one window.

    Attributes:
        changes: W, the number of loss changes in the window.
        outliers: probe positions of the outliers, largest z first.
        z: robust z-score of every example's movement (float64, [N]).
        top1pct_share: :func:`top_share` of the latest change (NaN when nothing changed).
        groups: the outliers' groups, as probe positions (None with fewer than
            :data:`MIN_CHANGES_FOR_PAIRS` changes).
        pairs: the opposing pairs, strongest first (None with fewer than :data:`MIN_CHANGES_FOR_PAIRS`).
    """

    changes: int
    outliers: tuple[int, ...]
    z: Tensor
    top1pct_share: float
    groups: tuple[tuple[int, ...], ...] | None
    pairs: tuple[OpposingPair, ...] | None


def opposing_signals(changes: Tensor, *, features: Tensor | None = None, labels: Sequence[Any] | None = None,
                     losses: Tensor | None = None, z_cut: float = 3.5, rho: float = 0.8, min_group: int = 2,
                     max_outliers: int = 128, full_share: float = 0.5, full_shared: float = 0.5,
                     full_swing: float = 0.1) -> SignalsReport:
    """Outliers, groups and opposing pairs in a window of one-step loss changes (module docstring, steps 1-5).

    Args:
        changes: [W, N], W >= 1 one-step changes of the probe set's N per-example losses, oldest first.
        features: [N, H], each probe example's representation (the model's input representation), for ``shared``.
        labels: each probe example's label (hashable; None where it has none), for ``shared``.
        losses: [N], the current per-example losses, for ``swing``.
        z_cut: robust z-score from which an example's movement makes it an outlier.
        rho: correlation of two outliers' change series from which they are in one group; pairs need a
            correlation of their mean series of at most ``-rho``.
        min_group: smallest group.
        max_outliers: at most this many outliers (the largest z) are grouped.
        full_share, full_shared, full_swing: where strength, sharedness and swinginess reach 1.
    """
    d = changes.detach().to(device="cpu", dtype=torch.float64)
    if d.ndim != 2 or d.shape[0] < 1:
        raise ValueError(f"gradwatch: opposing_signals expected changes [W >= 1, examples], got {tuple(d.shape)}")
    if not torch.isfinite(d).all():
        raise ValueError("gradwatch: opposing_signals got non-finite per-example loss changes")
    w = d.shape[0]
    pos, z = outliers(d, z_cut, max_outliers)
    top1 = float(top_share(d[-1]))
    if w < MIN_CHANGES_FOR_PAIRS:
        return SignalsReport(w, tuple(pos.tolist()), z, top1, None, None)
    cols = group_by_correlation(d[:, pos], rho, min_group)
    groups = [sorted(pos[c].tolist()) for c in cols]
    total = float(d.abs().sum())
    means = torch.stack([d[:, g].mean(1) for g in groups], 1) if groups else d.new_zeros(w, 0)
    corr = correlation_matrix(means)
    pairs = [pair_statistics(d, groups[i], groups[j], full_share, total, features=features, labels=labels,
                             losses=losses, full_shared=full_shared, full_swing=full_swing)
             for i in range(len(groups)) for j in range(i + 1, len(groups)) if corr[i, j] <= -rho]
    if features is not None:
        pairs = [_carriers_only(p, features, labels, min_group) for p in pairs]
    pairs.sort(key=lambda p: (-p.score, p.a[0]))
    return SignalsReport(w, tuple(pos.tolist()), z, top1, tuple(tuple(g) for g in groups), tuple(pairs))


def _carriers_only(pair: OpposingPair, features: Tensor, labels: Sequence[Any] | None, min_group: int) -> OpposingPair:
    """``pair`` with its sides cut to the members that carry its shared direction (:func:`shared_carriers`),
    where it has one and both sides keep at least ``min_group``."""
    if not (math.isfinite(pair.shared) and pair.shared > 0):
        return pair
    kept = shared_carriers(features, pair.a, pair.b, labels)
    if kept is None or min(len(kept[0]), len(kept[1])) < max(1, min_group):
        return pair
    a, b = tuple(kept[0]), tuple(kept[1])
    fa = tuple(i for i in pair.a if i not in set(a))
    fb = tuple(i for i in pair.b if i not in set(b))
    if a[0] > b[0]:
        a, b, fa, fb = b, a, fb, fa
    return replace(pair, a=a, b=b, followers_a=fa, followers_b=fb)


def find_opposing_signals(losses: Tensor, *, features: Tensor | None = None, labels: Sequence[Any] | None = None,
                          **options: Any) -> SignalsReport:
    """:func:`opposing_signals` on losses [T >= 2, N] probed at T consecutive optimizer steps: the changes are
    :func:`loss_changes` and the current losses (for ``swing``) the last row. ``options``: those of
    :func:`opposing_signals`."""
    x = losses.detach().to(device="cpu", dtype=torch.float64)
    if x.ndim != 2:
        raise ValueError(f"gradwatch: losses expected shape [steps, examples], got {tuple(x.shape)}")
    if x.shape[0] < 2:
        raise ValueError(f"gradwatch: find_opposing_signals expected losses at >= 2 probe steps, got {x.shape[0]}")
    if not torch.isfinite(x).all():
        raise ValueError("gradwatch: find_opposing_signals got non-finite per-example losses")
    return opposing_signals(loss_changes(x), features=features, labels=labels, losses=x[-1], **options)


def gradient_cosine(a: Tensor, b: Tensor) -> Tensor:
    """Cosine ``<a, b> / (|a| |b|)`` of two gradients of any (equal) shape, in float64; NaN if either is 0."""
    x, y = a.detach().reshape(-1).to(torch.float64), b.detach().reshape(-1).to(torch.float64)
    den = x.norm() * y.norm()
    if den <= 0:
        return torch.tensor(math.nan, dtype=torch.float64, device=x.device)
    return ((x @ y) / den).clamp(-1.0, 1.0)


def group_gradient_cosine(per_example: Tensor, a: Sequence[int], b: Sequence[int]) -> Tensor:
    """Cosine of the mean per-example gradients of sides ``a`` and ``b``.

    Args:
        per_example: [N, ...], example i's gradient of one weight (e.g. the last layer's) in row i.
        a, b: rows of the two sides.

    A negative value says that the two sides pull the weight in opposite directions (confirming an
    opposing pair). Equal to :func:`gradient_cosine` of the gradients of the two sides' mean losses.
    """
    g = per_example.detach().to(torch.float64)
    ia = torch.as_tensor(list(a), dtype=torch.long, device=g.device)
    ib = torch.as_tensor(list(b), dtype=torch.long, device=g.device)
    return gradient_cosine(g[ia].mean(0), g[ib].mean(0))
