"""Comparing two runs layer by layer: the relative difference (RD) of each statistic and layer family.

Run comparison follows the seed papers (Li et al. 2024, fast vs. slow thinking; "How instruction and
reasoning data shape post-training", 2025), which compare runs by each layer's statistic: for a statistic
and a layer family (parameter names with their layer index replaced by ``*``),

    a_l = mean over run A's logged steps of layer l's statistic,   b_l likewise for run B,
    RD  = (1 / |L|) sum_{l in L} |a_l - b_l| / |a_l|,

where L are the family's layers logged in both runs whose averages are finite with a_l != 0 (a NaN step,
logged when a layer's gradient was not finite, is left out of that layer's average). Averaging each layer
over the whole run first compares the runs' typical per-layer profiles and does not need the two runs to
have logged the same steps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gradwatch.integrations.report.runs import Run, RunDirError, spectrum_tag


def layer_means(run: Run, stat: str, params: Sequence[str]) -> np.ndarray:
    """Each layer's statistic averaged over its logged steps (non-finite values left out; NaN if none)."""
    out = np.full(len(params), np.nan)
    for i, p in enumerate(params):
        v = run.scalars[spectrum_tag(stat, p)].values
        v = v[np.isfinite(v)]
        if v.size:
            out[i] = v.mean()
    return out


def relative_difference(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    """``(RD, n)``: mean over layers of |a_l - b_l| / |a_l|, over the n layers with finite a_l, b_l and
    a_l != 0 (RD is NaN when n = 0)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    keep = np.isfinite(a) & np.isfinite(b) & (a != 0)
    if not keep.any():
        return math.nan, 0
    return float(np.mean(np.abs(a[keep] - b[keep]) / np.abs(a[keep]))), int(keep.sum())


@dataclass(frozen=True)
class Comparison:
    """One statistic and layer family compared between two runs."""

    statistic: str
    family: str
    params: tuple[str, ...]  # layers logged in both runs, in model order
    a: np.ndarray  # per-layer averages over run A's steps
    b: np.ndarray
    rd: float
    layers_used: int  # layers in RD (finite averages, a_l != 0)
    only_a: tuple[str, ...] = ()
    only_b: tuple[str, ...] = ()


def compare_runs(run_a: Run, run_b: Run) -> list[Comparison]:
    """Per statistic and layer family logged by both runs: both runs' per-layer averages and their RD.

    Raises:
        RunDirError: the runs have no per-layer spectrum statistic (and layer family) in common.
    """
    spectra_a, spectra_b = run_a.spectra(), run_b.spectra()
    out = []
    for stat, families in spectra_a.items():
        for family, params_a in families.items():
            params_b = spectra_b.get(stat, {}).get(family)
            if not params_b:
                continue
            common = [p for p in params_a if p in set(params_b)]
            if not common:
                continue
            a, b = layer_means(run_a, stat, common), layer_means(run_b, stat, common)
            rd, used = relative_difference(a, b)
            out.append(Comparison(stat, family, tuple(common), a, b, rd, used,
                                  tuple(p for p in params_a if p not in set(common)),
                                  tuple(p for p in params_b if p not in set(common))))
    if not out:
        def describe(run: Run, spectra: dict) -> str:
            n = sum(len(ps) for fams in spectra.values() for ps in fams.values())
            return f"{str(run.path)!r} has {n} per-layer spectrum series" + (
                f" ({', '.join(sorted(spectra))})" if spectra else "")

        raise RunDirError(f"nothing to compare: the runs log no per-layer gradient-spectrum statistic "
                          f"(grad_spectrum/<stat>/<param>) for the same layers; {describe(run_a, spectra_a)}, "
                          f"{describe(run_b, spectra_b)}")
    return out


def format_comparison_table(comparisons: Sequence[Comparison]) -> str:
    """A plain-text table: statistic, layer family, layers, RD."""
    header = ("statistic", "family", "layers", "RD")
    rows = [(c.statistic, c.family, str(c.layers_used), "nan" if math.isnan(c.rd) else f"{c.rd:.4g}")
            for c in comparisons]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
             for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
