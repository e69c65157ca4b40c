"""The long run, short: every gradwatch family on a tiny GPT-2 for 100 steps, and nothing grows after warm-up.

``benchmarks/long_run.py`` runs 2,000 steps with every cadence at 1 (a step costs seconds there); here the
cheap families (mini-batch spectra, stability, moe) run at every step and the probe families (sharpness,
signals, example quality, per-example spectra) every 5th, with the spectra heatmap every 40 steps (the first
one, which imports matplotlib, inside the warm-up). After the warm-up, resident memory grows by less than
``RSS_BOUND`` MiB per 1,000 steps (least-squares slope) and the open file descriptors, threads, live
gradwatch objects, live tensors and hooks are constant. A planted leak (1 MiB tensor, one gradwatch object,
one forward hook and one open file per step) is caught by the same check, on every count.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import long_run as lr  # noqa: E402

STEPS, SAMPLE_EVERY, WARMUP = 100, 20, 40
RSS_BOUND = 100.0  # MiB per 1,000 steps; the planted 1 MiB/step leak is ~1,000
CONSTANT = ("fds", "threads", "py_threads", "gradwatch_objects", "tensors", "hooks")
SIZE = {"n_layer": 1, "n_embd": 16}
# gc-tracked objects per 1,000 steps: matplotlib's caches take ~26 objects per heatmap over the first ~10
# heatmaps, then none (measured drawing 40 of them); the planted leak adds 5 per step (5,000)
OBJECTS_BOUND = 2000.0


def growth(samples: lr.Samples, warmup: int = WARMUP) -> list[str]:
    """What grew after ``warmup``: RSS beyond ``RSS_BOUND`` MiB per 1,000 steps, any change in the counts of
    ``CONSTANT``, gc-tracked objects beyond ``OBJECTS_BOUND`` per 1,000 steps."""
    said = []
    slope = samples.slope_per_1000(warmup)
    if slope > RSS_BOUND:
        said.append(f"rss_mib: {slope:+.0f} MiB per 1,000 steps, {samples.after('rss_mib', warmup)}")
    said += [f"{k}: {samples.after(k, warmup)}" for k in CONSTANT if len(set(samples.after(k, warmup))) != 1]
    if samples.slope_per_1000(warmup, "objects") > OBJECTS_BOUND:
        said.append(f"objects: {samples.after('objects', warmup)}")
    return said


def _keywords() -> dict[str, Any]:
    from gradwatch import SharpnessConfig, SignalsConfig, SpectraConfig

    small = {"spectra": SpectraConfig(per_example=True, per_example_size=2),
             "sharpness": SharpnessConfig(probe_size=4, max_iter=3, trace_samples=1),
             "signals": SignalsConfig(probe_size=8, window=5, burst=1, batch_size=8)}
    out = lr.every_family_every_step(heatmap_every=40, small=small)
    for key in ("sharpness", "signals", "example_quality"):
        out[key] = dataclasses.replace(out[key], every=5)
    out["spectra"] = dataclasses.replace(out["spectra"], per_example_every=5)
    return out


class PlantedLeak(pl.Callback):
    """Keeps, every step, a 1 MiB tensor, a gradwatch object, a forward hook and an open file."""

    def __init__(self, root: str) -> None:
        self.root, self.kept, self.files = root, [], []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        from gradwatch.cadence import Cadence

        module = trainer.lightning_module
        self.kept += [torch.ones(2**18), Cadence.every(3), module.register_forward_hook(lambda *a: None)]
        self.files.append(open(os.path.join(self.root, f"f{trainer.global_step}"), "w"))  # noqa: SIM115

    def close(self) -> None:
        for f in self.files:
            f.close()


def test_every_family_for_100_steps_grows_nothing_after_warm_up(tmp_path):
    s = lr.long_run(str(tmp_path), STEPS, SAMPLE_EVERY, batch=4, gradwatch=_keywords(), size=SIZE)
    assert s.steps == tuple(range(SAMPLE_EVERY, STEPS + 1, SAMPLE_EVERY))
    assert growth(s) == [], s.counts
    assert s.counts["gradwatch_objects"][-1] > 0 and s.counts["fds"][-1] > 0  # the counts see something
    assert not [w for w in s.warnings if "failed" in w], s.warnings


def test_a_planted_leak_is_caught_on_every_count(tmp_path):
    leak = PlantedLeak(str(tmp_path))
    try:
        s = lr.long_run(str(tmp_path), STEPS, SAMPLE_EVERY, batch=4, gradwatch={}, callbacks=[leak], size=SIZE)
    finally:
        leak.close()
    said = growth(s)
    assert [x.split(":")[0] for x in said] == ["rss_mib", "fds", "gradwatch_objects", "tensors", "hooks", "objects"], said
    assert s.slope_per_1000(WARMUP) == pytest.approx(1000, rel=0.3)  # 1 MiB a step, measured as such
