"""The ``signals`` diagnostic (``OpposingSignals``) with a small stand-in for the engine's StepContext: the real
``ProbeSet`` and the real observe-only ``extra_pass``; update/compute/reset, NaN before two probe steps,
carried state through ``state_dict`` + ``carried_state``, records/alerts/text shapes, the gradient
confirmation, observe-only, a two-rank split (threads) equal to one rank, and every bad-input message."""

from __future__ import annotations

import copy
import math
import threading
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from _signals_helpers import planted
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from gradwatch.config import Cadence
from gradwatch.engine.context import extra_pass
from gradwatch.engine.probe import ProbeSet
from gradwatch.functional.signals import MIN_CHANGES_FOR_PAIRS
from gradwatch.metrics.base import Alert, ChartGroup, Results
from gradwatch.metrics.signals import FAMILY, TAGS, OpposingSignals, SignalsConfig
from gradwatch.registry import families, register, unregister

# ---- a stand-in for the engine's context -------------------------------------------------------------


class Exchange:
    """all_gather / all_reduce between threads standing in for ranks."""

    def __init__(self, world: int) -> None:
        self.barrier = threading.Barrier(world)
        self.slots: list[Tensor | None] = [None] * world

    def all_gather(self, rank: int, tensor: Tensor) -> list[Tensor]:
        self.slots[rank] = tensor.detach().clone()
        self.barrier.wait()
        out = [s.clone() for s in self.slots]  # type: ignore[union-attr]
        self.barrier.wait()
        return out


class Ctx:
    """The StepContext pieces the diagnostic uses (step, model, rank, world_size, probe, extra_pass,
    all_gather, all_reduce), with the engine's own ``extra_pass``; counts the passes it opens."""

    phase = "step_end"

    def __init__(self, model: nn.Module, probe: ProbeSet, step: int, rank: int = 0, world_size: int = 1,
                 exchange: Exchange | None = None) -> None:
        self.model, self._probe, self.step = model, probe, step
        self.rank, self.world_size, self.exchange = rank, world_size, exchange
        self.watched, self.params, self.optimizer, self.loss = (), {}, None, None
        self.passes: list[bool] = []

    def probe(self) -> ProbeSet:
        return self._probe

    def extra_pass(self, *, grad: bool = True, float32: bool = True) -> Any:
        self.passes.append(grad)
        return extra_pass(self.model, grad=grad, float32=float32)

    def all_gather(self, tensor: Tensor) -> list[Tensor]:
        return [tensor] if self.exchange is None else self.exchange.all_gather(self.rank, tensor)

    def all_reduce(self, tensor: Tensor, op: str = "sum") -> Tensor:
        if self.exchange is None:
            return tensor
        stacked = torch.stack(self.exchange.all_gather(self.rank, tensor))
        return {"sum": stacked.sum(0), "max": stacked.amax(0), "min": stacked.amin(0)}[op]



def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))


def probe_of(dataset: TensorDataset, size: int = 256) -> ProbeSet:
    return ProbeSet.from_dataset(dataset, size, seed=0, device=torch.device("cpu"))


def as_pictures(data: TensorDataset) -> TensorDataset:
    """The planted features as 1 x 4 x 4 pictures (zero-padded to 16 pixels)."""
    x, y = data.tensors
    return TensorDataset(F.pad(x, (0, 16 - x.shape[1])).reshape(-1, 1, 4, 4), y)


