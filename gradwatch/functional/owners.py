"""Work split over ranks: each item (a layer) gets one owner rank, balanced by cost."""

from __future__ import annotations

from collections.abc import Sequence


def spectrum_cost(rows: int, cols: int) -> float:
    """Flops of one layer's spectrum: min(p, q)^2 * max(p, q) (the Gram, and the eigensolver's r^3 for the
    square ones)."""
    return float(min(rows, cols)) ** 2 * float(max(rows, cols))


def balanced_owners(costs: Sequence[float], parts: int) -> list[int]:
    """The owner (0..parts-1) of each item: greedy longest-processing-time first (Graham 1969): items by
    decreasing cost (ties: lower index first) each go to the least loaded part (ties: the lowest part).
    Deterministic, so every rank computes the same answer; the most loaded part carries at most 4/3 of the
    optimum's load."""
    if parts < 1:
        raise ValueError(f"gradwatch: `parts` expected an int >= 1, got {parts!r}")
    load = [0.0] * parts
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-float(costs[i]), i)):
        r = min(range(parts), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += float(costs[i])
    return owners


__all__ = ["balanced_owners", "spectrum_cost"]
