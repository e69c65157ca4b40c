"""Tiny deterministic models and data (no dropout, no randomness in the forward: resumes are bitwise)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

#: The Linear weights of :func:`mlp` inside a module attribute ``net``.
WEIGHTS = ("net.0.weight", "net.2.weight", "net.4.weight")


def mlp(seed: int = 0) -> nn.Sequential:
    """8-16-16-3 tanh MLP, seeded."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


def classification_data(n: int = 64, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A learnable 3-class problem: labels from a fixed random linear map."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return x, (x @ torch.randn(8, 3, generator=g)).argmax(1)


def pairs(n: int = 64, seed: int = 0) -> TensorDataset:
    """:func:`classification_data` as (x, y) pairs."""
    return TensorDataset(*classification_data(n, seed))


class DictData(Dataset):
    """:func:`classification_data` as Hugging Face style examples ``{"x", "labels"}``."""

    def __init__(self, n: int = 64, seed: int = 0) -> None:
        self.x, self.y = classification_data(n, seed)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


class DictNet(nn.Module):
    """A classifier ``net`` (default: :func:`mlp`) with a Hugging Face style forward: ``{"loss", "logits"}``,
    the cross-entropy loss when given labels (in float32 under autocast)."""

    def __init__(self, seed: int = 0, net: nn.Module | None = None) -> None:
        super().__init__()
        self.net = net if net is not None else mlp(seed)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> dict[str, Tensor]:
        logits = self.net(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits.float(), labels)
        return out


class Block(nn.Module):
    """A pre-norm-free transformer block: ``nn.MultiheadAttention`` and a tanh MLP, both residual."""

    def __init__(self, width: int, heads: int = 2) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.Tanh())

    def forward(self, h: Tensor) -> Tensor:
        a, _ = self.attn(h, h, h, need_weights=False)
        h = h + a
        return h + self.mlp(h)


class TinyTransformer(nn.Module):
    """Sequences (B, T, 8) -> class logits (B, 3): an input projection, two blocks in an ``nn.ModuleList``
    (attention modules, blocks, a ``head``: something for every family to find), mean pooling."""

    def __init__(self, width: int = 16, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Linear(8, width)
        self.blocks = nn.ModuleList([Block(width) for _ in range(2)])
        self.head = nn.Linear(width, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h.mean(1))


def sequence_data(n: int = 64, seq_len: int = 4, seed: int = 0) -> TensorDataset:
    """(x (n, seq_len, 8), y (n,)) for :class:`TinyTransformer`: labels from a fixed linear map of the mean."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, seq_len, 8, generator=g)
    return TensorDataset(x, (x.mean(1) @ torch.randn(8, 3, generator=g)).argmax(1))

