"""A tiny Lightning classifier and a launcher for it (CPU, deterministic, quiet)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from _support.models import mlp, pairs

Optim = Literal["sgd", "adamw", "adamw_fused"]


class Classifier(L.LightningModule):
    """:func:`_support.models.mlp` under cross-entropy; SGD with momentum or AdamW (fused or not)."""

    def __init__(self, optimizer: Optim = "sgd", lr: float = 0.05, seed: int = 0) -> None:
        super().__init__()
        self.net = mlp(seed)
        self.optimizer_name, self.lr = optimizer, lr

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x).float(), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        return torch.optim.AdamW(self.parameters(), lr=self.lr, fused=self.optimizer_name == "adamw_fused")


def loader(n: int = 64, batch_size: int = 16) -> DataLoader:
    """Unshuffled: a resumed epoch sees the batches the uninterrupted one saw."""
    return DataLoader(pairs(n), batch_size=batch_size)


def fit(root: str | os.PathLike, callbacks: Sequence[Any], *, max_steps: int, module: L.LightningModule | None = None,
        ckpt_path: str | None = None, checkpoint_dir: str | None = None, checkpoint_every: int | None = None,
        data: DataLoader | None = None, **trainer_kwargs: Any) -> tuple[L.Trainer, L.LightningModule]:
    """Train ``module`` (a fresh :class:`Classifier`) for ``max_steps`` with a TensorBoardLogger under ``root``
    (``root/tb/version_<n>``, a new version per call, as a user's resumed run gets); with ``checkpoint_every``,
    a ModelCheckpoint into ``checkpoint_dir`` every that many steps."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    L.seed_everything(0, verbose=False)
    module = module if module is not None else Classifier()
    callbacks = list(callbacks)
    if checkpoint_every:
        callbacks.append(ModelCheckpoint(dirpath=checkpoint_dir, every_n_train_steps=checkpoint_every, save_top_k=-1))
    trainer_kwargs.setdefault("logger", TensorBoardLogger(save_dir=str(root), name="tb"))
    trainer = L.Trainer(max_steps=max_steps, default_root_dir=str(root), callbacks=callbacks, accelerator="cpu",
                        devices=1, deterministic=True, enable_checkpointing=bool(checkpoint_every),
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1, **trainer_kwargs)
    trainer.fit(module, data if data is not None else loader(), ckpt_path=ckpt_path)
    return trainer, module
