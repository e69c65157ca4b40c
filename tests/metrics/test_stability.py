"""The stability family's diagnostics as torchmetrics: configuration, update / compute / reset, carried
state, alert rules and the once-written ``stability/alert``."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from _stability_sites import armed
from torch import nn

from gradwatch.config import Cadence
from gradwatch.metrics.base import Diagnostic, Results
from gradwatch.metrics.stability import (
    FAMILY,
    ActivationRMS,
    AdamEpsShare,
    AlertBoard,
    AttentionLogits,
    GradNormSpikes,
    LossSpikes,
    NoiseScale,
    OutputLogits,
    StabilityConfig,
    UpdateRatio,
    build,
    find_attention_modules,
    find_blocks,
    find_logits_module,
)
from gradwatch.registry import BuildInputs

T = torch.tensor


def _ctx(step: int = 1, *, lr: float = 1e-2, eps: float = 1e-8, **extra: Any) -> SimpleNamespace:
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=lr, eps=eps)
    said: list[tuple[str, str]] = []
    return SimpleNamespace(step=step, optimizer=opt, say_once=lambda k, m: said.append((k, m)), said=said, **extra)


# ---- configuration ------------------------------------------------------------------------------


def test_config_defaults_and_cadence() -> None:
    cfg = StabilityConfig()
    assert isinstance(cfg.every, Cadence) and cfg.every.is_due(10) and not cfg.every.is_due(11)
    assert cfg.attention_logit_level == 100.0 and cfg.attention_logit_critical == 1e4
    assert FAMILY.key == "stability" and FAMILY.stem == "stability" and not FAMILY.default_on
    assert FAMILY.config_class is StabilityConfig
    for knob in FAMILY.knobs:
        assert hasattr(cfg, knob)


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("every", 0, "a positive int or a gradwatch.Cadence"),
    ("attention_logit_level", -1.0, "a number in (0.0, 1000000000000.0]"),
    ("attention_logit_level", math.nan, "a number in (0.0"),
    ("attention_logit_critical", 50.0, "a number >= attention_logit_level (100.0)"),
    ("attention_growth", 1.0, "a number in (1.0"),
    ("entropy_floor", -0.1, "a number in [0.0, 100.0]"),
    ("log_z_drift", 0, "a number in (0.0"),
    ("update_ratio_factor", 0.5, "a number in (1.0"),
    ("eps_share_limit", 1.5, "a number in (0.0, 1.0]"),
    ("spike_threshold", "6", "a number in (0.0"),
    ("spike_window", 2, "an int >= 3"),
    ("spike_warmup", 200, "an int in [2, spike_window=100]"),
    ("level_warmup", 30, "an int in [1, level_window=20]"),
    ("growth_window", 0, "an int >= 1"),
    ("max_exact_seq_len", 0, "an int >= 1"),
    ("attention_precision", "float16", "one of ['float64', 'float32']"),
    ("spikes", 1, "True or False"),
])
def test_config_rejects(field: str, value: Any, expected: str) -> None:
    with pytest.raises(ValueError) as err:
        StabilityConfig(**{field: value})
    message = str(err.value)
    assert f"StabilityConfig.{field}" in message and expected in message and repr(value) in message


def test_watch_config_rejects_non_callable_on_alert() -> None:
    from gradwatch.config import WatchConfig

    with pytest.raises(ValueError, match="on_alert.*callable"):
        WatchConfig(on_alert="print")


# ---- discovery ----------------------------------------------------------------------------------


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=16))


class _Causal(nn.Module):
    """A plain causal LM with a custom attention class and an ``lm_head``."""

    class CausalSelfAttention(nn.Module):
        def __init__(self, d: int) -> None:
            super().__init__()
            self.qkv = nn.Linear(d, 3 * d)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q, k, v = self.qkv(x).unflatten(-1, (3, 2, -1)).permute(2, 0, 3, 1, 4)
            return nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2)

    def __init__(self, d: int = 8, vocab: int = 11) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([nn.Sequential(self.CausalSelfAttention(d)) for _ in range(2)])
        self.lm_head = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        for b in self.blocks:
            x = x + b(x)
        return self.lm_head(x)


def test_discovery() -> None:
    gpt2 = _gpt2()
    attn = find_attention_modules(gpt2)
    assert attn == [("transformer.h.0.attn", "sdpa"), ("transformer.h.1.attn", "sdpa")]
    assert find_blocks(gpt2, [n for n, _ in attn]) == ["transformer.h.0", "transformer.h.1"]
    assert find_logits_module(gpt2) == ("", "hf")
    wrapped = nn.ModuleDict({"lm": gpt2})  # e.g. a LightningModule holding the HF model
    assert find_logits_module(wrapped) == ("lm", "hf")
    custom = _Causal()
    attn = find_attention_modules(custom)
    assert attn == [("blocks.0.0", "sdpa"), ("blocks.1.0", "sdpa")]
    assert find_blocks(custom, [n for n, _ in attn]) == ["blocks.0", "blocks.1"]
    assert find_logits_module(custom) == ("lm_head", "head")
    assert find_logits_module(nn.Sequential(nn.Linear(2, 3), nn.ReLU())) == ("", "top")


def test_build_order_and_one_alert_flag() -> None:
    model = _Causal()
    watched = [SimpleNamespace(param_name=n, tag=n, family=n) for n, p in model.named_parameters() if p.dim() == 2]
    diags = build(StabilityConfig(noise_scale=True), BuildInputs(config=None, watched=watched, model=model))
    kinds = [type(d) for d in diags]
    assert kinds == [NoiseScale, AttentionLogits, OutputLogits, ActivationRMS, UpdateRatio, AdamEpsShare,
                     GradNormSpikes, LossSpikes]
    assert [d.emits_flag for d in diags] == [False] * 7 + [True]
    assert len({id(d.board) for d in diags}) == 1
    assert all(d.stem == "stability" and isinstance(d, Diagnostic) for d in diags)
    assert {d.phase for d in diags if isinstance(d, (UpdateRatio, AdamEpsShare, LossSpikes))} == {"step_end"}
    assert diags[1].needs >= {"activations"} and diags[4].needs >= {"weights_before"}
    none = build(StabilityConfig(attention=False, logits=False, activations=False, update_ratio=False, adam=False,
                                 spikes=False, noise_scale=False), BuildInputs(config=None, watched=watched, model=model))
    assert none == []
    default = build(StabilityConfig(attention=False, logits=False, activations=False, update_ratio=False, adam=False,
                                    spikes=False), BuildInputs(config=None, watched=watched, model=model))
    assert [type(d) for d in default] == [NoiseScale]  # on by default, quiet where there is one batch size


def test_alert_board() -> None:
    board = AlertBoard()
    a = UpdateRatio(["w"], board=board, emits_flag=False)
    b = LossSpikes(board=board, emits_flag=True)
    alert = SimpleNamespace()
    res_a = a._results({}, [alert])
    res_b = b._results({}, [])
    assert "stability/alert" not in res_a.scalars and res_b.scalars["stability/alert"].item() == 1.0
    assert b._results({}, []).scalars["stability/alert"].item() == 0.0
    alone = UpdateRatio(["w"])  # built on its own: writes its own flag
    assert alone._results({}, []).scalars["stability/alert"].item() == 0.0


# ---- attention ----------------------------------------------------------------------------------


def test_attention_update_compute_reset_and_alerts() -> None:
    cfg = StabilityConfig(growth_window=2, growth_min_logit=20.0, attention_growth=4.0, entropy_floor=0.1)
    d = AttentionLogits(["a", "b"], config=cfg)
    d._begin_observe(_ctx(step=10))
    d.update(T([3.0, 5.0], dtype=torch.float64), T([1.2, 0.8], dtype=torch.float64))
    d.update(T([4.0, -math.inf], dtype=torch.float64), T([1.0, math.nan], dtype=torch.float64))
    res = d.compute()
    assert res.scalars["stability/attention/max_logit/a"].item() == 4.0
    assert res.scalars["stability/attention/max_logit/b"].item() == 5.0
    assert res.scalars["stability/attention/entropy_min/a"].item() == 1.0
    assert res.scalars["stability/attention/entropy_min/b"].item() == 0.8
    assert res.scalars["stability/attention/max_logit"].item() == 5.0
    assert res.scalars["stability/alert"].item() == 0.0 and not res.alerts
    d.reset()
    assert torch.isinf(d.max_logit).all() and torch.isinf(d.entropy_min).all()
    # growth: 5 -> 12 -> 30 over two logging events: x6 >= 4 and >= 20
    for step, value in ((20, 12.0), (30, 30.0)):
        d._begin_observe(_ctx(step=step, lr=3e-2))
        d.update(T([value, 1.0], dtype=torch.float64), T([1.0, 1.0], dtype=torch.float64))
        res = d.compute()
        d.reset()
    rules = {a.rule: a for a in res.alerts}
    assert set(rules) == {"stability/attention_logit_growth"}
    growth = rules["stability/attention_logit_growth"]
    assert growth.evidence["growth"] == pytest.approx(6.0) and growth.evidence["earlier"] == 5.0
    assert growth.evidence["trend"] == [[10, 5.0], [20, 12.0], [30, 30.0]]
    assert any("from 0.03" in r for r in growth.remedies) and any("qk-layernorm" in r for r in growth.remedies)
    assert res.scalars["stability/alert"].item() == 1.0
    # level, critical, entropy collapse
    d._begin_observe(_ctx(step=40))
    d.update(T([2e4, 1.0], dtype=torch.float64), T([1.0, 0.01], dtype=torch.float64))
    rules = {a.rule: a for a in d.compute().alerts}
    assert rules["stability/attention_logit_level"].severity == "critical"
    assert rules["stability/attention_logit_level"].evidence["module"] == "a"
    assert rules["stability/attention_entropy_collapse"].evidence["module"] == "b"
    # carried state survives reset and round-trips
    state = d.carried_state()
    d.reset()
    fresh = AttentionLogits(["a", "b"], config=cfg)
    fresh.load_carried_state(state)
    assert fresh.history == d.history and fresh.history[-1] == (40, 2e4)


def test_attention_observe_from_hooks_and_failed_result() -> None:
    model = _gpt2()
    found = find_attention_modules(model)
    d = AttentionLogits([n for n, _ in found], [k for _, k in found])
    ids = torch.randint(0, 40, (2, 8))
    with armed(d.activation_sites(model)):
        model(input_ids=ids)
        model(input_ids=ids)  # two micro-batches: one observation
    ctx = _ctx(step=1)
    d.observe(ctx)
    assert d._update_count == 1 and d._pending == {}
    res = d.compute()
    per = [res.scalars[f"stability/attention/max_logit/{n}"].item() for n, _ in found]
    assert all(math.isfinite(v) for v in per)
    assert res.scalars["stability/attention/max_logit"].item() == max(per)
    assert set(d.failed_result().scalars) >= {"stability/attention/max_logit"}


def test_unreadable_attention_said_once_by_name() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=30, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg)
    found = find_attention_modules(model)
    d = AttentionLogits([n for n, _ in found], [k for _, k in found])
    ctx = _ctx()
    for _ in range(2):
        with armed(d.activation_sites(model)):
            model(input_ids=torch.randint(0, 30, (1, 6)))
        d.observe(ctx)
    assert len(ctx.said) == 1
    key, message = ctx.said[0]
    assert "model.layers.0.self_attn" in message and "LlamaAttention" in message
    assert math.isnan(d.compute().scalars["stability/attention/max_logit"].item())


# ---- output logits and activations ---------------------------------------------------------------


def test_output_logits_from_hf_with_padding() -> None:
    model = _gpt2()
    d = OutputLogits(*find_logits_module(model))
    ids = torch.randint(0, 40, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    with armed(d.activation_sites(model)):
        logits = model(input_ids=ids, attention_mask=mask).logits.detach()
    d.observe(_ctx())
    res = d.compute()
    lse = torch.logsumexp(logits.double(), -1)[mask.bool()]
    assert res.scalars["stability/logits/log_z_mean"].item() == pytest.approx(lse.mean().item(), rel=1e-6)
    assert res.scalars["stability/logits/log_z_max"].item() == pytest.approx(lse.max().item(), rel=1e-6)
    assert res.scalars["stability/logits/max_abs"].item() == pytest.approx(
        logits[mask.bool()].abs().max().item(), rel=1e-6)
    d.reset()
    assert d.z_count.item() == 0 and d.reference is not None


def test_log_z_drift_alert_and_carried_reference() -> None:
    d = OutputLogits(config=StabilityConfig(log_z_drift=5.0))
    stats = SimpleNamespace(log_z_sum=T(30.0), count=T(10.0), log_z_max=T(4.0), max_abs=T(2.0))
    d._begin_observe(_ctx(step=1))
    d.update(stats)
    assert not d.compute().alerts and d.reference == 3.0
    d.reset()
    d._begin_observe(_ctx(step=2))
    d.update(SimpleNamespace(log_z_sum=T(-50.0), count=T(10.0), log_z_max=T(4.0), max_abs=T(60.0)))
    (alert,) = d.compute().alerts
    assert alert.rule == "stability/log_z_drift" and alert.evidence["drift"] == pytest.approx(-8.0)
    assert any("z-loss 1e-4" in r for r in alert.remedies)
    fresh = OutputLogits()
    fresh.load_carried_state(d.carried_state())
    assert fresh.reference == 3.0


def test_activation_rms() -> None:
    model = _Causal()
    d = ActivationRMS(["blocks.0", "blocks.1"])
    outs: list[torch.Tensor] = []
    hook = model.blocks[1].register_forward_hook(lambda m, a, o: outs.append(o.detach()))
    with armed(d.activation_sites(model)):
        model(torch.randint(0, 11, (2, 5)))
        model(torch.randint(0, 11, (3, 5)))
    hook.remove()
    d.observe(_ctx())
    got = d.compute().scalars["stability/activations/rms/blocks.1"].item()
    flat = torch.cat([o.reshape(-1) for o in outs]).double()
    assert got == pytest.approx(flat.square().mean().sqrt().item(), rel=1e-6)


# ---- optimizer ----------------------------------------------------------------------------------


def test_update_ratio_observe_and_jump_alert() -> None:
    w = nn.Parameter(torch.randn(4, 3))
    before = {"w": w.detach().clone()}
    with torch.no_grad():
        w.add_(0.01)
    d = UpdateRatio(["w", "missing"], config=StabilityConfig(update_ratio_factor=10.0, level_warmup=3))
    d.observe(_ctx(params={"w": w}, weights_before=lambda: before))
    res = d.compute()
    want = (w.detach() - before["w"]).norm().item() / before["w"].norm().item()
    assert res.scalars["stability/update_ratio/w"].item() == pytest.approx(want, rel=1e-6)
    assert math.isnan(res.scalars["stability/update_ratio/missing"].item())
    d.reset()
    assert d.levels["w"] == [pytest.approx(want)]
    d = UpdateRatio(["w", "missing"], config=StabilityConfig(update_ratio_factor=10.0, level_warmup=3))
    for step, r in enumerate([1e-3, 1.2e-3, 0.9e-3, 1.1e-3, 2e-2], start=2):
        d._begin_observe(_ctx(step=step, lr=1e-2))
        d.update(T([r, math.nan], dtype=torch.float64))
        res = d.compute()
        d.reset()
        if step < 6:
            assert not res.alerts
    (alert,) = res.alerts
    assert alert.rule == "stability/update_ratio_jump" and alert.evidence["param"] == "w"
    assert alert.evidence["level"] == pytest.approx(1.05e-3) and "from 0.01" in alert.remedies[0]
    fresh = UpdateRatio(["w"])
    fresh.load_carried_state(d.carried_state())
    assert fresh.levels == d.levels


def test_adam_eps_share_observe() -> None:
    a, b = nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(5))
    opt = torch.optim.AdamW([a, b], lr=1e-3, eps=1e-6)
    a.grad = torch.cat([torch.full((3, 4), 1e-9), torch.ones(3, 4)])
    b.grad = torch.ones(5)
    opt.step()
    d = AdamEpsShare(["a"], config=StabilityConfig(eps_share_limit=0.4))
    d.observe(SimpleNamespace(step=1, optimizer=opt, params={"a": a, "b": b}, say_once=lambda k, m: None))
    res = d.compute()
    assert res.scalars["stability/adam/eps_share/a"].item() == pytest.approx(0.5)
    v_hat = opt.state[a]["exp_avg_sq"].double() / (1 - 0.999)
    assert res.scalars["stability/adam/rms_over_eps/a"].item() == pytest.approx(v_hat.mean().sqrt().item() / 1e-6,
                                                                                rel=1e-6)
    (alert,) = res.alerts
    assert alert.rule == "stability/adam_eps_dominates" and "now 1e-6" in alert.remedies[0]
    sgd = torch.optim.SGD([a], lr=0.1)
    plain = AdamEpsShare(["a"])
    said: list = []
    plain.observe(SimpleNamespace(step=1, optimizer=sgd, params={"a": a}, say_once=lambda k, m: said.append(m)))
    assert plain._update_count == 0 and len(said) == 1
    assert set(plain.failed_result().scalars) == {"stability/alert"}


# ---- spikes and noise scale ---------------------------------------------------------------------


def test_loss_spikes_contract_and_alerts() -> None:
    cfg = StabilityConfig(every=5, spike_window=20, spike_warmup=5, spike_threshold=6.0)
    d = LossSpikes(config=cfg)
    assert d.observe_cadence().is_due(7) and d.log_cadence().is_due(5) and not d.log_cadence().is_due(7)
    g = torch.Generator().manual_seed(0)
    losses = (2.0 + 0.01 * torch.randn(30, generator=g, dtype=torch.float64)).tolist()
    losses[17] = 3.0
    losses[23] = math.nan
    results = []
    for step, loss in enumerate(losses, start=1):
        d.observe(_ctx(step=step, loss=T(loss)))
        if step % 5 == 0:
            results.append(d.compute())
            d.reset()
    assert "stability/spike/loss" not in results[0].scalars  # 5 warm-up steps, then scored
    assert results[1].scalars["stability/spike/loss"].item() < 6
    assert not results[0].alerts and not results[1].alerts
    (spike,) = results[3].alerts
    assert spike.rule == "stability/loss_spike" and spike.evidence["value"] == 3.0 and spike.evidence["z"] > 50
    rules = {a.rule for a in results[4].alerts}
    assert rules == {"stability/nonfinite_loss", "stability/loss_spike"}
    assert results[4].scalars["stability/alert"].item() == 1.0
    fresh = LossSpikes(config=cfg)
    fresh.load_carried_state(d.carried_state())
    assert torch.equal(fresh.detector.history().nan_to_num(-1), d.detector.history().nan_to_num(-1))
    assert fresh.detector.seen == 30


def _shard(stored: torch.Tensor, shape: tuple[int, int], *, sharded: bool = False,
           rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None) -> Any:
    from gradwatch.engine.layers import GradientShard

    return GradientShard(stored, stored.shape[0], shape, rows or (0, shape[0]), cols or (0, shape[1]), sharded)


def test_grad_norm_spikes_observe() -> None:
    d = GradNormSpikes(config=StabilityConfig(spike_window=10, spike_warmup=3))
    for step in range(1, 6):
        mats = [torch.full((2, 2), 1.0 + 0.01 * step), torch.ones(1, 3)]
        shards = [_shard(m, tuple(m.shape)) for m in mats]
        d.observe(_ctx(step=step, world_size=1, rank=0, grad_scale=None, gradient_shards=lambda s=shards: s))
    assert d.detector.seen == 5
    hist = d.detector.history()
    assert hist[-1].item() == pytest.approx(math.sqrt(4 * 1.05 ** 2 + 3))
    # a watched block (the middle columns of a fused matrix) counts only its own entries; the grad scale applies
    fused = torch.arange(12.0).reshape(2, 6)
    d.observe(_ctx(step=6, world_size=1, rank=0, grad_scale=0.5,
                   gradient_shards=lambda: [_shard(fused, (2, 6), cols=(2, 4))]))
    assert d.detector.history()[-1].item() == pytest.approx(0.5 * float(fused[:, 2:4].norm()))


def test_grad_norm_spikes_from_fsdp2_row_shards_equal_the_whole_gradient() -> None:
    """Two ranks' row shards (torch.chunk layout: 3 + 2 rows of 5, the watched block rows 1..4) and a block
    both ranks hold whole (counted once): the all-reduced norm is that of the whole matrices."""
    torch.manual_seed(0)
    whole, small = torch.randn(5, 4, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    expected = math.sqrt(float(whole[1:4].square().sum() + small.square().sum()))
    parts = [whole[:3], whole[3:]]
    terms = []
    for rank in (0, 1):
        shards = [_shard(parts[rank], (5, 4), sharded=True, rows=(1, 4)), _shard(small, (2, 3))]
        seen: list = []
        ctx = _ctx(world_size=2, rank=rank, grad_scale=None, gradient_shards=lambda s=shards: s,
                   all_reduce=lambda t, op="sum", seen=seen: seen.append(t.clone()) or t)
        GradNormSpikes(config=StabilityConfig()).observe(ctx)
        terms.append(seen[0])
    summed = terms[0] + terms[1]  # what the all-reduce gives every rank
    assert summed[0].sqrt().item() == pytest.approx(expected, rel=1e-12) and summed[1].item() == 3


def test_noise_scale_logs_only_when_offered() -> None:
    d = NoiseScale()
    said: list = []
    d.observe(SimpleNamespace(step=1, say_once=lambda k, m: said.append(m), batch_gradient_norms=lambda: None))
    assert d._update_count == 0 and not said and d.inactive  # the default: quiet, and no more hooks
    asked = NoiseScale(StabilityConfig(noise_scale=True))
    asked.observe(SimpleNamespace(step=1, say_once=lambda k, m: said.append(m), batch_gradient_norms=lambda: None,
                                  batch_gradient_norms_reason="one batch size"))
    assert asked._update_count == 0 and len(said) == 1 and not asked.inactive and isinstance(asked.failed_result(), Results)
    norms = SimpleNamespace(sq_norm_small=T(3.0 + 40 / 4), b_small=4, sq_norm_big=T(3.0 + 40 / 32), b_big=32)
    asked.observe(SimpleNamespace(step=2, say_once=lambda k, m: None, batch_gradient_norms=lambda: norms))
    res = asked.compute().scalars
    assert res["stability/noise_scale"].item() == pytest.approx(40 / 3) and res["stability/noise_scale/examples"] == 32


# ---- several ranks ------------------------------------------------------------------------------


class _TwoRanks(SimpleNamespace):
    """A context whose all_reduce combines this rank's tensor with a fixed other rank's."""

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        other = self.other.pop(0)
        self.ops.append(op)
        both = torch.stack([t, other.to(t.dtype)])
        return {"sum": both.sum(0), "max": both.amax(0), "min": both.amin(0)}[op]


def test_reductions_over_ranks() -> None:
    """Attention max / min go across ranks (NaN where no rank measured); logit sums too."""
    d = AttentionLogits(["a", "b"])
    d._pending = {0: [T([2.0, 3.0], dtype=torch.float64), T([2.0, 2.0], dtype=torch.float64),
                      T([2.0, 2.0], dtype=torch.float64)]}  # module b measured nowhere on this rank
    ctx = _TwoRanks(step=1, world_size=2, optimizer=None, say_once=lambda k, m: None, ops=[],
                    other=[T([5.0, -math.inf], dtype=torch.float64), T([0.5, math.inf], dtype=torch.float64)])
    d.observe(ctx)
    assert ctx.ops == ["max", "min"]
    res = d.compute()
    assert res.scalars["stability/attention/max_logit/a"].item() == 5.0
    assert res.scalars["stability/attention/entropy_min/a"].item() == 0.5
    assert math.isnan(res.scalars["stability/attention/entropy_min/b"].item())
    o = OutputLogits()
    o._pending = [SimpleNamespace(log_z_sum=T(10.0), count=T(4.0), log_z_max=T(3.0), max_abs=T(1.0))]
    ctx = _TwoRanks(step=1, world_size=2, optimizer=None, say_once=lambda k, m: None, ops=[],
                    other=[T([6.0, 4.0], dtype=torch.float64), T([4.0, 7.0], dtype=torch.float64)])
    o.observe(ctx)
    res = o.compute()
    assert res.scalars["stability/logits/log_z_mean"].item() == 2.0
    assert res.scalars["stability/logits/log_z_max"].item() == 4.0 and res.scalars["stability/logits/max_abs"].item() == 7.0


def test_flag_writer_logs_at_every_logging_event() -> None:
    model = _Causal()
    watched = [SimpleNamespace(param_name=n, tag=n, family=n) for n, p in model.named_parameters() if p.dim() == 2]
    diags = build(StabilityConfig(every=10, spike_every=5), BuildInputs(config=None, watched=watched, model=model))
    assert [type(d) for d in diags][:2] == [GradNormSpikes, LossSpikes]
    assert diags[-1].emits_flag and isinstance(diags[-1], AdamEpsShare)
    assert diags[0].observe_cadence().is_due(15) and not diags[0].log_cadence().is_due(15)
