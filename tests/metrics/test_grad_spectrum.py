"""GradSpectrum: the Metric contract (update, compute, reset, state_dict, device/dtype moves) and its layout."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from _support.references import svd_statistics

from gradwatch.config import Cadence, SpectraConfig, WatchConfig
from gradwatch.engine.layers import WatchedMatrix
from gradwatch.functional.spectra import STATISTICS
from gradwatch.integrations.tensorboard import custom_scalar_layout
from gradwatch.metrics import BUILTIN_FAMILIES, GradSpectrum, PerExampleGradSpectrum
from gradwatch.metrics.base import Heatmap
from gradwatch.metrics.grad_spectrum import FAMILY as SPECTRA
from gradwatch.registry import BuildInputs

# two layer families of two layers each, and one lone layer (no MAD for it)
TAGS = ["model.layers.0.q.weight", "model.layers.1.q.weight", "model.layers.0.up.weight",
        "model.layers.1.up.weight", "head.weight"]
FAMILIES = ["model.layers.*.q.weight", "model.layers.*.q.weight", "model.layers.*.up.weight",
            "model.layers.*.up.weight", "head.weight"]
SHAPES = [(8, 8), (8, 8), (12, 8), (12, 8), (3, 8)]


def random_update(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*sh, generator=gen) * (i + 1) for i, sh in enumerate(SHAPES)]


def make(**kw) -> GradSpectrum:
    return GradSpectrum(TAGS, FAMILIES, STATISTICS, **kw)


def expected_means(updates: list[list[torch.Tensor | None]]) -> dict[str, list[float]]:
    """Per stat, per layer: mean over the updates where the layer was given and finite."""
    out = {}
    for stat in STATISTICS:
        row = []
        for layer in range(len(TAGS)):
            vals = [svd_statistics(u[layer])[stat] for u in updates
                    if u[layer] is not None and torch.isfinite(u[layer]).all()]
            row.append(float(np.mean(vals)) if vals else math.nan)
        out[stat] = row
    return out


def test_update_twice_compute_is_mean() -> None:
    metric = make()
    u1, u2 = random_update(1), random_update(2)
    metric.update(u1)
    metric.update(u2, list(range(len(TAGS))))
    out = metric.compute()
    want = expected_means([u1, u2])
    for stat in STATISTICS:
        for layer, tag in enumerate(TAGS):
            got = out[f"grad_spectrum/{stat}/{tag}"]
            assert got.dtype == torch.float64 and got.ndim == 0
            assert got.item() == pytest.approx(want[stat][layer], rel=1e-9), (stat, tag)
        # MAD over each two-layer family, from the means
        q = want[stat][:2]
        up = want[stat][2:4]
        assert out[f"grad_spectrum/mad/{stat}/model.layers.*.q.weight"].item() == pytest.approx(
            abs(q[1] - q[0]), rel=1e-9)
        assert out[f"grad_spectrum/mad/{stat}/model.layers.*.up.weight"].item() == pytest.approx(
            abs(up[1] - up[0]), rel=1e-9)
    assert out["grad_spectrum/nonfinite_layers"].item() == 0.0


def test_mad_over_three_layers() -> None:
    tags = [f"blocks.{i}.w" for i in range(3)]
    metric = GradSpectrum(tags, ["blocks.*.w"] * 3, ["spectral_norm"])
    metric.update([torch.eye(4) * 1.0, torch.eye(4) * 4.0, torch.eye(4) * 2.0])
    out = metric.compute()
    assert out["grad_spectrum/mad/spectral_norm/blocks.*.w"].item() == pytest.approx((3.0 + 2.0) / 2)
    assert sorted(out) == sorted([f"grad_spectrum/spectral_norm/{t}" for t in tags]
                                 + ["grad_spectrum/mad/spectral_norm/blocks.*.w", "grad_spectrum/nonfinite_layers"])


def test_partial_updates_with_indices() -> None:
    """A layer without a gradient in an update is averaged over the updates that had it."""
    metric = make(mad=False)
    u1, u2 = random_update(3), random_update(4)
    metric.update(u1)
    metric.update([u2[4], u2[1]], [4, 1])
    out = metric.compute()
    want = expected_means([u1, [None, u2[1], None, None, u2[4]]])
    for stat in STATISTICS:
        for layer, tag in enumerate(TAGS):
            assert out[f"grad_spectrum/{stat}/{tag}"].item() == pytest.approx(want[stat][layer], rel=1e-9)
    assert not any("/mad/" in k for k in out)


def test_reset_clears() -> None:
    metric = make()
    metric.update(random_update(1))
    metric.reset()
    assert torch.count_nonzero(metric.total) == 0 and torch.count_nonzero(metric.count) == 0
    assert metric.updates.item() == 0 and metric.nonfinite.item() == 0
    u = random_update(7)
    metric.update(u)
    out = metric.compute()
    want = expected_means([u])
    for stat in STATISTICS:
        for layer, tag in enumerate(TAGS):
            assert out[f"grad_spectrum/{stat}/{tag}"].item() == pytest.approx(want[stat][layer], rel=1e-9)


@pytest.mark.filterwarnings("ignore:.*compute.*before.*update")
def test_compute_without_updates_is_nan() -> None:
    out = make().compute()
    assert all(math.isnan(v.item()) for k, v in out.items() if k != "grad_spectrum/nonfinite_layers")
    assert out["grad_spectrum/nonfinite_layers"].item() == 0.0


def test_nonfinite_layer_left_out_of_its_mean() -> None:
    metric = make()
    u1, u2, u3 = random_update(1), random_update(2), random_update(3)
    u2[1] = u2[1].clone()
    u2[1][0, 0] = float("inf")
    u3[3] = u3[3].clone()
    u3[3][1, 1] = float("nan")
    for u in (u1, u2, u3):
        metric.update(u)
    out = metric.compute()
    want = expected_means([u1, u2, u3])
    for stat in STATISTICS:
        for layer, tag in enumerate(TAGS):
            assert math.isfinite(out[f"grad_spectrum/{stat}/{tag}"].item())
            assert out[f"grad_spectrum/{stat}/{tag}"].item() == pytest.approx(want[stat][layer], rel=1e-9)
        # layer 1 is the mean of updates 1 and 3 only
        assert out[f"grad_spectrum/{stat}/{TAGS[1]}"].item() == pytest.approx(
            (svd_statistics(u1[1])[stat] + svd_statistics(u3[1])[stat]) / 2, rel=1e-9)
    # two non-finite layer-steps over three updates
    assert out["grad_spectrum/nonfinite_layers"].item() == pytest.approx(2 / 3)
    assert metric.nonfinite.item() == 2 and metric.updates.item() == 3


def test_layer_never_finite_is_nan() -> None:
    metric = make()
    u = random_update(1)
    u[0] = torch.full((8, 8), float("nan"))
    metric.update(u)
    out = metric.compute()
    assert math.isnan(out[f"grad_spectrum/nuclear_norm/{TAGS[0]}"].item())
    assert math.isfinite(out[f"grad_spectrum/nuclear_norm/{TAGS[1]}"].item())
    assert math.isnan(out["grad_spectrum/mad/nuclear_norm/model.layers.*.q.weight"].item())
    assert out["grad_spectrum/nonfinite_layers"].item() == 1.0


def test_mad_only_for_families_of_two_or_more() -> None:
    metric = make()
    metric.update(random_update(5))
    keys = set(metric.compute())
    mad = {k for k in keys if "/mad/" in k}
    assert mad == {f"grad_spectrum/mad/{s}/{f}" for s in STATISTICS
                   for f in ("model.layers.*.q.weight", "model.layers.*.up.weight")}
    assert not any("head.weight" in k for k in mad)
    no_mad = make(mad=False)
    no_mad.update(random_update(5))
    assert not any("/mad/" in k for k in no_mad.compute())


@pytest.mark.filterwarnings("ignore:.*compute.*called before")
def test_state_dict_round_trip() -> None:
    metric = make()
    metric.update(random_update(1))
    u2 = random_update(2)
    u2[2] = u2[2].clone()
    u2[2][0, 0] = float("nan")
    metric.update(u2)
    state = metric.state_dict()
    assert set(state) >= {"total", "count", "nonfinite", "updates"}
    fresh = make()
    fresh.load_state_dict(state)
    a, b = metric.compute(), fresh.compute()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], equal_nan=True, rtol=0, atol=0)
    # the restored metric keeps accumulating from where it was
    u3 = random_update(3)
    metric.update(u3)
    fresh.update(u3)
    for k, v in metric.compute().items():
        torch.testing.assert_close(v, fresh.compute()[k], equal_nan=True, rtol=0, atol=0)


def test_to_dtype_and_device() -> None:
    u1, u2 = random_update(1), random_update(2)
    ref = make()
    ref.update(u1)
    ref.update(u2)
    want = ref.compute()

    metric = make().to("cpu")
    assert metric.total.device.type == "cpu"
    metric = metric.to(torch.float32)
    assert metric.total.dtype == torch.float32
    metric.update(u1)
    metric.update(u2)
    got = metric.compute()
    for k, v in want.items():
        assert got[k].dtype == torch.float32
        assert got[k].item() == pytest.approx(v.item(), rel=1e-5), k

    single = make()
    single.set_dtype(torch.float32)
    single.update(u1)
    assert single.total.dtype == torch.float32

    if torch.cuda.is_available():
        cuda = make().to("cuda")
        cuda.update([m.cuda() for m in u1])
        cuda.update([m.cuda() for m in u2])
        for k, v in cuda.compute().items():
            assert v.device.type == "cuda"
            assert v.item() == pytest.approx(want[k].item(), rel=1e-9), k


def _matched(layout: dict, tag: str) -> list[tuple[str, str]]:
    hits = []
    for category, charts in layout.items():
        for title, (kind, regexes) in charts.items():
            assert kind == "Multiline"
            if any(re.search(r, tag) for r in regexes):
                hits.append((category, title))
    return hits


def test_layout_matches_compute_tags() -> None:
    metric = make()
    metric.update(random_update(1))
    keys = set(metric.compute())
    layout = custom_scalar_layout(metric.charts())
    # one chart per (stat, family), in a category per stat
    for stat in STATISTICS:
        charts = layout[f"grad_spectrum/{stat}"]
        assert set(charts) == {f"{stat} | {f}" for f in dict.fromkeys(FAMILIES)}
        for fam in dict.fromkeys(FAMILIES):
            regexes = charts[f"{stat} | {fam}"][1]
            matched = {k for k in keys if any(re.search(r, k) for r in regexes)}
            assert matched == {f"grad_spectrum/{stat}/{t}" for t, f in zip(TAGS, FAMILIES) if f == fam}
    # every regex matches exactly one tag compute() returns, and every per-layer or MAD tag is on one chart
    all_regexes = [r for charts in layout.values() for _, rs in charts.values() for r in rs]
    for r in all_regexes:
        assert sum(bool(re.search(r, k)) for k in keys) == 1, r
    for k in keys - {"grad_spectrum/nonfinite_layers"}:
        assert len(_matched(layout, k)) == 1, k
    # regexes are anchored: layer 1 must not catch layer 11, a prefix must not catch a longer name
    assert not any(re.search(r, "grad_spectrum/nuclear_norm/model.layers.11.q.weight") for r in all_regexes)
    assert not any(re.search(r, "grad_spectrum/nuclear_norm/head.weight.q") for r in all_regexes)
    # MAD charts name exactly the MAD tags
    mad_regexes = [r for _, rs in layout["grad_spectrum/mad"].values() for r in rs]
    assert {k for k in keys if any(re.search(r, k) for r in mad_regexes)} == {k for k in keys if "/mad/" in k}
    assert "grad_spectrum/mad" not in custom_scalar_layout(make(mad=False).charts())


def test_heatmaps() -> None:
    metric = make(heatmap_every=Cadence.every(5))
    specs = [c for c in metric.charts() if isinstance(c, Heatmap)]
    assert all(s.every == Cadence.every(5) for s in specs)
    assert not any(isinstance(c, Heatmap) for c in make().charts())  # heatmap_every=None: none
    assert [s.name for s in specs] == [f"grad_spectrum/heatmap/{s}" for s in STATISTICS]
    assert specs[0].rows == tuple(f"grad_spectrum/nuclear_norm/{t}" for t in TAGS)
    assert specs[0].labels == tuple(TAGS)
    assert [s.log_scale for s in specs] == [True, True, True, False, False, False]


def test_tags_and_families_must_match() -> None:
    with pytest.raises(ValueError, match="got 2 tags but 1 families"):
        GradSpectrum(["a", "b"], ["a"], ["nuclear_norm"])


def test_family_builds_the_diagnostics() -> None:
    watched = [WatchedMatrix(t, t, "linear") for t in TAGS]
    assert SPECTRA in BUILTIN_FAMILIES and SPECTRA.key == "spectra" and SPECTRA.stem == "grad_spectrum"
    assert WatchConfig(spectra=False).spectra is None and "spectra" not in WatchConfig(spectra=False).families

    def build(cfg: WatchConfig, matrices: list) -> list:
        return list(SPECTRA.build(cfg.spectra, BuildInputs(cfg, matrices, None)))

    assert build(WatchConfig(), []) == []
    cfg = WatchConfig(spectra=SpectraConfig(every=7, stats=["top1_ratio"], method="svdvals", mad=False))
    (metric,) = build(cfg, watched)
    assert metric.tags == tuple(TAGS) and metric.families == tuple(FAMILIES)
    assert metric.stats == ("top1_ratio",) and metric.method == "svdvals" and metric.mad is False
    assert metric.observe_cadence() == Cadence.every(7) and metric.log_cadence() is None
    assert {c.every for c in metric.charts() if isinstance(c, Heatmap)} == {Cadence.every(500)}
    both = build(WatchConfig(spectra=SpectraConfig(per_example=True, per_example_size=3)), watched)
    assert [type(m) for m in both] == [GradSpectrum, PerExampleGradSpectrum]
    assert both[1].num_examples == 3 and both[1].prefix == "grad_spectrum/per_example"
    assert both[1].probe_size() == 3 and both[0].probe_size() == 0
    assert not any(isinstance(c, Heatmap) for c in both[1].charts())


def test_empty_update_counts() -> None:
    metric = make()
    metric.update(random_update(1))
    metric.update([], [])
    assert metric.updates.item() == 2
    out = metric.compute()
    want = expected_means([random_update(1)])
    assert out[f"grad_spectrum/nuclear_norm/{TAGS[0]}"].item() == pytest.approx(want["nuclear_norm"][0], rel=1e-9)
