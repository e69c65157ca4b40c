"""Linear regression under MSE for both hosts: closed-form Hessians and gradient statistics make planted
numbers exact (the noise-scale and sustained-sharpness tests)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset


def linear(d_in: int, d_out: int, seed: int = 1) -> nn.Linear:
    """A bias-free ``nn.Linear`` from a fixed seed: its weight is the one watched matrix."""
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out, bias=False)


class LitRegression(L.LightningModule):
    """``net`` under ``mse_loss``, plain SGD at ``lr``."""

    def __init__(self, net: nn.Module, lr: float) -> None:
        super().__init__()
        self.net, self.lr = net, lr

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        xb, yb = batch
        return F.mse_loss(self.net(xb), yb)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class DictPairs(Dataset):
    """(x, y) as Hugging Face style examples ``{"x", "labels"}``."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


class HFRegression(nn.Module):
    """``net`` with a Hugging Face style forward: ``{"logits"}``, and ``"loss"`` (MSE) when given labels."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, labels: Tensor | None = None) -> dict[str, Tensor]:
        out = self.net(x)
        return {"logits": out, **({"loss": F.mse_loss(out, labels)} if labels is not None else {})}
