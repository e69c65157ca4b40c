"""The ``moe`` family (MoE routing health): the router convention, every tag against a float64 reference computed
here from the routers' captured outputs (driven through a real :class:`Watcher`), the planted collapse against
balanced null controls, state across a checkpoint, and bad input. The math alone is in
``tests/functional/test_moe_functional.py``, the hosts (Lightning, HF Trainer) in
``tests/callbacks/test_moe_hosts.py``."""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
import pytest
import torch
from _support.models import TinyTransformer
from _support.moe import RouterTap, TinyMoE, TopKRouter, reference, tiny_mixtral, tiny_olmoe, tiny_qwen2_moe, tiny_switch, token_batches
from torch import nn

import gradwatch
from gradwatch import WatchConfig
from gradwatch.engine import Watcher
from gradwatch.metrics.moe import RULE, MoEConfig, Router, find_routers, read_router_output
from gradwatch.registry import families

STATS = ("load_cv", "load_max", "load_entropy", "entropy", "z_loss", "log_z")


# ---- the router convention -------------------------------------------------------------------------------


class _GateInside(nn.Module):
    """A router that holds its gate Linear: only the outer module is a router."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.top_k = 4, 1
        self.gate = nn.Linear(8, 4)

    def forward(self, h):
        return {"router_logits": self.gate(h), "expert_indices": self.gate(h).argmax(-1, keepdim=True)}


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.num_experts_per_tok = 2
        self.gate = nn.Linear(8, 4, bias=False)  # a pre-5.x Hugging Face style gate: logits only
        self.moe = nn.Module()
        self.moe.router = _GateInside()
        self.mlp = nn.Module()
        self.mlp.gate_proj = nn.Linear(8, 8)  # a dense gated MLP: not a router


def test_find_routers():
    assert find_routers(TinyTransformer()) == []
    found = {r.name: (r.num_experts, r.top_k) for r in find_routers(TinyMoE(num_experts=4, top_k=2))}
    assert found == {"layers.0.router": (4, 2), "layers.1.router": (4, 2)}
    assert {r.name: (r.num_experts, r.top_k) for r in find_routers(TinyMoE(gate="linear"))} == \
        {"layers.0.gate": (4, 2), "layers.1.gate": (4, 2)}  # top_k from the parent block
    assert {r.name: (r.num_experts, r.top_k) for r in find_routers(_Block())} == {"gate": (4, 2), "moe.router": (4, 1)}
    assert find_routers(_Block(), ["moe.router.gate"], top_k=3) == [Router("moe.router.gate", 4, 1)]  # its parent's k
    assert find_routers(_Block(), ["mlp.gate_*"], top_k=3) == [Router("mlp.gate_proj", 8, 3)]  # the fallback
    with pytest.raises(ValueError, match=r"module 'moe' \(Module\) matches MoEConfig.routers but its number of experts"):
        find_routers(_Block(), ["moe"])
    for build in (tiny_mixtral, tiny_qwen2_moe, tiny_olmoe):  # shared_expert_gate (Qwen2-MoE) is no router
        assert {r.name: (r.num_experts, r.top_k) for r in find_routers(build(num_experts=4))} == \
            {f"model.layers.{i}.mlp.gate": (4, 2) for i in range(2)}, build.__name__


def test_read_router_output_conventions():
    z = torch.randn(5, 4)
    idx = torch.zeros(5, 2, dtype=torch.long)
    assert read_router_output(z, 4).logits is z and read_router_output(z, 4).indices is None
    hf = read_router_output((z, torch.rand(5, 2), idx), 4)  # Hugging Face 5.x *TopKRouter
    assert hf.logits is z and hf.indices is idx
    mask = torch.ones(5, 4, dtype=torch.long)
    switch = read_router_output((mask, torch.softmax(z, -1), z), 4)  # Switch Transformers *Top1Router
    assert switch.logits is z and switch.dispatch_mask is mask and switch.indices is None
    assert read_router_output({"router_logits": z, "indices": idx}, 4).indices is idx
    assert read_router_output(torch.randn(5, 3), 4) is None and read_router_output(("no",), 4) is None


# ---- through the engine ------------------------------------------------------------------------------------


class Sink:
    def __init__(self) -> None:
        self.emissions: dict[int, Any] = {}

    def open(self, charts):  # noqa: ANN001
        self.charts = list(charts)

    def write(self, step, emission):  # noqa: ANN001
        self.emissions[step] = emission

    def flush(self):
        pass

    def close(self):
        pass

    def state_dict(self):
        return {}

    def load_state_dict(self, state):  # noqa: ANN001
        pass


def train(model: nn.Module, config: MoEConfig | None, steps: int, *, lr: float = 1e-2, accumulate: int = 1,
          vocab: int = 32, seed: int = 0, state: dict | None = None, start: int = 1,
          on_error: str = "raise") -> tuple[Watcher | None, Sink]:
    """AdamW on :func:`token_batches`, driven through the engine's events (``config=None``: no gradwatch;
    strict by default: a failure or an alert raises)."""
    sink = Sink()
    watcher = None
    if config is not None:
        off = {f.key: False for f in families() if f.key != "moe"}
        watcher = Watcher(WatchConfig(**off, moe=config, max_overhead=None, on_error=on_error))
        if state is not None:
            watcher.load_state_dict(state)
        watcher.attach(model, sinks=[sink])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    batches = token_batches((start + steps) * accumulate, vocab=vocab, seed=seed)
    for t in range(start, start + steps):
        if watcher:
            watcher.on_step_start(t)
        for micro in range(accumulate):
            batch = batches[(t - 1) * accumulate + micro]
            if watcher:
                watcher.on_micro_batch(batch)
            (model(**batch)["loss"] / accumulate).backward()
        if watcher:
            watcher.on_gradients_ready(t, optimizer=optimizer)
        optimizer.step()
        if watcher:
            watcher.on_step_end(t, loss=torch.zeros(()))
        optimizer.zero_grad(set_to_none=True)
    return watcher, sink


def _check_against_reference(sink: Sink, tap: RouterTap, routers: list[str], due: dict[int, range], rel: float,
                             top_k: int | None = None, dropped: bool = True) -> None:
    """Every tag at every step of ``due`` (step -> the tap's call indices behind it) against :func:`reference`."""
    for step, calls in due.items():
        scalars = sink.emissions[step].scalars
        for name in routers:
            ref = reference([tap.calls[name][c] for c in calls], top_k)
            for stat in STATS + (("dropped",) if dropped else ()):
                assert scalars[f"moe/{name}/{stat}"] == pytest.approx(ref[stat], rel=rel, abs=1e-12), (step, name, stat)
            shares = [scalars[f"moe/{name}/load/{e}"] for e in range(len(ref["load"]))]
            np.testing.assert_allclose(shares, ref["load"], rtol=rel, atol=1e-12)
            if not dropped:
                assert f"moe/{name}/dropped" not in scalars
        assert scalars["moe/alert"] == 0.0


@pytest.mark.parametrize("precision, rel", [("float64", 1e-10), ("float32", 2e-5)])
def test_hand_written_router_against_float64_reference(precision, rel):
    """Capacity 10 of 64 assignments per expert and call: dropped assignments; two micro-batches per step: an
    interval holds two calls per router."""
    model = TinyMoE(num_experts=4, top_k=2, capacity=10)
    routers = ["layers.0.router", "layers.1.router"]
    tap = RouterTap(model, routers, 4)

    watcher, sink = train(model, MoEConfig(every=1, precision=precision), 4, accumulate=2)
    tap.remove()
    assert sorted(sink.emissions) == [1, 2, 3, 4]
    _check_against_reference(sink, tap, routers, {t: range(2 * (t - 1), 2 * t) for t in (1, 2, 3, 4)}, rel)
    assert 0 < sink.emissions[1].scalars["moe/layers.0.router/dropped"] < 1
    assert watcher.capture.calls["layers.0.router"] == 8


def test_linear_gate_and_interval_of_several_steps():
    """A plain Linear gate (logits only, top-k from the parent block): load from the top-k logits, no
    ``dropped`` tag; at steps 1, 2 and 4 (``every=2``)."""
    model = TinyMoE(gate="linear", num_experts=4, top_k=2)
    routers = ["layers.0.gate", "layers.1.gate"]
    tap = RouterTap(model, routers, 4)
    config = MoEConfig(every=2, precision="float64")
    watcher, sink = train(model, config, 4)
    tap.remove()
    assert sorted(sink.emissions) == [1, 2, 4]
    _check_against_reference(sink, tap, routers, {1: range(0, 1), 2: range(1, 2), 4: range(3, 4)}, 1e-10, top_k=2,
                             dropped=False)


@pytest.mark.parametrize("build", [tiny_mixtral, tiny_olmoe])
def test_hugging_face_router_against_float64_reference(build):
    model = build(num_experts=4)
    routers = [f"model.layers.{i}.mlp.gate" for i in range(2)]
    tap = RouterTap(model, routers, 4)
    _, sink = train(model, MoEConfig(every=2, precision="float64"), 4, vocab=64)
    tap.remove()
    _check_against_reference(sink, tap, routers, {1: range(0, 1), 2: range(1, 2), 4: range(3, 4)}, 1e-10)
    assert sink.emissions[2].scalars["moe/model.layers.0.mlp.gate/dropped"] == 0.0  # dropless
    charts = {c.title: c.tags for c in sink.charts}
    assert charts["expert load CV"] == tuple(f"moe/{r}/load_cv" for r in routers)
    assert charts["expert load: model.layers.1.mlp.gate"] == tuple(f"moe/model.layers.1.mlp.gate/load/{e}" for e in range(4))


def test_switch_transformers_reports_dropped_tokens():
    """Switch Transformers' top-1 routers return a dispatch mask with the tokens over capacity (2 per expert and
    sequence of 16) zeroed: ``dropped`` is what the model dropped."""
    model = tiny_switch(capacity=2)
    routers = [n for n, _ in model.named_modules() if n.endswith("mlp.router")]
    assert len(routers) == 4 and [r.name for r in find_routers(model)] == routers
    tap = RouterTap(model, routers, 4)
    _, sink = train(model, MoEConfig(every=1, precision="float64"), 2)
    tap.remove()
    _check_against_reference(sink, tap, routers, {1: range(0, 1), 2: range(1, 2)}, 1e-10)
    assert sink.emissions[1].scalars[f"moe/{routers[0]}/dropped"] >= 1 - 4 * 2 / 16  # at most 8 of 16 kept


def test_gradient_checkpointing_reads_each_forward_once():
    """Mixtral with gradient checkpointing re-runs every layer's forward in backward: the engine reads the routers
    once per micro-batch, so the tags equal those of the run without checkpointing."""
    def run(checkpointing: bool):
        model = tiny_mixtral(num_experts=4)
        if checkpointing:
            (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
            model.config.use_cache = False
        forwards = []
        model.model.layers[0].mlp.gate.register_forward_hook(lambda *a: forwards.append(1))
        watcher, sink = train(model, MoEConfig(every=1), 2, vocab=64)
        return watcher, sink, len(forwards)

    plain_watcher, plain, plain_forwards = run(False)
    watcher, checkpointed, forwards = run(True)
    assert forwards == 2 * plain_forwards == 4  # recomputed in backward
    assert watcher.capture.calls["model.layers.0.mlp.gate"] == plain_watcher.capture.calls["model.layers.0.mlp.gate"] == 2
    for step in (1, 2):
        a, b = plain.emissions[step].scalars, checkpointed.emissions[step].scalars
        moe = [t for t in a if t.startswith("moe/")]
        assert moe and all(b[t] == pytest.approx(a[t], rel=1e-6, abs=1e-9) for t in moe)


class _Ranks:
    """A stand-in for the engine's context on rank 0 of 2 where the other rank routed exactly the same batch."""

    step, world_size = 1, 2

    def all_reduce(self, tensor, op="sum"):  # noqa: ANN001
        assert op == "sum"
        return tensor * 2

    def say_once(self, key, message):  # noqa: ANN001
        pass


def test_sums_are_reduced_over_ranks():
    model = TinyMoE(num_experts=4, top_k=2, capacity=20)
    (d,) = gradwatch.metrics.moe.build(MoEConfig(every=1, precision="float64"), _inputs(model))
    sites = d.activation_sites(model)
    handles = [site.module.register_forward_hook(lambda m, a, o, f=site.on_forward: f(m, a, {}, o)) for site in sites]
    tap = RouterTap(model, ["layers.0.router"], 4)
    with torch.no_grad():
        model(**token_batches(1)[0])
    for h in handles:
        h.remove()
    d.observe(_Ranks())
    ref = reference(tap.calls["layers.0.router"])  # twice the same batch: the same shares and means
    res = d.compute()
    for stat in STATS + ("dropped",):
        assert res.scalars[f"moe/layers.0.router/{stat}"].item() == pytest.approx(ref[stat], rel=1e-10), stat
    assert d.sums[0, 0].item() == 2 * 128  # tokens of both ranks


def _inputs(model: nn.Module):
    from gradwatch.registry import BuildInputs

    return BuildInputs(WatchConfig(moe=True), [], model)


def test_observe_only_bitwise():
    def weights(config):
        model = TinyMoE(capacity=12)
        train(model, config, 3, accumulate=2)
        return {k: v.clone() for k, v in model.state_dict().items()}

    without, with_gw = weights(None), weights(MoEConfig(every=1))
    assert not torch.equal(without["layers.0.router.weight"], TinyMoE(capacity=12).state_dict()["layers.0.router.weight"])
    assert [k for k in without if not torch.equal(without[k], with_gw[k])] == []


# ---- the collapse rule ---------------------------------------------------------------------------------------


def test_planted_collapse_raises_the_alert_after_sustain_events():
    """Every router biased to experts 0 and 1 (frozen): CV sqrt(8/2 - 1) = 1.73 > 1, load entropy ln 2 < 0.5 ln 8;
    the alert at the third logging event in a row, naming the experts; the remedies name the aux loss."""
    model = TinyMoE(num_experts=8, top_k=2).plant_collapse((0, 1))
    watcher, sink = train(model, MoEConfig(every=2, sustain=3), 8, on_error="warn")
    flags = {t: e.scalars["moe/alert"] for t, e in sink.emissions.items()}
    assert flags == {1: 0.0, 2: 0.0, 4: 1.0, 6: 1.0, 8: 1.0}  # the rule held at 4, 6, 8
    (alert,) = [a for e in sink.emissions.values() for a in e.alerts]  # said once: the engine's cooldown
    assert alert.rule == RULE and alert.step == 4 and alert.severity == "warning"
    assert alert.evidence["router"] in ("layers.0.router", "layers.1.router") and len(alert.evidence["routers"]) == 2
    assert alert.evidence["load_cv"] == pytest.approx(math.sqrt(3)) and alert.evidence["streak"] == 3
    assert alert.evidence["load_entropy"] == pytest.approx(math.log(2))
    assert set(alert.evidence["top_experts"]) == {"0", "1"} and alert.evidence["dead_experts"] == [2, 3, 4, 5, 6, 7]
    assert [t[0] for t in alert.evidence["trend"]] == [1, 2, 4]
    assert "experts [0, 1] take 100% of the assignments (1 more router(s) too)" in alert.message and "collapsing" in alert.message
    assert any("load-balancing auxiliary loss" in r for r in alert.remedies)
    assert sink.emissions[8].scalars["moe/layers.0.router/load_cv"] == pytest.approx(math.sqrt(3))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_balanced_routers_raise_nothing(seed):
    """Null controls: freshly initialised top-2 of 8 routers (no aux loss) over 12 steps, several seeds."""
    model = TinyMoE(num_experts=8, top_k=2, seed=seed)
    _, sink = train(model, MoEConfig(every=1, sustain=3), 12, seed=seed)
    assert not [a for e in sink.emissions.values() for a in e.alerts]
    cvs = [e.scalars["moe/layers.1.router/load_cv"] for e in sink.emissions.values()]
    assert max(cvs) < 1.0


def test_hugging_face_collapse_and_remedies_quote_its_config():
    """Mixtral with its gates zeroed and frozen: every token's logits tie and the same 2 of 8 experts take it."""
    model = tiny_mixtral(num_experts=8)
    for i in range(2):
        gate = model.model.layers[i].mlp.gate
        gate.weight.data.zero_()
        gate.weight.requires_grad_(False)
    _, sink = train(model, MoEConfig(every=1, sustain=2), 2, vocab=64, on_error="warn")
    (alert,) = sink.emissions[2].alerts
    assert alert.evidence["load_cv"] == pytest.approx(math.sqrt(3))
    assert "output_router_logits=False" in alert.remedies[0] and "(0.001)" in alert.remedies[0]


def test_few_assignments_are_not_judged():
    model = TinyMoE(num_experts=8, top_k=2).plant_collapse((0, 1))
    _, sink = train(model, MoEConfig(every=1, sustain=1, min_assignments=1e4), 2)
    assert not [a for e in sink.emissions.values() for a in e.alerts]


# ---- state, config ---------------------------------------------------------------------------------------------


def test_state_across_a_checkpoint():
    """A run interrupted after step 2 (two collapsing events of the three the rule needs) and resumed from the
    engine's state, saved and loaded as HF checkpoints are, raises the alert at step 3 as the uninterrupted run
    does (the streak is carried), with the same tags (the resumed AdamW is fresh: step 3's forward comes before
    its update)."""
    config = MoEConfig(every=1, sustain=3)
    full = TinyMoE(num_experts=8, top_k=2).plant_collapse((0, 1))
    _, full_sink = train(full, config, 4, on_error="warn")
    part = TinyMoE(num_experts=8, top_k=2).plant_collapse((0, 1))
    watcher, _ = train(part, config, 2, on_error="warn")
    buf = io.BytesIO()
    torch.save(watcher.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    resumed_model = TinyMoE(num_experts=8, top_k=2).plant_collapse((0, 1))
    resumed_model.load_state_dict(part.state_dict())
    _, resumed = train(resumed_model, config, 2, state=state, start=3, on_error="warn")
    assert [a.step for e in full_sink.emissions.values() for a in e.alerts] == [3]
    assert [a.step for e in resumed.emissions.values() for a in e.alerts] == [3]  # the streak came back
    for tag in ("moe/layers.0.router/load_cv", "moe/layers.1.router/entropy", "moe/alert"):
        assert resumed.emissions[3].scalars[tag] == pytest.approx(full_sink.emissions[3].scalars[tag], rel=1e-6), tag


def test_compute_twice_and_reset_keep_the_carried_state():
    model = TinyMoE(num_experts=8, top_k=2).plant_collapse((0, 1))
    watcher, _ = train(model, MoEConfig(every=1, sustain=5), 2)
    (d,) = watcher.diagnostics
    d.log_cadence = lambda: gradwatch.Cadence.at([])  # type: ignore[method-assign]  # the test computes
    train_more = token_batches(4)[3]
    watcher.on_step_start(3)
    model(**train_more)["loss"].backward()
    watcher.on_gradients_ready(3)
    watcher.on_step_end(3)
    assert d.update_count == 1
    first, second = d.compute(), d.compute()
    assert {k: v.item() for k, v in first.scalars.items()} == {k: v.item() for k, v in second.scalars.items()}
    assert d.rule.streak == [3, 3]  # counted once for step 3, not twice
    carried = d.carried_state()
    d.reset()
    assert d.update_count == 0 and not d.counts.any() and not d.sums.any()
    assert d.carried_state() == carried and carried["reports"] == [True, True]


def test_config_and_registration():
    assert gradwatch.MoEConfig is MoEConfig and WatchConfig().moe is None and WatchConfig(moe=True).moe == MoEConfig()
    assert MoEConfig(routers="*.gate").routers == ("*.gate",)
    for kwargs, message in [
        ({"every": 0}, r"`MoEConfig.every` expected a positive int or a gradwatch.Cadence, got 0"),
        ({"routers": [""]}, r"`MoEConfig.routers` expected a list of non-empty glob patterns"),
        ({"top_k": 0}, r"`MoEConfig.top_k` expected an int >= 1, got 0"),
        ({"per_expert": 1}, r"`MoEConfig.per_expert` expected True or False, got 1"),
        ({"precision": "bf16"}, r"`MoEConfig.precision` expected one of \['float32', 'float64'\], got 'bf16'"),
        ({"cv_limit": 0}, r"`MoEConfig.cv_limit` expected a number in \(0.0, 1000000.0\], got 0"),
        ({"entropy_floor": 1.5}, r"`MoEConfig.entropy_floor` expected a number in \[0.0, 1.0\], got 1.5"),
        ({"sustain": 0}, r"`MoEConfig.sustain` expected an int >= 1, got 0"),
        ({"min_assignments": -1}, r"`MoEConfig.min_assignments` expected a number in \[0.0, 1000000000000.0\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            MoEConfig(**kwargs)


def test_hf_flags(tmp_path):
    transformers = pytest.importorskip("transformers")
    from gradwatch.integrations.huggingface import arguments_dataclass, config_from_training_args

    parser = transformers.HfArgumentParser((transformers.TrainingArguments, arguments_dataclass()))
    _, ours = parser.parse_args_into_dataclasses(args=[
        "--output_dir", str(tmp_path), "--gradwatch_moe_every", "5", "--gradwatch_moe_cv_limit", "2",
        "--gradwatch_moe_precision", "float64", "--gradwatch_moe_per_expert", "false"])
    assert config_from_training_args(ours, environ={}).moe == MoEConfig(every=5, cv_limit=2.0, precision="float64",
                                                                         per_expert=False)
    assert config_from_training_args(arguments_dataclass()(), environ={}).moe is None  # off by default


def test_model_without_routers_and_router_without_top_k_are_named_once():
    dense = TinyTransformer()
    off = {f.key: False for f in families() if f.key != "moe"}
    watcher = Watcher(WatchConfig(**off, moe=MoEConfig(every=1), max_overhead=None))
    sink = Sink()
    watcher.attach(dense, sinks=[sink])
    with pytest.warns(RuntimeWarning, match=r"moe: no router found in the model .*only moe/alert is logged") as caught:
        for t in (1, 2):
            watcher.on_step_start(t)
            dense(torch.randn(2, 4, 8))
            watcher.on_gradients_ready(t)
            watcher.on_step_end(t)
    assert len([w for w in caught if "no router found" in str(w.message)]) == 1
    assert sink.emissions[2].scalars["moe/alert"] == 0.0 and not [t for t in sink.emissions[2].scalars if
                                                                  t.startswith("moe/") and t != "moe/alert"]

    class Bare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate = nn.Linear(16, 4)

        def forward(self, input_ids, labels=None, attention_mask=None):
            return {"loss": self.gate(torch.randn(8, 16)).sum()}

    model = Bare()
    watcher = Watcher(WatchConfig(**off, moe=MoEConfig(every=1), max_overhead=None))
    watcher.attach(model, sinks=[sink])
    with pytest.warns(RuntimeWarning, match=r"router 'gate' returns logits only and names no top_k: its load is not "
                                            r"logged \(set MoEConfig\(top_k=\.\.\.\)\)"):
        watcher.on_step_start(3)
        model(None)
        watcher.on_gradients_ready(3)
        watcher.on_step_end(3)
    scalars = sink.emissions[3].scalars
    assert math.isnan(scalars["moe/gate/load_cv"]) and math.isfinite(scalars["moe/gate/entropy"])
    assert find_routers(model, top_k=2)[0].top_k == 2  # what the message asks for


def test_router_of_unreadable_output_is_named_once():
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.router = TopKRouter(16, 4, 2)

        def forward(self, input_ids, labels=None, attention_mask=None):
            self.router(torch.randn(3, 16))
            return {"loss": self.router.weight.sum() * 0}

    model = Odd()
    model.router.forward = lambda h: "nothing"  # type: ignore[method-assign]
    off = {f.key: False for f in families() if f.key != "moe"}
    watcher = Watcher(WatchConfig(**off, moe=MoEConfig(every=1), max_overhead=None))
    sink = Sink()
    watcher.attach(model, sinks=[sink])
    with pytest.warns(RuntimeWarning, match=r"router 'router' \(TopKRouter\) returned no logits \[\.\.\., 4\]") as caught:
        for t in (1, 2):
            watcher.on_step_start(t)
            model(**token_batches(1)[0])
            watcher.on_gradients_ready(t)
            watcher.on_step_end(t)
    assert len([w for w in caught if "returned no logits" in str(w.message)]) == 1
    assert math.isnan(sink.emissions[2].scalars["moe/router/entropy"])
