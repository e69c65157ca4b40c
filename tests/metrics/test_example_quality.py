"""The live data-quality family: each probe example's own gradient statistics (against a float64 reference taken
one example at a time), their distribution, and the decoded examples at both tails."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.engine import Watcher
from gradwatch.engine.context import extra_pass
from gradwatch.engine.layers import discover_matrices
from gradwatch.engine.probe import ProbeSet
from gradwatch.metrics.base import Results
from gradwatch.metrics.example_quality import ExampleQuality, ExampleQualityConfig

STATS = ("nuclear_norm", "effective_rank", "spectral_norm", "stable_rank")


class SequenceNet(nn.Module):
    """Class logits from a sequence of 5 vectors (a per-example gradient of rank up to 5, not 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).mean(-2)


def model_and_probe(n: int = 8) -> tuple[nn.Module, ProbeSet]:
    torch.manual_seed(0)
    model = SequenceNet()
    data = [(torch.randn(5, 6), torch.tensor(i % 3)) for i in range(n)]
    probe = ProbeSet.from_dataset(data, n, device=torch.device("cpu"),
                                  decode=lambda ex: f"label {int(ex[1])} x00 {float(ex[0][0, 0]):.4f}")
    return model, probe


class Ctx:
    """The parts of the engine's step context the diagnostic reads."""

    step = 1

    def __init__(self, model: nn.Module, probe: ProbeSet) -> None:
        self.model, self._probe = model, probe
        self.watched = discover_matrices(model).matrices

    def probe(self) -> ProbeSet:
        return self._probe

    def extra_pass(self, *, grad: bool = True, float32: bool = True):
        return extra_pass(self.model, grad=grad, float32=float32)


def reference(model: nn.Module, probe: ProbeSet) -> dict[str, list[float]]:
    """Per example, the mean over the watched matrices of each statistic of its own gradient (float64 SVD)."""
    params = [p for n, p in model.named_parameters() if n.endswith("weight")]
    out: dict[str, list[float]] = {s: [] for s in STATS}
    for batch in probe.example_batches():
        grads = torch.autograd.grad(probe.per_example_loss(model, batch).sum(), params)
        per = {s: [] for s in STATS}
        for g in grads:
            s = torch.linalg.svdvals(g.double())
            p = s / s.sum()
            per["nuclear_norm"].append(float(s.sum()))
            per["spectral_norm"].append(float(s[0]))
            per["stable_rank"].append(float((s * s).sum() / s[0] ** 2))
            per["effective_rank"].append(float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum())))
        for stat in STATS:
            out[stat].append(sum(per[stat]) / len(per[stat]))
    return out


@pytest.mark.parametrize("use_vmap", [True, False], ids=["vmap", "loop"])
def test_distribution_and_tails_equal_a_float64_reference(use_vmap: bool) -> None:
    model, probe = model_and_probe()
    ctx = Ctx(model, probe)
    d = ExampleQuality([w.tag for w in ctx.watched], [w.family for w in ctx.watched], STATS, every=1, num_examples=8,
                       tails=2, rank_by="effective_rank")
    d.use_vmap = use_vmap
    d.observe(ctx)
    res = Results.of(d.compute())
    want = reference(model, probe)
    for s, stat in enumerate(STATS):
        got = res.vectors[f"example_quality/{stat}"].tolist()
        assert len(got) == 8 and all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(got, want[stat])), stat
        v = torch.tensor(want[stat], dtype=torch.float64)
        assert float(res.scalars[f"example_quality/{stat}/median"]) == pytest.approx(float(v.quantile(0.5)), rel=1e-5)
        assert float(res.scalars[f"example_quality/{stat}/max"]) == pytest.approx(float(v.max()), rel=1e-5)
    text = res.texts["example_quality/tails"]
    erank = want["effective_rank"]
    order = sorted(range(8), key=lambda k: erank[k])
    low, high = order[:2], order[::-1][:2]
    lines = [line for line in text.splitlines() if line.startswith("| low") or line.startswith("| high")]
    assert [line.split("|")[2].strip() for line in lines] == [str(probe.indices[k]) for k in low + high]
    for line, k in zip(lines, low + high):
        assert probe.decode(probe.examples[k]) in line  # the decoded example
    assert "the papers associate the **low** end with lower-quality data" in text


def test_through_the_engine_observe_only() -> None:
    model, probe = model_and_probe(16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    watcher = Watcher(gradwatch.WatchConfig(
        spectra=False, sharpness=False, signals=False, stability=False,
        example_quality=ExampleQualityConfig(every=2, size=6, tails=1), max_overhead=None, on_error="raise"))
    watcher.attach(model, probe_source=lambda n: probe)
    assert [type(d).__name__ for d in watcher.diagnostics] == ["ExampleQuality"]
    out = watcher.run_step(1)
    assert {f"example_quality/{s}/{q}" for s in STATS for q in ("mean", "p10", "median", "p90")} <= set(out)
    assert all(math.isfinite(out[f"example_quality/{s}/median"]) for s in STATS)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_config_messages() -> None:
    assert gradwatch.WatchConfig().example_quality is None or gradwatch.WatchConfig().example_quality is False
    with pytest.raises(ValueError, match="ExampleQualityConfig.size"):
        ExampleQualityConfig(size=1)
    with pytest.raises(ValueError, match="ExampleQualityConfig.rank_by"):
        ExampleQualityConfig(stats=("nuclear_norm",), rank_by="effective_rank")
    with pytest.raises(ValueError, match="ExampleQualityConfig.stats"):
        ExampleQualityConfig(stats=("rank",))
