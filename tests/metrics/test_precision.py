"""A diagnostic's precision options hold after the engine's ``.to(device)`` at attach.

torchmetrics owns several attributes of every ``Metric`` (``_dtype``, ``_device``, ``_update_count``, ...) and
rewrites some of them on every ``.to()``: a diagnostic that kept its own dtype in ``_dtype`` silently ran in
float32 once attached (``StabilityConfig(attention_precision="float64")`` did). Two checks: no diagnostic class
of any registered family assigns a name torchmetrics manages, and the float64 options of the families that have
them (stability's attention logits, moe's router statistics) compute in float64 when built by
:meth:`Watcher.attach`, against a float64 recomputation of the very same calls with a tolerance only float64 meets.
"""

from __future__ import annotations

import ast
import inspect
import textwrap

import pytest
import torch
from _support.moe import tiny_mixtral, token_batches
from torchmetrics import Metric

import gradwatch.metrics.moe.routing as routing_module
import gradwatch.metrics.stability.attention as attention_module
from gradwatch import WatchConfig
from gradwatch.engine import Watcher
from gradwatch.metrics.base import Diagnostic
from gradwatch.metrics.moe import MoEConfig
from gradwatch.metrics.stability import StabilityConfig
from gradwatch.registry import families


def _torchmetrics_names() -> set[str]:
    """Every attribute a bare ``Metric`` instance holds, and every name its class defines."""

    class Bare(Metric):
        def update(self) -> None: ...

        def compute(self) -> None: ...

    return (set(vars(Bare())) | set(dir(Metric))) - set(dir(object))


def _assigned(cls: type) -> set[str]:
    """The ``self.<name>`` attributes the class's own methods assign (``=``, ``+=``, annotated, ``setattr``)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    names = set()
    for node in ast.walk(tree):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            targets = [node.target]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr"
              and len(node.args) >= 2 and isinstance(node.args[0], ast.Name) and node.args[0].id == "self"
              and isinstance(node.args[1], ast.Constant)):
            names.add(node.args[1].value)
        for target in targets:
            for t in ast.walk(target):
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                    names.add(t.attr)
    return names


def _gradwatch_metric_classes() -> list[type]:
    for family in families():  # every family's modules imported
        family.config_class  # noqa: B018
    seen: list[type] = []
    todo = list(Metric.__subclasses__())
    while todo:
        cls = todo.pop()
        if cls not in seen:
            seen.append(cls)
            todo.extend(cls.__subclasses__())
    return sorted((c for c in seen if c.__module__.startswith("gradwatch.")), key=lambda c: c.__qualname__)


def test_no_diagnostic_assigns_an_attribute_torchmetrics_manages() -> None:
    owned = _torchmetrics_names()
    assert {"_dtype", "_device", "_update_count", "_defaults", "_reductions"} <= owned
    classes = _gradwatch_metric_classes()
    stems = {getattr(c, "stem", None) for c in classes}
    assert {f.stem for f in families()} <= stems | {None}, "every family's diagnostics are scanned"
    assert Diagnostic in classes and attention_module.AttentionLogits in classes
    clashes = sorted(f"{c.__module__}.{c.__qualname__}.{n}" for c in classes for n in _assigned(c) & owned)
    assert clashes == []

    class Clashing(Diagnostic):  # the check has eyes
        def __init__(self) -> None:
            super().__init__()
            self._dtype = torch.float64

    assert _assigned(Clashing) & owned == {"_dtype"}
    assert "_logit_dtype" in _assigned(attention_module.AttentionLogits)


def _relative(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double(), ref.double()
    finite = torch.isfinite(ref) & (ref != 0)
    if not finite.any():
        return 0.0
    return float(((got - ref)[finite].abs() / ref[finite].abs()).max())


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_float64_options_compute_in_float64_after_attach(monkeypatch: pytest.MonkeyPatch, precision: str) -> None:
    """Each call the attached diagnostics make is recomputed here in float64 from the same inputs: with the
    float64 options the two agree to 1e-12 (float32 misses that by orders of magnitude, the control)."""
    seen: dict[str, list[tuple[torch.dtype, float]]] = {"attention": [], "moe": []}
    attention_stats, router_stats = attention_module.attention_logit_statistics, routing_module.router_statistics

    def attention_spy(*args, **kwargs):
        got = attention_stats(*args, **kwargs)
        ref = attention_stats(*args, **{**kwargs, "dtype": torch.float64})
        seen["attention"].append((got.max_logit.dtype, max(_relative(got.max_logit, ref.max_logit),
                                                           _relative(got.entropy_sum, ref.entropy_sum))))
        return got

    def router_spy(logits, **kwargs):
        got = router_stats(logits, **kwargs)
        ref = router_stats(logits, **{**kwargs, "dtype": torch.float64})
        seen["moe"].append((kwargs["dtype"], max(_relative(got.entropy_sum, ref.entropy_sum),
                                                 _relative(got.log_z_sq_sum, ref.log_z_sq_sum))))
        return got

    monkeypatch.setattr(attention_module, "attention_logit_statistics", attention_spy)
    monkeypatch.setattr(routing_module, "router_statistics", router_spy)

    model = tiny_mixtral()
    off = {f.key: False for f in families() if f.key not in ("stability", "moe")}
    stability = StabilityConfig(every=1, logits=False, activations=False, update_ratio=False, adam=False,
                                spikes=False, noise_scale=False, attention_precision=precision)
    watcher = Watcher(WatchConfig(**off, stability=stability, moe=MoEConfig(every=1, precision=precision),
                                  max_overhead=None, on_error="raise"))
    watcher.attach(model)  # .to(the model's device) on every diagnostic
    assert {type(d).__name__ for d in watcher.diagnostics} >= {"AttentionLogits", "MoERouting"}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    logged = {}
    for t, batch in enumerate(token_batches(2), start=1):
        watcher.on_step_start(t)
        model(**batch)["loss"].backward()
        watcher.on_gradients_ready(t, optimizer=optimizer)
        optimizer.step()
        logged = watcher.on_step_end(t, loss=0.0)
        optimizer.zero_grad(set_to_none=True)
    assert any(tag.startswith("stability/attention/max_logit") for tag in logged), sorted(logged)
    assert any(tag.startswith("moe/") and tag.endswith("/entropy") for tag in logged), sorted(logged)

    want = getattr(torch, precision)
    for family, calls in seen.items():
        assert calls, f"{family}: no call measured"
        assert {dtype for dtype, _ in calls} == {want}, family
        worst = max(error for _, error in calls)
        if precision == "float64":
            assert worst < 1e-12, (family, worst)
        else:
            assert worst > 1e-10, (family, worst)  # the tolerance tells the two precisions apart
