"""A family defined here, registered through ``gradwatch.registry.register`` alone, gets everything a built-in
family gets, with no edit to the engine, the callbacks or the config module: its ``WatchConfig`` keyword (and
export), its knobs (HF ``TrainingArguments`` fields parsed by ``HfArgumentParser``, ``GRADWATCH_*`` variables),
its tags and chart in TensorBoard, a JSONL record, an alert (``alerts.jsonl`` and the TensorBoard text
``gradwatch/alerts``), and its interval and carried state across a Lightning checkpoint resume.

The toy diagnostic observes the training loss at every step and logs every 3 steps (an interval of three
observations: the one over steps 4-6 spans the checkpoint at step 4); its carried state is the count of every
observation of the run and the first loss it saw; it raises an alert when an interval's mean loss is above a
level (once: the rule's cooldown is engine state, saved too).
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pytest
import torch

import gradwatch
from gradwatch.config import Cadence, as_cadence, check_float, check_int
from gradwatch.metrics.base import Alert, ChartGroup, Diagnostic, Results
from gradwatch.registry import Family, register, unregister

TAGS = ("toy/mean_loss", "toy/observations", "toy/seen", "toy/first_loss")


@dataclass(frozen=True)
class ToyConfig:
    """The toy family's options.

    Attributes:
        every: observe cadence.
        log_every: log (compute and reset) every this many steps.
        alert_above: an interval mean loss above this raises ``toy/loss_high``.
    """

    every: int | Cadence = 1
    log_every: int = 3
    alert_above: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "every", as_cadence("ToyConfig.every", self.every))
        check_int("ToyConfig.log_every", self.log_every, minimum=1)
        check_float("ToyConfig.alert_above", self.alert_above, low=0.0, high=1e9, open_low=False)


class LossTrace(Diagnostic):
    """Mean training loss over an interval; carried: observations of the whole run and the first loss."""

    stem = "toy"
    needs = frozenset({"loss"})
    phase = "step_end"

    def __init__(self, config: ToyConfig) -> None:
        super().__init__()
        self.config = config
        self.add_state("loss_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum", persistent=True)
        self.add_state("observations", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum", persistent=True)
        self.seen = 0
        self.first_loss: torch.Tensor | None = None

    def observe_cadence(self) -> Cadence:
        return self.config.every  # type: ignore[return-value]

    def log_cadence(self) -> Cadence:
        return Cadence.every(self.config.log_every, first=False)

    def observe(self, ctx: Any) -> None:
        self.update(ctx.loss)

    def update(self, loss: torch.Tensor) -> None:  # type: ignore[override]
        self.loss_sum += loss.double()
        self.observations += 1
        self.seen += 1
        if self.first_loss is None:
            self.first_loss = loss.detach().double().clone()

    def compute(self) -> Results:
        mean = self.loss_sum / self.observations
        alerts = []
        if float(mean) > self.config.alert_above:
            alerts.append(Alert("toy/loss_high", "warning", "the interval's mean loss is above the level",
                                {"mean_loss": float(mean), "level": self.config.alert_above}, ["lower the lr"]))
        return Results(scalars={"toy/mean_loss": mean, "toy/observations": self.observations,
                                "toy/seen": torch.tensor(float(self.seen)), "toy/first_loss": self.first_loss},
                       records={"toy": [{"seen": self.seen, "mean_loss": float(mean)}]}, alerts=alerts)

    def charts(self) -> list[ChartGroup]:
        return [ChartGroup("toy", "training loss", ("toy/mean_loss", "toy/first_loss"))]

    def carried_state(self) -> dict[str, Any]:
        return {"seen": self.seen, "first_loss": self.first_loss}

    def load_carried_state(self, state: Mapping[str, Any]) -> None:
        self.seen, self.first_loss = int(state.get("seen", 0)), state.get("first_loss")


TOY = Family(key="toy", stem="toy", config_class=ToyConfig, default_on=False,
             build=lambda config, inputs: [LossTrace(config)], summary="the toy family",
             knobs=("log_every", "alert_above"))


@pytest.fixture
def toy_family():
    register(TOY)
    try:
        yield TOY
    finally:
        unregister("toy")
    assert "toy" not in {f.key for f in gradwatch.registry.families()}


def test_config_key_and_export(toy_family):
    assert gradwatch.WatchConfig().toy is None  # off by default
    assert gradwatch.WatchConfig(toy=True).toy == ToyConfig()
    config = gradwatch.WatchConfig(toy=ToyConfig(every=2, log_every=4))
    assert config.families["toy"] == ToyConfig(every=2, log_every=4)
    assert config.replace(spectra=False).toy == config.toy and "toy=" in repr(config)
    with pytest.raises(ValueError, match=r"`toy` expected True, False, an int >= 0 \(its `every`; 0: off\), a "
                                         r"gradwatch.Cadence or a gradwatch.ToyConfig, got '3'"):
        gradwatch.WatchConfig(toy="3")
    assert gradwatch.WatchConfig(toy=3).toy == ToyConfig(every=3)  # an int is the family's `every`
    with pytest.raises(ValueError, match=r"`ToyConfig.log_every` expected an int >= 1, got 0"):
        ToyConfig(log_every=0)
    assert gradwatch.ToyConfig is ToyConfig  # exported from the registration
    assert "ToyConfig" in gradwatch.__all__ and "ToyConfig" in dir(gradwatch)  # derived when asked


def test_registered_after_import_gets_its_signature_knobs_and_report_section(toy_family, tmp_path):
    """Registered after every gradwatch module was imported: the callbacks' signature (LightningCLI), the
    knobs (HF fields, variables, launcher options) and the report's section are derived when used."""
    import inspect

    from gradwatch.integrations.env_knobs import env_var
    from gradwatch.knobs import knobs
    from gradwatch.resolve import resolve_config

    names = {k.name for k in knobs()}
    assert {"toy_every", "toy_log_every", "toy_alert_above"} <= names  # every field, Family.knobs or not
    assert resolve_config(environ={env_var("toy_every"): "2"}).toy == ToyConfig(every=2)
    pytest.importorskip("lightning")
    from gradwatch.callbacks.lightning import GradWatch

    assert "toy" in inspect.signature(GradWatch.__init__).parameters
    unregister("toy")
    assert "toy" not in inspect.signature(GradWatch.__init__).parameters
    register(TOY)
    assert "toy" in inspect.signature(GradWatch.__init__).parameters
    pytest.importorskip("matplotlib")
    from torch.utils.tensorboard import SummaryWriter

    from gradwatch.integrations import report

    with SummaryWriter(str(tmp_path / "run")) as writer:
        for step in (3, 6):
            writer.add_scalar("toy/mean_loss", 1.0 / step, step)
    run = report.load_run(tmp_path / "run")  # toy/ is one of gradwatch's prefixes now
    assert "toy/" in report.GRADWATCH_PREFIXES and "toy/mean_loss" in run.scalars
    page = report.write_report(run, tmp_path / "out").read_text()
    assert 'id="toy"' in page and "The toy family" in page  # the generic section: no hook, no edit


