"""Compare two scorings of one model (two datasets): the relative difference RD per layer group.

RD is the definition gradwatch uses for runs (``gradwatch compare`` on run directories; REFERENCE.md section 1),
after Li et al. 2024/2025, who compare two datasets' per-layer gradient statistics by their relative difference:
for a statistic and a layer group with matrices l = 1..L, ``a_l`` and ``b_l`` are matrix l's statistic averaged
over the examples of scoring A (the reference) and of scoring B, and

    RD = (1/L) * sum_l |a_l - b_l| / |a_l|

over the matrices with finite a_l, b_l and a_l != 0. It is relative to A: swapping the scorings changes it.
The table also shows both scorings' group means and the signed change of the group mean, (mean_b - mean_a) /
|mean_a|, which says in which direction B differs.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gradwatch.scoring.score import KIND, RUN_FILE, SUMMARY_FILE


@dataclass(frozen=True)
class Scoring:
    path: Path
    run: dict[str, Any]
    summary: dict[str, Any]


@dataclass(frozen=True)
class GroupDifference:
    statistic: str
    group: str
    mean_a: float
    mean_b: float
    change: float  # (mean_b - mean_a) / |mean_a|
    rd: float
    matrices_used: int


def is_scoring(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a ``score-data`` output directory (or its summary.json / scores.jsonl)."""
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    summary = folder / SUMMARY_FILE
    if not summary.is_file():
        return False
    try:
        return json.loads(summary.read_text(encoding="utf-8")).get("kind") == KIND
    except (OSError, ValueError):
        return False


def load_scoring(path: str | os.PathLike) -> Scoring:
    """Read a ``score-data`` output directory (a path to one of its files is taken as its directory).

    Raises:
        ValueError: not a finished scoring.
    """
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    if not is_scoring(folder):
        raise ValueError(f"{path} is not the output of gradwatch score-data (no {SUMMARY_FILE} of kind {KIND!r}); "
                         f"run gradwatch score-data MODEL DATASET -o DIR first")
    run = json.loads((folder / RUN_FILE).read_text(encoding="utf-8"))
    summary = json.loads((folder / SUMMARY_FILE).read_text(encoding="utf-8"))
    return Scoring(folder, run, summary)


def relative_difference(a: Sequence[float | None], b: Sequence[float | None]) -> tuple[float, int]:
    """``(RD, n)``: mean over the n entries with finite a_l, b_l and a_l != 0 of |a_l - b_l| / |a_l| (NaN if n = 0)."""
    x = np.array([math.nan if v is None else v for v in a], dtype=np.float64)
    y = np.array([math.nan if v is None else v for v in b], dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y) & (x != 0)
    if not keep.any():
        return math.nan, 0
    return float(np.mean(np.abs(x[keep] - y[keep]) / np.abs(x[keep]))), int(keep.sum())


def compare_scorings(a: Scoring, b: Scoring, groups: Sequence[str] | None = None) -> list[GroupDifference]:
    """RD and the group means per statistic and layer group (``groups``: default all of them).

    Raises:
        ValueError: the scorings are of different models (different scored matrices) or objectives.
    """
    if a.summary["matrices"] != b.summary["matrices"]:
        raise ValueError(f"{a.path} and {b.path} score different matrices (different models): RD compares two "
                         f"datasets on one model")
    if a.summary["objective"] != b.summary["objective"]:
        raise ValueError(f"{a.path} uses the {a.summary['objective']} loss and {b.path} the {b.summary['objective']} "
                         f"loss: their gradients are not comparable")
    all_groups = a.run["groups"]
    chosen = [g for g in groups if g in all_groups] if groups is not None else list(all_groups)
    out = []
    for stat in a.summary["per_layer"]:
        for g in chosen:
            rows = all_groups[g]
            la, lb = a.summary["per_layer"][stat], b.summary["per_layer"][stat]
            rd, used = relative_difference([la[j] for j in rows], [lb[j] for j in rows])
            ma = a.summary["groups"][stat][g].get("mean", math.nan)
            mb = b.summary["groups"][stat][g].get("mean", math.nan)
            change = (mb - ma) / abs(ma) if ma not in (0, None) and math.isfinite(ma) else math.nan
            out.append(GroupDifference(stat, g, ma, mb, change, rd, used))
    return out


def format_differences(diffs: Sequence[GroupDifference], a: Scoring, b: Scoring) -> str:
    """A plain-text table: statistic, group, mean A, mean B, signed change of the mean, RD."""
    rows = [("statistic", "group", "mean A", "mean B", "change", "RD", "matrices")]
    for d in diffs:
        rows.append((d.statistic, d.group, f"{d.mean_a:.5g}", f"{d.mean_b:.5g}", f"{d.change:+.2%}",
                     "nan" if math.isnan(d.rd) else f"{d.rd:.4g}", str(d.matrices_used)))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = [f"A = {a.path} ({a.summary['dataset']}, {a.summary['scored']} examples)",
             f"B = {b.path} ({b.summary['dataset']}, {b.summary['scored']} examples)",
             "RD = mean over the group's matrices l of |a_l - b_l| / |a_l|, a_l, b_l: matrix l's mean over A's and "
             "B's examples; change = (mean B - mean A) / |mean A| of the group mean", ""]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)
