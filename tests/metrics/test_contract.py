"""The diagnostic contract (``gradwatch.metrics.base``), checked for every diagnostic of every registered family.

Cases are collected from ``gradwatch.registry.families()``: each family's ``build`` is called on a tiny
transformer (input projection, two ``nn.MultiheadAttention`` blocks in an ``nn.ModuleList``, a ``head``) with
its config's defaults, and again with every option that is off by default switched on (``per_example``, ...), so
a family registered later is picked up without an edit here. Each case runs alone through a real
:class:`Watcher` (a temporary family that builds just that diagnostic, registered through the registration
point), driven by the engine's events around a real AdamW step with two micro-batches, every cadence at 1.

For each diagnostic:
- update / compute / reset: observations accumulate as updates; ``compute`` returns typed results whose tags
  carry the diagnostic's stem; ``reset`` brings every interval state back to its default and keeps the carried
  state;
- state: the engine's state (interval state, update count, carried state) survives ``torch.save`` and
  ``torch.load(weights_only=True)`` (as HF checkpoints load it) into a fresh instance, which then computes the
  same results, and the same again after one more step on an identical copy of the model and optimizer;
- ``.to(torch.float64)`` and a device move: the states follow and the results agree;
- no torchmetrics "compute called before update" warning over a run;
- a failing ``observe`` warns exactly once over a whole run, naming the diagnostic and the layer, logs its
  failed result and training goes on.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import math
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from _support.models import TinyTransformer, sequence_data
from _support.sinks import RecordingSink

from gradwatch import WatchConfig
from gradwatch.config import Cadence
from gradwatch.engine import Watcher
from gradwatch.engine.layers import discover_matrices
from gradwatch.engine.probe import ProbeSource
from gradwatch.metrics.base import Alert, Diagnostic, Results
from gradwatch.registry import BuildInputs, Family, families, register, unregister

ALONE = "contract_case"  # the temporary family that builds one diagnostic
STEPS = 3
BATCH = 16
PROBE_BATCH = 256
TORCHMETRICS_EARLY_COMPUTE = "was called before the ``update`` method"


# ---- the cases ------------------------------------------------------------------------------------------


def _cadence_fields_to_one(config: Any) -> Any:
    """Every ``every`` / ``*_every`` field that is on set to 1: each diagnostic observes at every step."""
    changes = {f.name: 1 for f in dataclasses.fields(config)
               if (f.name == "every" or f.name.endswith("_every")) and getattr(config, f.name) not in (None, 0)}
    return dataclasses.replace(config, **changes)


def _all_on(config_class: type) -> Any:
    """The config with every bool option that is off by default switched on (those the config accepts)."""
    config = config_class()
    for f in dataclasses.fields(config):
        if getattr(config, f.name) is False:
            try:
                config = dataclasses.replace(config, **{f.name: True})
            except (ValueError, TypeError):
                pass
    return config


@dataclasses.dataclass(frozen=True)
class Case:
    family: str
    registration: Family = dataclasses.field(repr=False, compare=False)
    variant: str  # "defaults" or "all_on"
    index: int
    name: str
    config: Any
    probe_size: int

    @property
    def id(self) -> str:
        return f"{self.family}-{self.name}" + ("" if self.variant == "defaults" else "-all_on")


def _cases() -> list[Case]:
    model = TinyTransformer()
    out: list[Case] = []
    for fam in families():
        seen: set[str] = set()
        for variant, base in (("defaults", fam.config_class()), ("all_on", _all_on(fam.config_class))):
            config = _cadence_fields_to_one(base)
            inputs = BuildInputs(WatchConfig(**{f.key: False for f in families()}), discover_matrices(model).matrices, model)
            for i, d in enumerate(fam.build(config, inputs)):
                name = type(d).__name__
                if name not in seen:
                    seen.add(name)
                    out.append(Case(fam.key, fam, variant, i, name, config, d.probe_size()))
    return out


CASES = _cases()
COLLECTED = tuple(f.key for f in families())  # parametrization is fixed at collection; other tests may register more


def test_every_registered_family_has_cases():
    assert {c.family for c in CASES} == set(COLLECTED)  # each builds at least one diagnostic on the tiny model
    assert {"GradSpectrum", "PerExampleGradSpectrum", "Sharpness"} <= {c.name for c in CASES}


# ---- the harness ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def alone(case: Case) -> Iterator[None]:
    """Register a family that builds just ``case``'s diagnostic (its family's build, that one item)."""
    fam = case.registration

    def build(config: Any, inputs: BuildInputs) -> list[Diagnostic]:
        return [fam.build(config, inputs)[case.index]]

    register(Family(ALONE, fam.stem, fam.config_class, False, build))
    try:
        yield
    finally:
        unregister(ALONE)


class Run:
    """A model, its AdamW and a Watcher running the case's diagnostic alone, stepped by the engine's events."""

    def __init__(self, case: Case, *, on_error: str = "raise", device: str = "cpu",
                 like: Run | None = None) -> None:
        self.case, self.device = case, torch.device(device)
        self.model = (copy.deepcopy(like.model) if like is not None else TinyTransformer()).to(self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        if like is not None:
            self.optimizer.load_state_dict(copy.deepcopy(like.optimizer.state_dict()))  # load_state_dict keeps the tensors
        self.data = sequence_data(max(64, case.probe_size))
        self.sink = RecordingSink(one_emission_per_step=True)
        off = {f.key: False for f in families() if f.key != ALONE}
        self.watcher = Watcher(WatchConfig(**off, **{ALONE: case.config}, max_overhead=None, on_error=on_error))

    def attach(self, state: dict[str, Any] | None = None, *, hold: bool = False) -> Diagnostic:
        if state is not None:
            self.watcher.load_state_dict(state)
        source = ProbeSource(self.data, None, self.device, PROBE_BATCH, seed=0)
        self.watcher.attach(self.model, sinks=[self.sink], probe_source=source)
        (d,) = self.watcher.diagnostics
        assert type(d).__name__ == self.case.name
        if hold:  # the engine never logs (computes and resets) it: the test does
            d.log_cadence = lambda: Cadence.at([])  # type: ignore[method-assign]
        self.diagnostic = d
        return d

    def step(self, t: int) -> None:
        torch.manual_seed(t)  # extra passes fork the RNG: equal draws in runs compared with each other
        x, y = self.data.tensors
        w = self.watcher
        w.on_step_start(t)
        total = torch.zeros((), device=self.device)
        for micro in range(2):
            rows = (torch.arange(BATCH) + BATCH * (2 * t + micro)) % len(x)
            w.on_micro_batch((x[rows], y[rows]))
            loss = torch.nn.functional.cross_entropy(self.model(x[rows].to(self.device)), y[rows].to(self.device))
            (loss / 2).backward()
            total += loss.detach() / 2
        w.on_gradients_ready(t, optimizer=self.optimizer)
        self.optimizer.step()
        w.on_step_end(t, loss=total)
        self.optimizer.zero_grad(set_to_none=True)


def _observed(case: Case, steps: int = STEPS) -> Run:
    with alone(case):
        run = Run(case)
        d = run.attach(hold=True)
        counts = []
        for t in range(1, steps + 1):
            run.step(t)
            counts.append(d.update_count)
    if counts[-1] == 0:
        pytest.skip(f"{case.name} made no update in {steps} steps of one process")
    assert counts == sorted(counts), counts  # observations accumulate in the interval
    return run


def _plain(value: Any) -> Any:
    """Results and carried state as comparable plain values (tensors as float64 lists, NaN kept as 'nan')."""
    if isinstance(value, torch.Tensor):
        return _plain(value.detach().cpu().double().tolist()) if value.is_floating_point() else value.cpu().tolist()
    if isinstance(value, float):
        return "nan" if math.isnan(value) else value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Alert):
        return _plain(value.as_record())
    if isinstance(value, Results):
        return {k: _plain(getattr(value, k)) for k in ("scalars", "vectors", "records", "texts", "alerts")}
    return value


def _close(a: Any, b: Any, rel: float) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], rel) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y, rel) for x, y in zip(a, b))
    return a == b


def _float_states(d: Diagnostic) -> dict[str, torch.Tensor]:
    out = {}
    for name in d._defaults:
        value = getattr(d, name)
        for i, t in enumerate(value if isinstance(value, list) else [value]):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                out[f"{name}[{i}]"] = t
    return out


# ---- the contract -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_update_compute_reset(case):
    run = _observed(case)
    d = run.diagnostic
    res = Results.of(d.compute())
    assert isinstance(res, Results)
    for tag, value in res.scalars.items():
        assert isinstance(value, torch.Tensor) and value.ndim == 0, (tag, value)
    for tag, value in res.vectors.items():
        assert isinstance(value, torch.Tensor) and value.ndim == 1, (tag, value)
    for tag, text in res.texts.items():
        assert isinstance(text, str), tag
    for tag in [*res.scalars, *res.vectors, *res.texts]:
        assert tag.startswith(f"{d.stem}/"), f"{tag} is not under the stem {d.stem}/"
    for stem, rows in res.records.items():
        for row in rows:
            json.dumps(_plain(dict(row)))  # one JSON line each
    for alert in res.alerts:
        assert isinstance(alert, Alert) and alert.severity in ("info", "warning", "critical")
    assert _plain(Results.of(d.compute())) == _plain(res)  # compute does not consume the interval
    carried = _plain(d.carried_state())  # compute may move it on (a logged history); reset must not
    d.reset()
    assert d.update_count == 0
    for name, default in d._defaults.items():
        value = getattr(d, name)
        if isinstance(default, torch.Tensor):
            assert value.shape == default.shape and _plain(value) == _plain(default), \
                f"state {name} not back to its default after reset"
        else:
            assert value == [] and default == [], name
    assert _plain(d.carried_state()) == carried, "reset touched the carried state"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_state_round_trip_into_a_fresh_instance(case):
    a = _observed(case)
    buf = io.BytesIO()
    torch.save(a.watcher.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)  # as HF's checkpoint-N is read: tensors, numbers, strings, lists
    with alone(case):
        b = Run(case, like=a)
        fresh = b.attach(state, hold=True)
        assert fresh is not a.diagnostic and fresh.update_count == a.diagnostic.update_count
        assert _plain(fresh.carried_state()) == _plain(a.diagnostic.carried_state())
        assert _plain(Results.of(fresh.compute())) == _plain(Results.of(a.diagnostic.compute()))
        # the carried state is all the next observation needs: one more step on identical copies
        a.step(STEPS + 1)
        b.step(STEPS + 1)
    assert fresh.update_count == a.diagnostic.update_count
    assert _plain(Results.of(fresh.compute())) == _plain(Results.of(a.diagnostic.compute()))


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_float64_states_and_device_move(case, device):
    reference = _observed(case, steps=2)
    with alone(case):
        run = Run(case, device=device)
        d = run.attach(hold=True)
        d.to(torch.float64)
        assert all(t.dtype == torch.float64 for t in _float_states(d).values())
        for t in (1, 2):
            run.step(t)
    assert d.update_count == reference.diagnostic.update_count
    states = _float_states(d)
    assert all(t.dtype == torch.float64 and t.device.type == device for t in states.values()), \
        {k: (t.dtype, t.device) for k, t in states.items()}
    got, want = _plain(Results.of(d.compute())), _plain(Results.of(reference.diagnostic.compute()))
    assert _close(got, want, rel=1e-6 if device == "cpu" else 1e-3), (got, want)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_no_compute_before_update_warning_over_a_run(case):
    with alone(case), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = Run(case)
        run.attach()
        for t in range(1, 6):
            run.step(t)
    early = [str(w.message) for w in caught if TORCHMETRICS_EARLY_COMPUTE in str(w.message)]
    assert early == []
    assert run.sink.emissions, "nothing was logged in 5 steps at cadence 1"


class PlantedFailure(RuntimeError):
    layer = "blocks.0.mlp.0.weight"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_failing_observe_warns_once_over_a_run(case):
    with alone(case), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = Run(case, on_error="warn")
        d = run.attach()
        healthy = d.observe

        def observe(ctx):  # noqa: ANN001
            if ctx.step == 1:
                return healthy(ctx)
            raise PlantedFailure("planted failure")

        d.observe = observe  # type: ignore[method-assign]
        for t in range(1, 7):
            run.step(t)  # training goes on
    messages = [str(w.message) for w in caught]
    naming = [m for m in messages if case.name in m]
    assert len(naming) == 1, messages
    assert "failed" in naming[0] and "planted failure" in naming[0] and "at step 2" in naming[0], naming
    assert "on layer blocks.0.mlp.0.weight" in naming[0], naming
    assert not [m for m in messages if TORCHMETRICS_EARLY_COMPUTE in m or " failed " in m and m not in naming]
    failed = {tag: float(v) for tag, v in d.failed_result().scalars.items()}  # NaN for what it measures
    logged_after = [s for s in run.sink.emissions if s >= 2]
    assert logged_after, "nothing logged after the failure"
    for step in logged_after:
        logged = {tag: run.sink.emissions[step].scalars[tag] for tag in failed}
        assert _plain(logged) == _plain(failed), (step, logged, failed)