def train_and_observe(steps: int, metric: OpposingSignals, *, strength: float = 16.0, n: int = 4096,
                      world: int = 1, pictures: bool = False) -> dict[str, Any]:
    """SGD (lr 0.5, batch 512) on the planted data; after each step the metric observes and is computed and
    reset, as the engine does with the default log cadence. With ``world`` > 1, as many copies of the metric
    observe as ranks (threads), each on its block of the probe. With ``pictures``, the examples are 1 x 4 x 4
    pictures and the model flattens them first."""
    data, a, b = planted(n, strength=strength)
    model = mlp()
    if pictures:
        data = as_pictures(data)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 2))
    probe = probe_of(data)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(1)
    metrics = [metric] + [copy.deepcopy(metric) for _ in range(world - 1)]
    out: dict[str, Any] = {"results": [], "ctx": [], "model": model, "probe": probe, "a": a, "b": b}
    for step in range(1, steps + 1):
        idx = torch.randperm(n, generator=gen)[:512]
        x, y = data.tensors[0][idx], data.tensors[1][idx]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if world == 1:
            ctx = Ctx(model, probe, step)
            metric.observe(ctx)
            out["ctx"].append(ctx)
        else:
            ex = Exchange(world)
            copies = [copy.deepcopy(model) for _ in range(world)]
            threads = [threading.Thread(target=m.observe, args=(Ctx(copies[r], probe, step, r, world, ex),))
                       for r, m in enumerate(metrics)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
        out["results"].append([m.compute() for m in metrics])
        for m in metrics:
            m.reset()
    return out


def same_records(x: Any, y: Any) -> bool:
    """Equal, floats within 1e-6 (a gradient summed over ranks adds in another order)."""
    if isinstance(x, float) and isinstance(y, float):
        return x == pytest.approx(y, rel=1e-6, abs=1e-12)
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(same_records(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
        return len(x) == len(y) and all(same_records(u, v) for u, v in zip(x, y))
    return x == y


def scalars(res: Results) -> dict[str, float]:
    return {k: float(v) for k, v in res.scalars.items()}


# ---- configuration -------------------------------------------------------------------------------


def test_config_defaults_and_the_family() -> None:
    cfg = SignalsConfig()
    assert cfg.every == Cadence.within_budget(minimum=10) and cfg.every.budgeted_minimum == 10
    assert (cfg.window, cfg.alarm, cfg.probe_size, cfg.z_cut, cfg.rho) == (20, 0.6, 512, 3.5, 0.8)
    assert (FAMILY.key, FAMILY.stem, FAMILY.config_class, FAMILY.default_on) == ("signals", "signals", SignalsConfig, False)
    assert FAMILY.knobs == ("window", "alarm", "probe_size", "burst")
    built = FAMILY.build(cfg, None)
    assert len(built) == 1 and isinstance(built[0], OpposingSignals) and built[0].probe_size() == 512
    d = built[0]
    assert (d.stem, d.needs, d.phase, d.runs_on) == ("signals", frozenset({"probe"}), "step_end", "all_ranks")
    assert d.observe_cadence() is cfg.every


def test_the_family_through_the_registration_point() -> None:
    import gradwatch
    from gradwatch.config import WatchConfig

    added = "signals" not in [f.key for f in families()]
    if added:
        register(FAMILY)
    try:
        config = WatchConfig(signals=SignalsConfig(every=3, window=8))
        assert config.signals.window == 8 and config.families["signals"].every.is_due(3)
        assert WatchConfig().signals is None  # off by default
        assert gradwatch.SignalsConfig is SignalsConfig
    finally:
        if added:
            unregister("signals")


@pytest.mark.parametrize(("options", "message"), [
    ({"window": 4}, "`SignalsConfig.window` expected an int in 5..1000 (loss changes kept), got 4"),
    ({"window": 1001}, "`SignalsConfig.window` expected an int in 5..1000 (loss changes kept), got 1001"),
    ({"window": True}, "`SignalsConfig.window` expected an int in 5..1000 (loss changes kept), got True"),
    ({"alarm": 0}, "`SignalsConfig.alarm` expected a number in (0.0, 1.0], got 0"),
    ({"alarm": 1.5}, "`SignalsConfig.alarm` expected a number in (0.0, 1.0], got 1.5"),
    ({"alarm": math.nan}, "`SignalsConfig.alarm` expected a number in (0.0, 1.0], got nan"),
    ({"every": 0}, "`SignalsConfig.every` expected a positive int or a gradwatch.Cadence, got 0"),
    ({"probe_size": 4}, "`SignalsConfig.probe_size` expected an int >= 8, got 4"),
    ({"z_cut": -1.0}, "`SignalsConfig.z_cut` expected a number in (0.0, 100.0], got -1.0"),
    ({"rho": 1.0}, "`SignalsConfig.rho` expected a number in (0.0, 1.0), got 1.0"),
    ({"min_group": 0}, "`SignalsConfig.min_group` expected an int >= 1, got 0"),
    ({"max_outliers": 1}, "`SignalsConfig.max_outliers` expected an int >= 2, got 1"),
    ({"full_share": 0.0}, "`SignalsConfig.full_share` expected a number in (0.0, 1.0], got 0.0"),
    ({"confirm": 1}, "`SignalsConfig.confirm` expected True or False, got 1"),
    ({"batch_size": 0}, "`SignalsConfig.batch_size` expected an int >= 1, got 0"),
    ({"decode": "tokenizer"}, "`SignalsConfig.decode` expected a callable decode(example) -> str, or None, got 'tokenizer'"),
])
def test_bad_configuration_fails_at_construction(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as info:
        SignalsConfig(**options)
    assert str(info.value) == "gradwatch: " + message


def test_metric_takes_only_its_config() -> None:
    with pytest.raises(ValueError, match=r"`config` expected a gradwatch.SignalsConfig, got 5"):
        OpposingSignals(5)  # type: ignore[arg-type]


# ---- bad input at the probe --------------------------------------------------------------------------


def test_probe_larger_than_the_dataset_uses_all_of_it_and_says_so() -> None:
    data = TensorDataset(torch.randn(10, 8), torch.zeros(10, dtype=torch.long))
    with pytest.warns(RuntimeWarning, match="asks for 512 examples but the training dataset has 10; using all 10"):
        probe = ProbeSet.from_dataset(data, SignalsConfig().probe_size, device=torch.device("cpu"))
    assert len(probe) == 10 and probe.indices == list(range(10))


def test_batches_without_a_per_example_loss_name_the_options() -> None:
    data = [{"pixels": torch.randn(8)} for _ in range(16)]
    probe = ProbeSet(data, list(range(16)), None, torch.device("cpu"))
    metric = OpposingSignals(SignalsConfig(every=1))
    with pytest.raises(ValueError) as info:
        metric.observe(Ctx(mlp(), probe, 1))
    text = str(info.value)
    assert "cannot infer a per-example loss" in text and "`labels` key" in text and "(inputs, targets)" in text
    assert "loss_fn=lambda model, batch" in text


def test_a_loss_fn_of_the_wrong_length_is_reported() -> None:
    data, _, _ = planted(256)
    probe = ProbeSet.from_dataset(data, 64, device=torch.device("cpu"),
                                  loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none")[:1])
    with pytest.raises(ValueError, match=r"signals expected 64 per-example losses \(one per probe example\), got 1"):
        OpposingSignals(SignalsConfig(every=1)).observe(Ctx(mlp(), probe, 1))


def test_carried_state_of_the_wrong_shape_is_refused() -> None:
    with pytest.raises(ValueError, match=r"carried state expected losses \[steps, examples\] matching 2 steps"):
        OpposingSignals().load_carried_state({"losses": torch.zeros(3, 4), "steps": torch.tensor([1, 2]),
                                              "indices": torch.arange(4)})


# ---- update / compute / reset ------------------------------------------------------------------------


def test_nothing_before_a_change_nan_until_defined_then_pairs_and_reset_keeps_the_window() -> None:
    m = OpposingSignals(SignalsConfig(every=1, window=6))
    g = torch.Generator().manual_seed(0)
    losses = 1.0 + 0.01 * torch.randn(10, 64, generator=g).cumsum(0)
    losses[:, :4] += 0.5 * torch.tensor([(-1.0) ** s for s in range(10)])[:, None]
    losses[:, 4:8] -= 0.5 * torch.tensor([(-1.0) ** s for s in range(10)])[:, None]
    indices = list(range(100, 164))
    m.update(losses[0], 1, indices)
    res = m.compute()  # the first probe step of a burst: no one-step change yet, nothing to log
    assert res.scalars == {} and res.records == {} and res.texts == {} and list(res.alerts) == []
    assert m.continues(2) and not m.continues(3)
    m.reset()
    m.update(losses[1], 2, indices)
    s = scalars(m.compute())
    assert s["signals/outliers"] == 8 and 0 < s["signals/top1pct_share"] <= 1
    assert all(math.isnan(s[t]) for t in ("signals/opposing_score", "signals/pairs", "signals/alarm",
                                          "signals/pair_loss/a", "signals/pair_loss/b"))
    m.reset()
    assert m.carried_state()["change_steps"].tolist() == [2]  # reset clears the interval, not the window
    assert m.carried_state()["last_step"] == 2
    for step in range(3, MIN_CHANGES_FOR_PAIRS + 2):
        m.update(losses[step - 1], step, indices)
    res = m.compute()
    s = scalars(res)
    assert s["signals/pairs"] == 1 and s["signals/alarm"] == 1 and s["signals/opposing_score"] > 0.9
    last = losses[MIN_CHANGES_FOR_PAIRS]
    assert s["signals/pair_loss/a"] == pytest.approx(float(last[:4].double().mean()))
    assert s["signals/pair_loss/b"] == pytest.approx(float(last[4:8].double().mean()))
    rows = res.records["signals"]
    assert [r["step"] for r in rows] == list(range(3, MIN_CHANGES_FOR_PAIRS + 2))  # one row per probe step
    pair = rows[-1]["pairs"][0]
    assert (pair["a"], pair["b"]) == ([100, 101, 102, 103], [104, 105, 106, 107])  # dataset indices
    assert sorted(rows[-1]["outliers"]) == list(range(100, 108))
    assert len(m.carried_state()["change_steps"]) == MIN_CHANGES_FOR_PAIRS
    assert rows[-1]["pairs"][0]["shared_direction"] is None  # no representations given: not tested
    levels = float(last[:4].double().mean()), float(last[4:8].double().mean())  # each side's loss now
    assert rows[-1]["pairs"][0]["relative_swing"] == pytest.approx(1.0 / max(levels), rel=0.05)  # |change| ~ 1


def test_a_resumed_run_that_repeats_steps_drops_the_later_window_entries() -> None:
    m = OpposingSignals(SignalsConfig(every=1))
    for step in range(1, 11):
        m.update(torch.rand(16), step)
    m.update(torch.rand(16), 5)  # the changes that end after step 4 go; step 5 starts a new burst
    assert m.carried_state()["change_steps"].tolist() == [2, 3, 4] and m.carried_state()["last_step"] == 5


def test_nonfinite_losses_warn_once_and_restart_the_window() -> None:
    m = OpposingSignals(SignalsConfig(every=1))
    m.update(torch.rand(16), 1)
    bad = torch.rand(16)
    bad[3] = math.nan
    with pytest.warns(RuntimeWarning, match="per-example losses are not finite at step 2; the window starts again"):
        m.update(bad, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m.update(bad, 3)  # said once
    assert m.compute().scalars == {}  # no change in the window: nothing logged
    m.update(torch.rand(16), 4)
    m.update(torch.rand(16), 5)
    assert m.carried_state()["change_steps"].tolist() == [5]


def test_failed_result_and_charts() -> None:
    m = OpposingSignals()
    failed = m.failed_result()
    assert set(failed.scalars) == set(TAGS) and all(math.isnan(float(v)) for v in failed.scalars.values())
    charts = m.charts()
    assert all(isinstance(c, ChartGroup) for c in charts)
    assert ("signals/pair_loss/a", "signals/pair_loss/b") in [c.tags for c in charts]
    assert {t for c in charts for t in c.tags} == set(TAGS)


# ---- state round trip ----------------------------------------------------------------------------


def test_interval_and_carried_state_round_trip() -> None:
    """Mid-interval (log cadence longer than the observe cadence): the interval state through
    ``state_dict`` and the window through ``carried_state`` give a fresh metric the same compute() and the
    same next step. Every state is a tensor (the engine saves them with ``.cpu()``)."""
    cfg = SignalsConfig(every=1, window=6)
    g = torch.Generator().manual_seed(3)
    losses = 1.0 + 0.05 * torch.randn(12, 40, generator=g).cumsum(0)
    a = OpposingSignals(cfg)
    for step in range(1, 9):
        a.update(losses[step - 1], step, list(range(40)))
    a.reset()
    for step in range(9, 12):
        a.update(losses[step - 1], step, list(range(40)))
    state = {k: v.cpu() for k, v in a.state_dict().items()}
    assert state and all(isinstance(v, Tensor) for v in state.values())
    carried = a.carried_state()
    b = OpposingSignals(cfg)
    b.load_state_dict(state, strict=False)
    b._update_count = a._update_count
    b.load_carried_state(carried)
    ra, rb = a.compute(), b.compute()
    assert scalars(ra).keys() == scalars(rb).keys()
    assert all(math.isclose(x, y, rel_tol=0, abs_tol=0) or (math.isnan(x) and math.isnan(y))
               for x, y in zip(scalars(ra).values(), scalars(rb).values()))
    assert ra.records == rb.records and len(ra.records["signals"]) == 3
    assert b.continues(12) == a.continues(12)
    a.reset(), b.reset()
    a.update(losses[11], 12, list(range(40)))
    b.update(losses[11], 12, list(range(40)))
    assert a.compute().records == b.compute().records
    assert torch.equal(a.carried_state()["changes"], b.carried_state()["changes"])
    assert torch.equal(a.carried_state()["last"], b.carried_state()["last"])


# ---- through observe, on a real model ------------------------------------------------------------------


@pytest.fixture(scope="module")
def planted_run() -> dict[str, Any]:
    return train_and_observe(40, OpposingSignals(SignalsConfig(every=1, probe_size=256, window=10)))


def test_planted_run_records_alerts_and_confirmation(planted_run: dict[str, Any]) -> None:
    a, b = planted_run["a"], planted_run["b"]
    results = [r[0] for r in planted_run["results"]]
    probe = planted_run["probe"]
    rows = [row for res in results for row in res.records.get("signals", [])]
    assert results[0].scalars == {}  # step 1: no one-step change yet
    assert [r["step"] for r in rows] == list(range(2, 41))  # every probe step with a change
    for row in rows:
        assert set(row) >= {"step", "outliers", "pairs"} and all(i in probe.indices for i in row["outliers"])
        for p in row["pairs"]:
            assert set(p) >= {"a", "b", "score", "alarm"} and 0.0 <= p["score"] <= 1.0
            assert isinstance(p["alarm"], bool) and not set(p["a"]) & set(p["b"])
    alarmed = [r for r in rows if r["pairs"] and r["pairs"][0]["alarm"]]
    assert len(alarmed) >= 0.5 * len(rows)
    purities = []
    for r in alarmed:
        top = r["pairs"][0]
        sa, sb = set(top["a"]), set(top["b"])
        purities.append(max(min(len(sa & a) / len(sa), len(sb & b) / len(sb)),
                            min(len(sa & b) / len(sa), len(sb & a) / len(sb))))  # the two planted groups
        assert top["gradient_cosine"] is not None and top["gradient_cosine"] < 0  # confirmed: opposed gradients
    assert sorted(purities)[len(purities) // 2] >= 0.9 and min(purities) >= 0.6, purities
    alerts = [al for res in results for al in res.alerts]
    assert alerts and all(isinstance(al, Alert) for al in alerts)
    al = alerts[-1]
    assert (al.rule, al.severity) == ("signals/opposing_pair", "warning")
    assert set(al.evidence) >= {"a", "b", "correlation", "share", "score", "gradient_cosine"}
    assert al.evidence["score"] >= 0.6 and al.evidence["correlation"] < 0 and 0 < al.evidence["share"] <= 1
    assert "anti-phase" in al.message and len(al.remedies) >= 3
    # the confirmation's backward pass is not repeated at every step while the pair stays
    grad_passes = sum(ctx.passes.count(True) for ctx in planted_run["ctx"])
    assert 1 <= grad_passes <= 40 // 10 + 3


def test_planted_run_pairs_table(planted_run: dict[str, Any]) -> None:
    res = planted_run["results"][-1][0]
    text = res.texts["signals/pairs"]
    assert "| pair | score | side | dataset index | label | loss | example |" in text
    top = res.records["signals"][-1]["pairs"][0]
    probe = planted_run["probe"]
    labels = {i: int(example[1]) for i, example in zip(probe.indices, probe.examples)}
    for idx in top["a"][:8]:
        assert f"| {idx} | {labels[idx]} |" in text
    assert "[16, " in text  # the example's values, the shortcut feature first


def test_picture_examples_are_drawn_as_thumbnails_a_row_per_side() -> None:
    from gradwatch.functional.thumbnails import thumbnail

    run = train_and_observe(20, OpposingSignals(SignalsConfig(every=1, probe_size=256, window=10)), pictures=True)
    res = next(r[0] for r in reversed(run["results"]) if r[0].records["signals"][-1]["pairs"])
    pairs = res.records["signals"][-1]["pairs"][:3]
    grid = res.images["signals/pair_examples"]
    sides = [side for p in pairs for side in (p["a"][:8], p["b"][:8])]
    size, pad = 32, 2
    assert grid.shape == (3, pad + len(sides) * (size + pad), pad + max(map(len, sides)) * (size + pad))
    assert 0.0 <= float(grid.min()) and float(grid.max()) <= 1.0
    probe = run["probe"]
    examples = dict(zip(probe.indices, probe.examples))
    for r, side in enumerate(sides):  # each thumbnail is the example's own picture, where the table says it is
        for c, idx in enumerate(side):
            top, left = pad + r * (size + pad), pad + c * (size + pad)
            torch.testing.assert_close(grid[:, top:top + size, left:left + size], thumbnail(examples[idx][0], size))
    text = res.texts["signals/pairs"]
    first = pairs[0]["a"][0]
    assert "signals/pair_examples" in text.splitlines()[0]
    assert f"| {first} | " in text and "picture 1x4x4: signals/pair_examples row 1, column 1" in text


def test_examples_that_are_not_pictures_get_no_image(planted_run: dict[str, Any]) -> None:
    assert all("signals/pair_examples" not in r[0].images for r in planted_run["results"])


def test_observe_is_observe_only() -> None:
    data, _, _ = planted(512)
    model, probe = mlp(), probe_of(data, 128)
    model.train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    m = OpposingSignals(SignalsConfig(every=1, window=5, alarm=0.01))
    for step in range(1, 9):
        m.observe(Ctx(model, probe, step))
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training and all(mod.training for mod in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())


def test_two_ranks_report_what_one_rank_reports() -> None:
    cfg = SignalsConfig(every=1, probe_size=256, window=6, batch_size=48)  # 6 batches, split 3 + 3
    one = train_and_observe(12, OpposingSignals(cfg), n=1024)
    two = train_and_observe(12, OpposingSignals(cfg), n=1024, world=2)
    for r1, (r2a, r2b) in zip(one["results"], two["results"]):
        assert same_records(r2a.records, r1[0].records) and r2a.records == r2b.records
        s1, s2 = scalars(r1[0]), scalars(r2a)
        assert all((math.isnan(x) and math.isnan(s2[k])) or x == pytest.approx(s2[k], rel=1e-6) for k, x in s1.items())


def test_decode_is_used_and_a_failing_decode_warns_once() -> None:
    def decode(example: Any) -> str:
        return f"point with x0={float(example[0][0]):.0f}"

    run = train_and_observe(12, OpposingSignals(SignalsConfig(every=1, probe_size=256, window=6, decode=decode)))
    assert "point with x0=16" in run["results"][-1][0].texts["signals/pairs"]

    def broken(example: Any) -> str:
        raise KeyError("no tokenizer")

    with pytest.warns(RuntimeWarning, match=r"decode\(example\) failed \(KeyError\('no tokenizer'\)\); showing the raw"):
        run = train_and_observe(12, OpposingSignals(SignalsConfig(every=1, probe_size=256, window=6, decode=broken)))
    assert "[16, " in run["results"][-1][0].texts["signals/pairs"]


def test_large_dataset_indices_survive_a_float32_state() -> None:
    """Rows keep probe positions, not dataset indices: a state cast to float32 (exact only below 2**24) still
    gives back indices of a billion-example dataset."""
    m = OpposingSignals(SignalsConfig(every=1, window=5))
    indices = [1_000_000_000 + 7 * i for i in range(32)]
    losses = 1.0 + 0.01 * torch.randn(8, 32, generator=torch.Generator().manual_seed(0)).cumsum(0)
    losses[:, 0] += torch.tensor([3.0 * (-1) ** s for s in range(8)])
    for step in range(1, 9):
        m.update(losses[step - 1], step, indices)
    m = m.to(torch.float32)
    assert m.rows.dtype == torch.float32
    rows = m.compute().records["signals"]
    assert rows[-1]["outliers"][0] == indices[0]
    assert all(i in indices for r in rows for i in r["outliers"])


def test_layer_inputs_and_the_input_representation() -> None:
    """GPT-2 ties lm_head to the input embeddings (which come first by name): its last layer is still lm_head,
    whose input is the final hidden states (averaged over the tokens the attention mask keeps). The input
    representation signals uses is the input embeddings' output, averaged the same way; a plain MLP's is the
    input of its first Linear; pictures are flattened."""
    transformers = pytest.importorskip("transformers")
    from gradwatch.metrics.signals.representation import LayerInputs, class_key, input_layer, last_layer

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50, n_positions=8, n_embd=16,
                                                                 n_layer=1, n_head=2)).eval()
    assert last_layer(model) is model.lm_head
    batch = {"input_ids": torch.randint(0, 50, (3, 8)), "attention_mask": torch.ones(3, 8, dtype=torch.long)}
    batch["attention_mask"][1, 5:] = 0
    heads = LayerInputs(last_layer(model))
    with torch.no_grad(), heads.capturing():
        out = model(**batch, output_hidden_states=True)
        got = heads.take(batch, 3)
    mask = batch["attention_mask"].float()[..., None]
    want = (out.hidden_states[-1] * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert input_layer(model) == (model.transformer.wte, True)
    inputs = LayerInputs.of_input(model)
    with torch.no_grad(), inputs.capturing():
        model(**batch)
        got = inputs.take(batch, 3)
    want = (model.transformer.wte(batch["input_ids"]) * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    net = mlp()
    with torch.no_grad(), LayerInputs.of_input(net).capturing() as h:
        x = torch.randn(5, 8)
        net(x)
        torch.testing.assert_close(h.take(x, 5), x)
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.LazyLinear(2))
    with torch.no_grad(), LayerInputs.of_input(conv).capturing() as h:
        pictures = torch.randn(4, 1, 6, 6)
        conv(pictures)
        torch.testing.assert_close(h.take(pictures, 4), pictures.reshape(4, 36))
    with torch.no_grad(), LayerInputs(last_layer(net)).capturing() as h:
        x = torch.randn(5, 8)
        net(x)
        torch.testing.assert_close(h.take(x, 5), net[1](net[0](x)))
    assert [class_key(e) for e in ({"labels": 3}, (x[0], torch.tensor(1)), {"labels": torch.arange(4)}, x[0])] == \
        [3, 1, None, None]
