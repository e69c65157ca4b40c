"""Shared pieces of the Lightning end-to-end tests (also imported by the DDP worker script).

A tiny MLP LightningModule with BatchNorm and Dropout, its data, a callback that records the gradients
the optimizer is about to apply, and an independent float64 NumPy reference for every logged value.
"""

from __future__ import annotations

from collections.abc import Mapping

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from _support.references import svd_statistics
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

STATS = ("nuclear_norm", "spectral_norm", "frobenius_norm", "stable_rank", "effective_rank", "top1_ratio")
WEIGHTS = ("net.0.weight", "net.4.weight", "net.6.weight")  # the three Linear layers of TinyMLP
FAMILY = "net.*.weight"


class TinyMLP(L.LightningModule):
    """8-16-16-3 MLP with a BatchNorm1d and a Dropout (or the classifier ``net`` given); cross-entropy,
    SGD with momentum (optimizer state to compare)."""

    def __init__(self, lr: float = 0.1, freeze_first: bool = False, net: nn.Module | None = None) -> None:
        super().__init__()
        self.lr = lr
        self.net = net if net is not None else nn.Sequential(
            nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.25),
            nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3),
        )
        if freeze_first:
            self.net[0].requires_grad_(False)
        self.logits_dtype: torch.dtype | None = None

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        self.logits_dtype = logits.dtype
        loss = F.cross_entropy(logits, y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr, momentum=0.9)


def make_dataset(n: int = 128, seed: int = 0) -> TensorDataset:
    """A learnable 3-class problem (labels from a fixed random linear map), reproducible."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    w = torch.randn(8, 3, generator=g)
    return TensorDataset(x, (x @ w).argmax(1))


def make_loader(n: int = 128, batch_size: int = 16, shuffle: bool = False, seed: int = 0) -> DataLoader:
    return DataLoader(make_dataset(n, seed), batch_size=batch_size, shuffle=shuffle)


class GradRecorder(Callback):
    """Records, at every optimizer step, the gradients about to be applied (keyed by the 1-based step
    gradwatch logs at) and, optionally, each micro-batch's gradient right after its backward."""

    def __init__(self) -> None:
        self.grads: dict[int, dict[str, Tensor]] = {}
        self.after_backward: list[dict[str, Tensor]] = []
        self.batches: list[Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self.batches.append(batch[0].detach().clone())

    def on_after_backward(self, trainer, pl_module) -> None:  # noqa: ANN001
        self.after_backward.append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters()
                                    if p.grad is not None})

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # noqa: ANN001
        self.grads[trainer.global_step + 1] = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters()
                                               if p.grad is not None}


def reference_statistics(grads: Mapping[str, Tensor], names: tuple[str, ...] = WEIGHTS,
                         family: str | None = FAMILY) -> dict[str, float]:
    """Every value gradwatch logs for one step, recomputed with a float64 NumPy SVD."""
    out: dict[str, float] = {}
    per_stat: dict[str, list[float]] = {s: [] for s in STATS}
    for name in names:
        values = svd_statistics(grads[name])
        for stat, v in values.items():
            out[f"grad_spectrum/{stat}/{name}"] = float(v)
            per_stat[stat].append(float(v))
    if family is not None and len(names) >= 2:
        for stat, curve in per_stat.items():
            out[f"grad_spectrum/mad/{stat}/{family}"] = float(np.mean(np.abs(np.diff(curve))))
    out["grad_spectrum/nonfinite_layers"] = 0.0
    return out
