"""``benchmarks/overhead.py``'s lock-step pairs and its verdict on wall share against gradwatch's own clock.

The verdict is what the README's overhead figures rest on, so its arithmetic is checked against the
t-interval written out by hand; a lock-step pair must really alternate (no step of one run overlaps a step of
the other) and still train both runs to bitwise the same weights.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import pytest
import torch
from torch.utils.data import TensorDataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import overhead  # noqa: E402


def test_verdict_is_the_95_percent_t_interval_against_the_tolerance() -> None:
    diffs = [0.1, -0.1, 0.2, -0.2]
    mean, half, verdict = overhead.agreement(diffs)
    sd = math.sqrt((0.01 + 0.01 + 0.04 + 0.04) / 3)
    assert mean == pytest.approx(0.0, abs=1e-12)
    assert half == pytest.approx(3.182446305284263 * sd / 2, rel=1e-9)  # t(0.975, 3 degrees of freedom)
    assert verdict == "yes"
    assert overhead.agreement([3.0, 3.2, 2.8, 3.1])[2] == "NO"  # wholly outside 1 pp
    assert overhead.agreement([-3.0, -3.2, -2.8, -3.1])[2] == "NO"
    wide = overhead.agreement([2.0, -2.0, 1.5, -1.5])
    assert wide[2].startswith("unresolved, ~") and wide[1] > 1.0
    assert int(wide[2].split("~")[1].split()[0]) > 4  # more pairs would be needed
    assert overhead.agreement([1.5, -1.0, 4.0, 0.0])[2] == "unresolved, mean outside"
    assert overhead.agreement([0.5])[2] == "unresolved, 1 pair"


@pytest.mark.skipif(sys.platform != "linux", reason="fork and sched_setaffinity: Linux")
@pytest.mark.parametrize("mode", ["processes", "threads"])
def test_lockstep_pair_alternates_steps_and_trains_identically(tmp_path, mode: str, monkeypatch) -> None:
    steps = 6
    if mode == "threads":
        monkeypatch.setitem(overhead.DROPOUT, "p", 0.0)  # what --lockstep threads sets: one global RNG for both
    overhead.FAMILIES.clear()
    overhead.FAMILIES.update(overhead.family_settings(["spectra"], False))
    overhead.HOST["name"] = "lightning"
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randint(0, 64, (4 * steps, 16), generator=g))
    args = argparse.Namespace(steps=steps, batch=4, seed=0, lockstep=mode, concurrent=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what --lockstep sets; the forked runs inherit it
    try:
        base, ours = overhead.paired_runs("demo", data, args, str(tmp_path), "t", 1)  # pair 1: gradwatch first
    finally:
        torch.set_num_threads(threads)
    assert base.weights.keys() == ours.weights.keys()
    assert all(torch.equal(base.weights[k], ours.weights[k]) for k in base.weights)
    b = list(zip(base.timer.starts, base.timer.ends))
    o = list(zip(ours.timer.starts, ours.timer.ends))
    assert len(b) == len(o) == steps
    turns = sorted([(s, e, "base") for s, e in b] + [(s, e, "ours") for s, e in o])
    assert [t[2] for t in turns] == ["ours", "base"] * steps  # strictly alternating, gradwatch first
    assert all(e1 <= s2 for (_, e1, _), (s2, _, _) in zip(turns, turns[1:]))  # no two steps at once
    assert base.seconds == pytest.approx(sum(e - s for s, e in b))  # a run's time is its own steps' only
    assert 0 < ours.own < ours.seconds
