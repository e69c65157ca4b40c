"""The ``moe`` family through real hosts, read back from TensorBoard: Lightning and the Hugging Face Trainer, each
on a tiny Hugging Face MoE model (Mixtral, Qwen2-MoE; built from a config) and on the hand-written top-k router
(:mod:`_support.moe`). Observe-only (bitwise the same weights with and without gradwatch), every tag at the
cadence's steps against the float64 reference of the routers' captured outputs, and the planted collapse in
``alerts.jsonl``."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import lightning as L
import pytest
import torch
from _support.moe import RouterTap, TinyMoE, reference, tiny_mixtral, tiny_qwen2_moe
from _support.tensorboard import read_series
from torch import nn
from torch.utils.data import DataLoader

from gradwatch.callbacks.lightning import GradWatch as LightningGradWatch
from gradwatch.metrics.moe import MoEConfig

transformers = pytest.importorskip("transformers")
from conftest import TokenData  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from gradwatch.callbacks.transformers import GradWatch as HFGradWatch  # noqa: E402

STATS = ("load_cv", "load_max", "load_entropy", "entropy", "z_loss", "log_z", "dropped")


def _alerts(log_dir: str) -> list[dict[str, Any]]:
    path = os.path.join(log_dir, "alerts.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _tap(model: nn.Module) -> RouterTap:
    """The test's own capture on the routers of a :class:`TinyMoE` or a Hugging Face MoE model."""
    if isinstance(model, TinyMoE):
        experts = model.layers[0].num_experts
    else:
        experts = getattr(model.config, "num_local_experts", None) or model.config.num_experts
    return RouterTap(model, [n for n, _ in model.named_modules() if n.endswith((".router", "mlp.gate"))], experts)


def _check(series: dict[str, dict[int, float]], tap: RouterTap, steps: set[int], prefix: str = "") -> None:
    """Every tag of every router at exactly ``steps``, equal to the reference of that step's call (one forward
    per step: step t is the tap's call t - 1); TensorBoard keeps float32."""
    for name, calls in tap.calls.items():
        router = prefix + name
        for step in steps:
            ref = reference([calls[step - 1]])
            for stat in STATS:
                got = series[f"moe/{router}/{stat}"]
                assert set(got) == steps, (router, stat)
                assert got[step] == pytest.approx(ref[stat], rel=1e-5, abs=1e-7), (router, stat, step)
            for e, share in enumerate(ref["load"]):
                assert series[f"moe/{router}/load/{e}"][step] == pytest.approx(share, rel=1e-5, abs=1e-7)
    assert set(series["moe/alert"]) == steps


# ---- Lightning ------------------------------------------------------------------------------------------------


class LitMoE(L.LightningModule):
    def __init__(self, model: nn.Module, lr: float = 1e-2) -> None:
        super().__init__()
        self.model, self.lr = model, lr

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch)["loss"]
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr, weight_decay=0.0)


def lightning_run(root: str, model: nn.Module, *, steps: int, moe: MoEConfig | None, vocab: int,
                  **options: Any) -> tuple[dict[str, torch.Tensor], Any, RouterTap]:
    L.seed_everything(0, workers=True)
    module = LitMoE(model)
    tap = _tap(model)
    cb = LightningGradWatch(spectra=False, moe=moe, max_overhead=None, **options) if moe is not None else None
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", deterministic=True, callbacks=[cb] if cb else [],
                        default_root_dir=root, logger=L.pytorch.loggers.TensorBoardLogger(root, name="", version=""),
                        log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False)
    trainer.fit(module, DataLoader(TokenData(48, 16, vocab), batch_size=8))
    tap.remove()
    return {k: v.detach().clone() for k, v in module.state_dict().items()}, cb, tap


def test_lightning_mixtral_observe_only_and_every_tag(tmp_path: Any) -> None:
    without, _, _ = lightning_run(str(tmp_path / "without"), tiny_mixtral(num_experts=4), steps=6, moe=None, vocab=64)
    with_gw, cb, tap = lightning_run(str(tmp_path / "with"), tiny_mixtral(num_experts=4), steps=6, vocab=64,
                                     moe=MoEConfig(every=3), on_error="raise")
    assert not torch.equal(tiny_mixtral(num_experts=4).state_dict()["model.layers.0.mlp.gate.weight"],
                           without["model.model.layers.0.mlp.gate.weight"])  # it trained
    assert [k for k in without if not torch.equal(without[k], with_gw[k])] == []
    series = read_series(cb.log_dir, ["moe/"])
    _check(series, tap, {1, 3, 6}, prefix="model.")
    assert set(series) == {f"moe/model.model.layers.{i}.mlp.gate/{s}" for i in range(2) for s in
                           (*STATS, *(f"load/{e}" for e in range(4)))} | {"moe/alert"}
    assert _alerts(cb.log_dir) == []


