"""The stability family end to end through real hosts (Lightning and the Hugging Face Trainer): tags read
back from TensorBoard, observe-only (bitwise identical weights with and without gradwatch), the
attention-logit must-reach on a tiny GPT-2, alerts.jsonl, and bad input."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from typing import Any

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from gradwatch.callbacks.lightning import GradWatch as LightningGradWatch
from gradwatch.metrics.stability import StabilityConfig

transformers = pytest.importorskip("transformers")
from conftest import TokenData, read_tb_scalars  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

from gradwatch.callbacks.transformers import GradWatch as HFGradWatch  # noqa: E402


def _scalars(log_dir: str) -> tuple[dict[str, dict[int, float]], Counter]:
    df = read_tb_scalars(log_dir)
    out: dict[str, dict[int, float]] = {}
    counts: Counter = Counter()
    for tag, step, value in zip(df["tag"], df["step"], df["value"]):
        out.setdefault(tag, {})[int(step)] = float(value)
        counts[(tag, int(step))] += 1
    return out, counts


def _alerts(log_dir: str) -> list[dict[str, Any]]:
    path = os.path.join(log_dir, "alerts.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def tiny_gpt2(dropout: float = 0.0, vocab: int = 64, positions: int = 16) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=positions,
                                      resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout))


class LitGPT2(L.LightningModule):
    def __init__(self, lr: float, dropout: float = 0.0, checkpointing: bool = False) -> None:
        super().__init__()
        self.lr = lr
        self.model = tiny_gpt2(dropout)
        self.attention_forwards = 0
        if checkpointing:
            enable = getattr(self.model, "activation_checkpointing_enable", None) or \
                self.model.gradient_checkpointing_enable
            enable()
            self.model.transformer.h[0].attn.register_forward_hook(lambda *a: self._count())

    def _count(self) -> None:
        self.attention_forwards += 1

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.0)


def lightning_run(root: str, lr: float, *, steps: int, gradwatch: bool = True, dropout: float = 0.0,
                  accumulate: int = 1, every: int = 5, checkpointing: bool = False, **options: Any) -> dict[str, Any]:
    L.seed_everything(0, workers=True)
    module = LitGPT2(lr, dropout, checkpointing)
    alerts: list[Any] = []
    callbacks = []
    cb = None
    if gradwatch:
        options.setdefault("on_alert", alerts.append)
        cb = LightningGradWatch(spectra=False, stability=StabilityConfig(every=every), max_overhead=None, **options)
        callbacks.append(cb)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", deterministic=True, callbacks=callbacks,
                        default_root_dir=root, logger=L.pytorch.loggers.TensorBoardLogger(root, name="", version=""),
                        log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, accumulate_grad_batches=accumulate)
    trainer.fit(module, DataLoader(TokenData(32, 16, 64), batch_size=8, shuffle=True))
    return {"state": {k: v.detach().clone() for k, v in module.state_dict().items()}, "cb": cb, "alerts": alerts,
            "attention_forwards": module.attention_forwards,
            "log_dir": cb.log_dir if cb is not None else None}


# ---- Lightning ------------------------------------------------------------------------------------


def test_lightning_observe_only_and_tags(tmp_path: Any) -> None:
    """Dropout on, gradient accumulation 2, gradient checkpointing: bitwise the same weights; attention read
    once per micro-batch (not again in the checkpointed recomputation); every stability tag logged at the
    cadence's steps; ``stability/alert`` written once per logging event."""
    kw = {"steps": 10, "dropout": 0.1, "accumulate": 2, "checkpointing": True}
    without = lightning_run(str(tmp_path / "without"), 1e-2, gradwatch=False, **kw)
    with_gw = lightning_run(str(tmp_path / "with"), 1e-2, on_error="raise", **kw)
    assert [k for k in without["state"] if not torch.equal(without["state"][k], with_gw["state"][k])] == []
    diag = next(d for d in with_gw["cb"].watcher.diagnostics if type(d).__name__ == "AttentionLogits")
    assert without["attention_forwards"] == 10 * 2 * 2  # every micro-batch's forward runs again in backward
    assert with_gw["cb"].watcher.capture.calls["model.transformer.h.0.attn"] == 3 * 2  # steps 1, 5, 10 x 2
    assert diag.history and len(diag.history) == 3
    scalars, counts = _scalars(with_gw["log_dir"])
    attn = [f"model.transformer.h.{i}.attn" for i in range(2)]
    expected = ["stability/attention/max_logit", "stability/logits/log_z_mean", "stability/logits/log_z_max",
                "stability/logits/max_abs", "stability/alert",
                *(f"stability/attention/{s}/{a}" for s in ("max_logit", "entropy_min") for a in attn),
                *(f"stability/activations/rms/model.transformer.h.{i}" for i in range(2)),
                "stability/update_ratio/model.transformer.h.0.attn.c_attn.weight",
                "stability/adam/eps_share/model.transformer.h.1.mlp.c_fc.weight",
                "stability/adam/rms_over_eps/model.transformer.h.1.mlp.c_fc.weight"]
    for tag in expected:
        assert set(scalars[tag]) == {1, 5, 10}, tag
        assert all(math.isfinite(v) for v in scalars[tag].values()), tag
    assert all(n == 1 for (tag, _), n in counts.items() if tag == "stability/alert")
    assert scalars["stability/attention/max_logit"][5] == pytest.approx(
        max(scalars[f"stability/attention/max_logit/{a}"][5] for a in attn))
    assert 0 < scalars["stability/logits/log_z_mean"][1] <= scalars["stability/logits/log_z_max"][1]
    assert scalars["stability/logits/log_z_mean"][1] == pytest.approx(math.log(64), rel=0.05)  # ~uniform at init
    ratio = scalars["stability/update_ratio/model.transformer.h.0.attn.c_attn.weight"]
    assert all(0 < r < 1 for r in ratio.values())


