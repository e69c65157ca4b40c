"""The sustained-sharpness rule of the stability family (``stability/sharpness_above_threshold``): one family
reading another's logged values through the engine (capability ``"logged"``).

Planted: linear regression under MSE has a constant Hessian, so ``sharpness/ratio`` = lambda_max * lr / 2 is
known before training (the probe is the whole dataset): SGD at lr 4 puts it at about 1.4 (the run diverges), at lr 1 at about 0.35. Through
Lightning and the HF Trainer: the alert fires at lr 4, once, after ``sharpness_sustain`` estimates above 1,
and never at lr 1; ``alerts.jsonl`` carries the evidence.
"""

from __future__ import annotations

import json
import os
from typing import Any

import lightning as L
import pytest
import torch
from _support.regression import DictPairs, HFRegression, LitRegression, linear
from _support.tensorboard import read_series
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from gradwatch import SharpnessConfig
from gradwatch.config import WatchConfig
from gradwatch.metrics.stability import SharpnessRatio, StabilityConfig, build
from gradwatch.registry import BuildInputs

RULE_ONLY = dict(attention=False, logits=False, activations=False, update_ratio=False, adam=False, spikes=False,
                 noise_scale=False)
STEPS = 12


def config(**general: Any) -> WatchConfig:
    return WatchConfig(spectra=False, sharpness=SharpnessConfig(every=2, probe_size=512),
                       stability=StabilityConfig(every=1, **RULE_ONLY), max_overhead=None, on_error="warn",
                       **general)


def data() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g)
    y = x @ torch.randn(8, 3, generator=g) + 0.1 * torch.randn(512, 3, generator=g)
    return x, y


def expected_ratio(lr: float) -> float:
    x, _ = data()
    hessian_top = float(torch.linalg.eigvalsh((x.T @ x / len(x)).double())[-1]) * 2.0 / 3.0  # d^2 mean((Wx-y)^2)
    return hessian_top * lr / 2.0


def alerts(root: str) -> list[dict[str, Any]]:
    path = next((os.path.join(d, f) for d, _, files in os.walk(root) for f in files if f == "alerts.jsonl"), None)
    if path is None:
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def lightning_run(root: str, lr: float) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger

    from gradwatch.callbacks.lightning import GradWatch

    L.seed_everything(0, verbose=False)
    x, y = data()
    trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, logger=TensorBoardLogger(root, name="tb"),
                        callbacks=[GradWatch(config())], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, log_every_n_steps=50)
    trainer.fit(LitRegression(linear(8, 3), lr), DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True))


def hf_run(root: str, lr: float) -> None:
    pytest.importorskip("transformers")
    from transformers import Trainer, TrainingArguments

    from gradwatch.callbacks.transformers import GradWatch

    args = TrainingArguments(output_dir=root, use_cpu=True, save_strategy="no", report_to=["tensorboard"],
                             disable_tqdm=True, per_device_train_batch_size=64, max_steps=STEPS, logging_steps=50,
                             seed=0, data_seed=0, learning_rate=lr, lr_scheduler_type="constant", optim="sgd",
                             remove_unused_columns=False, dataloader_num_workers=0, max_grad_norm=0.0)
    Trainer(model=HFRegression(linear(8, 3)), args=args, train_dataset=DictPairs(*data()),
            callbacks=[GradWatch(config())]).train()


@pytest.mark.parametrize("host", [lightning_run, hf_run], ids=["lightning", "hf"])
def test_sustained_sharpness_above_threshold_alerts_and_a_stable_rate_does_not(tmp_path: Any, host: Any) -> None:
    assert expected_ratio(4.0) > 1.2 and expected_ratio(1.0) < 0.5
    host(str(tmp_path / "high"), 4.0)
    host(str(tmp_path / "low"), 1.0)
    high = read_series(tmp_path / "high", ("sharpness/ratio",))["sharpness/ratio"]
    low = read_series(tmp_path / "low", ("sharpness/ratio",))["sharpness/ratio"]
    assert high[1] == pytest.approx(expected_ratio(4.0), rel=1e-2) and low[1] == pytest.approx(expected_ratio(1.0),
                                                                                               rel=1e-2)
    fired = [a for a in alerts(str(tmp_path / "high")) if a["rule"] == "stability/sharpness_above_threshold"]
    assert len(fired) == 1
    evidence = fired[0]["evidence"]
    assert evidence["sustain"] == 3 and all(r > 1 for r in evidence["ratios"])
    assert evidence["steps"] == sorted(high)[:3]  # the first three estimates: steps 1, 2, 4
    assert fired[0]["step"] > evidence["steps"][-1]  # seen at the first observation after the third estimate
    assert "from 4" in " ".join(fired[0]["remedies"])  # the current learning rate quoted
    assert not [a for a in alerts(str(tmp_path / "low")) if a["rule"] == "stability/sharpness_above_threshold"]


def test_the_rule_is_built_only_with_sharpness_on_and_counts_each_estimate_once() -> None:
    model = torch.nn.Linear(4, 4)
    without = build(StabilityConfig(**RULE_ONLY), BuildInputs(WatchConfig(spectra=False, stability=True), [], model))
    assert not any(isinstance(d, SharpnessRatio) for d in without)
    (rule,) = [d for d in build(StabilityConfig(**RULE_ONLY), BuildInputs(config(), [], model))
               if isinstance(d, SharpnessRatio)]

    class Ctx:
        step, phase, optimizer = 0, "step_end", None

        def __init__(self, logged: dict[str, tuple[int, float]]) -> None:
            self._logged = logged

        def logged(self, tag: str) -> tuple[int, float] | None:
            return self._logged.get(tag)

        def say_once(self, key: str, message: str) -> None:
            pass

    fired = []
    for step, last in [(1, (1, 1.5)), (2, (1, 1.5)), (3, (3, 1.6)), (4, (3, 1.6)), (5, (5, 1.7))]:
        rule.observe(Ctx({"sharpness/ratio": last}))
        if rule._update_count:
            fired.append((step, [a.rule for a in rule.compute().alerts]))
        rule.reset()
    assert fired == [(1, []), (3, []), (5, ["stability/sharpness_above_threshold"])]
    assert rule.carried_state() == {"recent": [[1, 1.5], [3, 1.6], [5, 1.7]]}
    with pytest.raises(ValueError, match="sharpness_sustain"):
        StabilityConfig(sharpness_sustain=0)
    with pytest.raises(ValueError, match="sharpness_ratio_limit"):
        StabilityConfig(sharpness_ratio_limit=-1.0)