def test_lightning_hand_written_router_planted_collapse(tmp_path: Any) -> None:
    """The hand-written router with an expert capacity (dropped assignments) and its bias planted on experts 0
    and 1: the alert at the third logging event (steps 1, 2, 4), in ``alerts.jsonl`` and ``moe/alert``."""
    model = TinyMoE(num_experts=8, top_k=2, capacity=24).plant_collapse((0, 1))
    alerts: list[Any] = []
    _, cb, tap = lightning_run(str(tmp_path), model, steps=4, vocab=32, moe=MoEConfig(every=2), on_alert=alerts.append)
    series = read_series(cb.log_dir, ["moe/"])
    _check(series, tap, {1, 2, 4}, prefix="model.")
    assert series["moe/model.layers.0.router/dropped"][1] == pytest.approx(1 - 2 * 24 / 256)  # 128 tokens x 2
    assert series["moe/alert"] == {1: 0.0, 2: 0.0, 4: 1.0}
    (record,) = _alerts(cb.log_dir)
    assert record["rule"] == "moe/routing_collapse" and record["step"] == 4 and [a.step for a in alerts] == [4]
    assert record["evidence"]["load_cv"] == pytest.approx(math.sqrt(3)) and record["evidence"]["dead_experts"] == [2, 3, 4, 5, 6, 7]


# ---- Hugging Face Trainer -------------------------------------------------------------------------------------


def hf_run(root: str, model: nn.Module, *, moe: MoEConfig | None, vocab: int, steps: int = 6,
           **options: Any) -> tuple[dict[str, torch.Tensor], Any, RouterTap]:
    tap = _tap(model)
    cb = HFGradWatch(spectra=False, moe=moe, max_overhead=None, **options) if moe is not None else None
    args = TrainingArguments(output_dir=root, use_cpu=True, save_strategy="no", report_to=["tensorboard"],
                             disable_tqdm=True, per_device_train_batch_size=8, max_steps=steps, logging_steps=1,
                             seed=0, data_seed=0, dataloader_num_workers=0, learning_rate=1e-2,
                             lr_scheduler_type="constant", optim="adamw_torch", weight_decay=0.0,
                             remove_unused_columns=False)
    Trainer(model=model, args=args, train_dataset=TokenData(48, 16, vocab), callbacks=[cb] if cb else []).train()
    tap.remove()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, cb, tap


def test_hf_qwen2_moe_observe_only_and_every_tag(tmp_path: Any) -> None:
    without, _, _ = hf_run(str(tmp_path / "without"), tiny_qwen2_moe(num_experts=4), moe=None, vocab=64)
    with_gw, cb, tap = hf_run(str(tmp_path / "with"), tiny_qwen2_moe(num_experts=4), moe=MoEConfig(every=3), vocab=64,
                              on_error="raise")
    assert not torch.equal(tiny_qwen2_moe(num_experts=4).state_dict()["model.layers.1.mlp.gate.weight"],
                           without["model.layers.1.mlp.gate.weight"])  # it trained
    assert [k for k in without if not torch.equal(without[k], with_gw[k])] == []
    series = read_series(cb.log_dir, ["moe/"])
    _check(series, tap, {1, 3, 6})
    assert not [t for t in series if "shared_expert" in t]


def test_hf_hand_written_router_tags_and_planted_collapse(tmp_path: Any) -> None:
    balanced_dir, collapsed_dir = str(tmp_path / "balanced"), str(tmp_path / "collapsed")
    _, cb, tap = hf_run(balanced_dir, TinyMoE(num_experts=8, top_k=2, capacity=40), moe=MoEConfig(every=2), vocab=32,
                        steps=4)
    series = read_series(cb.log_dir, ["moe/"])
    _check(series, tap, {1, 2, 4})
    assert _alerts(cb.log_dir) == [] and set(series["moe/alert"].values()) == {0.0}
    _, cb, _ = hf_run(collapsed_dir, TinyMoE(num_experts=8, top_k=2).plant_collapse((3, 5)), moe=MoEConfig(every=2),
                      vocab=32, steps=4)
    (record,) = _alerts(cb.log_dir)
    assert record["rule"] == "moe/routing_collapse" and record["step"] == 4
    assert set(record["evidence"]["top_experts"]) == {"3", "5"}
    assert read_series(cb.log_dir, ["moe/alert"])["moe/alert"] == {1: 0.0, 2: 0.0, 4: 1.0}