def test_must_reach_attention_logit_and_alert(tmp_path: Any) -> None:
    """Tiny GPT-2 with AdamW: lr 0.1 drives the logged max attention logit past 100 and raises an attention
    alert; lr 0.01 keeps it near its start and raises none."""
    high = lightning_run(str(tmp_path / "high"), 0.1, steps=40)
    low = lightning_run(str(tmp_path / "low"), 0.01, steps=40)
    hs, _ = _scalars(high["log_dir"])
    ls, _ = _scalars(low["log_dir"])
    h, lo = hs["stability/attention/max_logit"], ls["stability/attention/max_logit"]
    assert set(h) == set(lo) == {1, *range(5, 41, 5)}
    assert h[1] == pytest.approx(lo[1]) and h[1] < 1  # the same start
    assert max(h.values()) > 100 and h[40] > 100 * h[1]
    assert max(lo.values()) < 10
    attention_rules = {"stability/attention_logit_level", "stability/attention_logit_growth",
                       "stability/attention_entropy_collapse"}
    fired = [a for a in high["alerts"] if a.rule in attention_rules]
    assert fired and not [a for a in low["alerts"] if a.rule in attention_rules]
    level = next(a for a in fired if a.rule == "stability/attention_logit_level")
    assert level.step is not None and h[level.step] >= 100 > max(v for s, v in h.items() if s < level.step)
    records = {r["rule"]: r for r in _alerts(high["log_dir"])}
    rec = records["stability/attention_logit_level"]
    assert rec["step"] == level.step and rec["evidence"]["threshold"] == 100.0
    assert rec["evidence"]["trend"][-1][1] == pytest.approx(h[level.step], rel=1e-6)
    assert any("from 0.1" in r for r in rec["remedies"]) and any("qk-layernorm" in r for r in rec["remedies"])
    assert hs["stability/alert"][level.step] == 1.0
    assert not any(r["rule"] in attention_rules for r in _alerts(low["log_dir"]))


def test_on_alert_that_raises_is_reported_once(tmp_path: Any) -> None:
    calls: list[Any] = []

    def broken(alert: Any) -> None:
        calls.append(alert)
        raise RuntimeError("no disk")

    with pytest.warns(RuntimeWarning, match="on_alert raised"):
        run = lightning_run(str(tmp_path), 0.1, steps=20, on_alert=broken)
    assert calls  # it was called, and training went on to the end
    assert set(_scalars(run["log_dir"])[0]["stability/attention/max_logit"]) == {1, 5, 10, 15, 20}


def test_bad_input_fails_at_construction() -> None:
    with pytest.raises(ValueError, match=r"StabilityConfig.attention_logit_level.*\(0.0, .*got -5"):
        LightningGradWatch(stability=StabilityConfig(attention_logit_level=-5))
    with pytest.raises(ValueError, match=r"StabilityConfig.spike_warmup"):
        HFGradWatch(stability=StabilityConfig(spike_window=10, spike_warmup=11))
    with pytest.raises(ValueError, match="on_alert"):
        LightningGradWatch(stability=True, on_alert="checkpoint")
    with pytest.raises(ValueError, match="on_alert"):
        HFGradWatch(stability=True, on_alert=42)


# ---- Hugging Face Trainer -------------------------------------------------------------------------


def test_hf_observe_only_and_tags(tmp_path: Any) -> None:
    def run(with_gradwatch: bool) -> tuple[dict[str, torch.Tensor], Any]:
        model = tiny_gpt2(dropout=0.1)
        cb = HFGradWatch(spectra=False, stability=StabilityConfig(every=4), max_overhead=None,
                         on_error="raise") if with_gradwatch else None
        args = TrainingArguments(output_dir=str(tmp_path / str(with_gradwatch)), use_cpu=True, save_strategy="no",
                                 report_to=["tensorboard"], disable_tqdm=True, per_device_train_batch_size=4,
                                 gradient_accumulation_steps=2, max_steps=8, logging_steps=1, seed=0, data_seed=0,
                                 dataloader_num_workers=0, learning_rate=1e-2, lr_scheduler_type="constant",
                                 optim="adamw_torch", weight_decay=0.0)
        Trainer(model=model, args=args, train_dataset=TokenData(32, 16, 64), callbacks=[cb] if cb else []).train()
        return {k: v.detach().clone() for k, v in model.state_dict().items()}, cb

    without, _ = run(False)
    with_gw, cb = run(True)
    assert not torch.equal(tiny_gpt2().state_dict()["transformer.h.0.attn.c_attn.weight"],
                           without["transformer.h.0.attn.c_attn.weight"])  # it trained
    assert [k for k in without if not torch.equal(without[k], with_gw[k])] == []
    scalars, counts = _scalars(cb.log_dir)
    for tag in ("stability/attention/max_logit", "stability/attention/entropy_min/transformer.h.1.attn",
                "stability/logits/log_z_mean", "stability/activations/rms/transformer.h.0",
                "stability/update_ratio/transformer.h.1.mlp.c_proj.weight",
                "stability/adam/eps_share/transformer.h.0.attn.c_attn.weight", "stability/alert"):
        assert set(scalars[tag]) == {1, 4, 8}, tag
        assert all(math.isfinite(v) for v in scalars[tag].values()), tag
    assert all(n == 1 for (tag, _), n in counts.items() if tag == "stability/alert")
    # the spike detectors observe every step and log at the cadence (absent while warming up)
    assert "stability/spike/loss" not in scalars
    assert cb.watcher.diagnostics[-1].detector.seen == 8