def test_hf_flags_and_environment_knobs(toy_family, tmp_path):
    transformers = pytest.importorskip("transformers")
    from gradwatch.integrations.huggingface import arguments_dataclass, config_from_training_args

    arguments = arguments_dataclass()  # built after the registration
    fields = {f.name: f for f in arguments.__dataclass_fields__.values()}
    assert all(f.default is None for f in fields.values())  # None: not given (the environment, the default decide)
    assert "default: 0" in fields["gradwatch_toy_every"].metadata["help"]  # off by default
    assert "default: 3" in fields["gradwatch_toy_log_every"].metadata["help"]
    from gradwatch.integrations import huggingface

    assert "gradwatch_toy_every" in huggingface.GradWatchArguments.__dataclass_fields__  # the module's name too
    parser = transformers.HfArgumentParser((transformers.TrainingArguments, arguments))
    _, ours = parser.parse_args_into_dataclasses(args=[
        "--output_dir", str(tmp_path), "--use_cpu", "--gradwatch_toy_every", "2", "--gradwatch_toy_alert_above",
        "0.5", "--gradwatch_spectra_every", "0"])
    config = config_from_training_args(ours, environ={})
    assert config.toy == ToyConfig(every=2, log_every=3, alert_above=0.5) and config.spectra is None
    from_env = config_from_training_args(arguments(), environ={"GRADWATCH_TOY_EVERY": "5", "GRADWATCH_TOY_LOG_EVERY": "7"})
    assert from_env.toy == ToyConfig(every=5, log_every=7)
    with pytest.raises(ValueError, match="gradwatch_toy_log_every|toy_log_every"):
        parser.parse_args_into_dataclasses(args=["--output_dir", str(tmp_path), "--gradwatch_toy_every", "1",
                                                 "--gradwatch_toy_log_every", "0"])


