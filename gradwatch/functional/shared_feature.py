"""Whether two groups of probe examples share a feature, read in the model's representation.

Part of the opposing-signals detector (:mod:`gradwatch.functional.signals`, Rosenfeld and Risteski 2023):
an opposing signal is two groups that carry one feature the rest of the data lacks while their labels
differ, so both deviate from the rest of their own class in the same direction of the representation
``h`` (the metric uses the model's input representation). The two sides of a decision margin deviate toward each other's class.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["shared_carriers", "shared_direction", "side_deviations"]


def side_deviations(features: Tensor, a: Sequence[int], b: Sequence[int],
                    labels: Sequence[Any] | None = None) -> tuple[Tensor, Tensor] | None:
    """Each member's deviation from the rest of its own class, ``e_i = h_i - mean{h_j : y_j = y_i, j not in
    a u b}``, for the two sides: ([|a|, H], [|b|, H]) in float64, or None where a side's members of a class
    are at least as many as the rest of that class (more than half of it: no reference is left) or fewer than
    two references remain. ``labels`` None (or a label None): the rest of the whole probe set."""
    h = features.detach().to(device="cpu", dtype=torch.float64).reshape(features.shape[0], -1)
    n = h.shape[0]
    outside = torch.ones(n, dtype=torch.bool)
    outside[list(a)] = False
    outside[list(b)] = False
    keys = [None] * n if labels is None else list(labels)
    if len(keys) != n:
        raise ValueError(f"gradwatch: shared_direction got {len(keys)} labels for {n} feature rows")
    means: dict[Any, Tensor] = {}
    for key in {keys[i] for i in (*a, *b)}:
        rest = outside if key is None else outside & torch.tensor([k == key for k in keys])
        count = int(rest.sum())
        if count < max(2, sum(keys[i] == key for i in a), sum(keys[i] == key for i in b)):
            return None
        means[key] = h[rest].mean(0)
    return (torch.stack([h[i] - means[keys[i]] for i in a]), torch.stack([h[i] - means[keys[i]] for i in b]))


def shared_direction(features: Tensor, a: Sequence[int], b: Sequence[int], labels: Sequence[Any] | None = None) -> float:
    """Cosine of the two sides' mean deviations from the rest of their own class in a representation.

    ``d_g = mean_{i in g} (h_i - mean{h_j : y_j = y_i, j not in a u b})`` for ``features`` h [N, H] (one row
    per probe example) and ``labels`` y (None, or a label None: the rest of the whole probe set is the
    reference); returns ``cos(d_a, d_b)`` in [-1, 1]. NaN where :func:`side_deviations` is undefined or a
    deviation is 0.
    """
    e = side_deviations(features, a, b, labels)
    if e is None:
        return math.nan
    da, db = e[0].mean(0), e[1].mean(0)
    den = float(da.norm() * db.norm())
    return float((da @ db) / den) if den > 0 else math.nan


def shared_carriers(features: Tensor, a: Sequence[int], b: Sequence[int],
                    labels: Sequence[Any] | None = None) -> tuple[list[int], list[int]] | None:
    """The members of each side that carry the pair's shared direction ``u = d_a / |d_a| + d_b / |d_b|``
    (normalised): those whose own deviation projected on u, ``<e_i, u>``, is at least half the upper quartile
    of their side's projections (the quartile, not the median, so that followers up to half of a side do not
    drag the cut down to themselves). The others moved with the group without sharing its feature (in the
    planted cases: hard examples of the same class that the shared feature's swings carry along). None where the deviations
    are undefined or do not share a direction (``cos(d_a, d_b) <= 0``)."""
    e = side_deviations(features, a, b, labels)
    if e is None:
        return None
    da, db = e[0].mean(0), e[1].mean(0)
    if not (da.norm() > 0 and db.norm() > 0) or float(da @ db) <= 0:
        return None
    u = da / da.norm() + db / db.norm()
    u = u / u.norm()
    kept = []
    for side, dev in ((a, e[0]), (b, e[1])):
        proj = dev @ u
        cut = 0.5 * float(torch.quantile(proj, 0.75))
        kept.append([int(i) for i, p in zip(side, proj.tolist()) if p >= cut])
    return kept[0], kept[1]
