"""Parity: the same model, data and seed driven by Lightning and by Hugging Face log the same spectra.

Full-batch SGD (the batch is the whole 32-example dataset, so data order cannot differ between the two
hosts) on a tiny MLP classifier with identical initial weights. Lightning reads gradients before clipping;
HF has already clipped them when its callbacks run, and gradwatch undoes the clip exactly.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("lightning")
pytest.importorskip("tbparse")

import lightning as L  # noqa: E402
from conftest import read_scalars
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from gradwatch import SPECTRUM_STATS, SpectraConfig  # noqa: E402
from gradwatch.callbacks.lightning import GradWatch as LightningGradWatch  # noqa: E402
from gradwatch.callbacks.transformers import GradWatch as HFGradWatch  # noqa: E402

RTOL = 1e-5
N, D, C = 32, 16, 3
LR = 0.5
STEPS = 6
MAX_GRAD_NORM = 0.5
WATCHED = ("net.0.weight", "net.2.weight", "net.4.weight")


class MLPClassifier(nn.Module):
    """``forward(x, labels)`` -> ``{"loss": CE, "logits": ...}``: a model HF's Trainer can drive as is."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(D, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, C))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.net(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


class Module(L.LightningModule):
    """Wraps an identical copy of the HF model, under the same parameter names (``net.<i>.weight``)."""

    def __init__(self, model: MLPClassifier) -> None:
        super().__init__()
        self.net = model.net
        self._forward = model.forward.__func__  # the very same forward, loss included

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._forward(self, **batch)["loss"]
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR)


class Blobs(torch.utils.data.Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.y = torch.arange(N) % C
        centers = torch.randn(C, D, generator=g) * 2
        self.x = centers[self.y] + torch.randn(N, D, generator=g)

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


@pytest.fixture(scope="module")
def initial_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return copy.deepcopy(MLPClassifier().state_dict())



def spectra_only(scalars: dict[str, dict[int, float]]) -> dict[str, dict[int, float]]:
    return {t: v for t, v in scalars.items()
            if t.startswith("grad_spectrum/") and t != "grad_spectrum/nonfinite_layers"}


def run_hf(tmp: Any, state: dict[str, torch.Tensor], max_grad_norm: float, steps: int) -> tuple[dict, dict]:
    model = MLPClassifier()
    model.load_state_dict(state)
    cb = HFGradWatch(spectra=SpectraConfig(every=1), max_overhead=None, on_error="raise")
    args = TrainingArguments(output_dir=str(tmp), use_cpu=True, save_strategy="no", report_to=["tensorboard"],
                             disable_tqdm=True, per_device_train_batch_size=N, dataloader_drop_last=False,
                             lr_scheduler_type="constant", warmup_steps=0, learning_rate=LR, optim="sgd",
                             weight_decay=0.0, max_grad_norm=max_grad_norm, max_steps=steps, logging_steps=1,
                             seed=0, data_seed=0)
    Trainer(model=model, args=args, train_dataset=Blobs(), callbacks=[cb]).train()
    return read_scalars(cb.log_dir), model.state_dict()


def run_lightning(tmp: Any, state: dict[str, torch.Tensor], steps: int) -> tuple[dict, dict]:
    net = MLPClassifier()
    net.load_state_dict(state)
    cb = LightningGradWatch(spectra=SpectraConfig(every=1), max_overhead=None, on_error="raise")
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=TensorBoardLogger(str(tmp)),
                        callbacks=[cb], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, log_every_n_steps=1, num_sanity_val_steps=0)
    trainer.fit(Module(net), DataLoader(Blobs(), batch_size=N, shuffle=False))
    assert cb.log_dir == trainer.logger.log_dir  # gradwatch shares Lightning's TensorBoard run
    return read_scalars(cb.log_dir), net.state_dict()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, initial_state: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {
        "lightning": run_lightning(tmp_path_factory.mktemp("pl"), initial_state, STEPS),
        "hf": run_hf(tmp_path_factory.mktemp("hf"), initial_state, 0.0, STEPS),
        "hf_clip": run_hf(tmp_path_factory.mktemp("hf_clip"), initial_state, MAX_GRAD_NORM, STEPS),
    }


def test_same_spectra_every_step_without_clipping(runs: dict[str, Any]) -> None:
    pl_scalars, pl_weights = runs["lightning"]
    hf_scalars, hf_weights = runs["hf"]
    pl, hf = spectra_only(pl_scalars), spectra_only(hf_scalars)
    expected = {f"grad_spectrum/{stat}/{name}" for stat in SPECTRUM_STATS for name in WATCHED}
    expected |= {f"grad_spectrum/mad/{stat}/net.*.weight" for stat in SPECTRUM_STATS}  # Sequential index = layer
    assert set(pl) == expected
    assert set(pl) == set(hf), set(pl) ^ set(hf)
    for tag in pl:
        assert set(pl[tag]) == set(hf[tag]) == set(range(1, STEPS + 1)), tag
        for step in pl[tag]:
            assert hf[tag][step] == pytest.approx(pl[tag][step], rel=RTOL), (tag, step)
    # the two hosts trained the same network the same way
    for k in pl_weights:
        torch.testing.assert_close(hf_weights[k], pl_weights[k], rtol=1e-5, atol=1e-6)
    # the spectra changed during training: the comparison is not of six copies of one number
    tag = "grad_spectrum/nuclear_norm/net.4.weight"
    assert abs(hf[tag][STEPS] - hf[tag][1]) > 1e-2 * hf[tag][1]


def test_clipped_hf_matches_unclipped_lightning_at_step_one(runs: dict[str, Any]) -> None:
    pl, _ = runs["lightning"]
    clip, _ = runs["hf_clip"]
    assert clip["train/grad_norm"][1] > 2 * MAX_GRAD_NORM  # HF really clipped step 1
    pl, clip_spectra = spectra_only(pl), spectra_only(clip)
    assert set(pl) == set(clip_spectra)
    for tag in pl:
        # same weights, same batch at step 1: the reconstructed pre-clip gradient is Lightning's gradient
        assert clip_spectra[tag][1] == pytest.approx(pl[tag][1], rel=RTOL), tag
    # after step 1 the clipped updates moved HF's weights elsewhere, so later steps may not be compared
    later = [abs(clip_spectra[t][s] - pl[t][s]) / abs(pl[t][s]) for t in pl if "norm" in t for s in range(2, STEPS + 1)]
    assert max(later) > 1e-3