def _jsonl(root, stem: str) -> list[dict[str, Any]]:
    rows = []
    for path in sorted(glob.glob(os.path.join(str(root), "**", f"{stem}.jsonl"), recursive=True)):
        with open(path) as f:
            rows.extend(json.loads(line) for line in f)
    return rows


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_tags_records_alerts_and_state_across_a_lightning_resume(toy_family, tmp_path):
    pytest.importorskip("lightning")
    from _support.lit import fit
    from _support.tensorboard import read_series, read_texts
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    from gradwatch.callbacks.lightning import GradWatch

    def callback() -> GradWatch:  # the family's keyword on the callback, like the built-in ones
        return GradWatch(spectra=False, toy=ToyConfig(alert_above=0.1), max_overhead=None)

    full_gw = callback()
    fit(tmp_path / "full", [full_gw], max_steps=8)
    full = read_series(tmp_path / "full", ["toy/"])
    assert set(full) == set(TAGS)
    assert all(sorted(series) == [3, 6] for series in full.values()), full
    assert full["toy/observations"] == {3: 3.0, 6: 3.0} and full["toy/seen"] == {3: 3.0, 6: 6.0}
    rows = _jsonl(full_gw.log_dir, "toy")
    assert [r["seen"] for r in rows] == [3, 6]
    assert rows[1]["mean_loss"] == pytest.approx(full["toy/mean_loss"][6], rel=1e-6)
    (alert,) = _jsonl(full_gw.log_dir, "alerts")  # once: the rule's cooldown (200 steps) holds it at step 6
    assert alert["rule"] == "toy/loss_high" and alert["step"] == 3 and alert["severity"] == "warning"
    assert alert["evidence"]["mean_loss"] == pytest.approx(full["toy/mean_loss"][3], rel=1e-6)
    (text,) = read_texts(tmp_path / "full", "gradwatch/alerts")
    assert text[0] == 3 and "toy/loss_high" in text[1] and "lower the lr" in text[1]
    ea = EventAccumulator(full_gw.log_dir, size_guidance={"tensors": 0})
    ea.Reload()
    layout = layout_pb2.Layout()
    layout.ParseFromString(ea.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    assert "toy" in {c.title for c in layout.category}

    # interrupted after the checkpoint at step 4 (inside the interval 4-6), then resumed
    fit(tmp_path / "run", [callback()], max_steps=4, checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=4)
    (ckpt,) = glob.glob(str(tmp_path / "ckpt" / "*.ckpt"))
    saved = torch.load(ckpt, weights_only=False)["callbacks"]["GradWatch"]["diagnostics"]["0:toy:LossTrace"]
    assert saved["updates"] == 1 and saved["carried"]["seen"] == 4  # step 4's observation, open interval
    resumed_gw = callback()
    fit(tmp_path / "run", [resumed_gw], max_steps=8, ckpt_path=ckpt)
    resumed = read_series(tmp_path / "run", ["toy/"])  # both parts; a step written twice fails
    assert {t: sorted(s) for t, s in resumed.items()} == {t: [3, 6] for t in TAGS}
    for tag in TAGS:
        for step in (3, 6):
            assert resumed[tag][step] == pytest.approx(full[tag][step], rel=1e-6), (tag, step)
    assert [r["seen"] for r in _jsonl(tmp_path / "run", "toy")] == [3, 6]
    assert [a["step"] for a in _jsonl(tmp_path / "run", "alerts")] == [3]  # the cooldown came back too
    assert [step for step, _ in read_texts(tmp_path / "run", "gradwatch/alerts")] == [3]
