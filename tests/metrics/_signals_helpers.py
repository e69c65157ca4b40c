"""Shared pieces of the signals end-to-end tests (also imported by the DDP worker script): the planted data
and a small Lightning classifier."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset


def planted(n: int = 4096, seed: int = 0, strength: float = 16.0) -> tuple[TensorDataset, set[int], set[int]]:
    """Two groups of 4% (labels 1 and 0) sharing a strong feature x0 = ``strength`` and no core feature (as in
    examples/opposing_signals.py)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 8, generator=g)
    x[:, 0] = 0.0
    x[:, 1] += 2.0 * y.float() - 1.0
    k = int(0.04 * n)
    a, b = torch.nonzero(y == 1).reshape(-1)[:k], torch.nonzero(y == 0).reshape(-1)[:k]
    x[a, 0] = x[b, 0] = strength
    x[a, 1], x[b, 1] = 0.5 * torch.randn(k, generator=g), 0.5 * torch.randn(k, generator=g)
    return TensorDataset(x, y), set(a.tolist()), set(b.tolist())



class Classifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 2))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)
