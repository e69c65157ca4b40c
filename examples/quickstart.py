"""gradwatch quickstart: a real training run with live gradient spectra in TensorBoard.

A small CNN learns scikit-learn's handwritten digits (1,797 real 8x8 images that ship with the
package: nothing is downloaded) with PyTorch Lightning. The only gradwatch line is the callback.

    python examples/quickstart.py               # ~15 s on 2 CPU cores
    tensorboard --logdir runs/quickstart        # then open the CUSTOM SCALARS and IMAGES tabs
"""

from __future__ import annotations

import argparse
import os

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradwatch
from gradwatch.callbacks.lightning import GradWatch


class DigitsCNN(L.LightningModule):
    """conv(1->16) -> conv(16->32) -> linear(512->64) -> linear(64->10), AdamW."""

    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        self.lr = lr
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def digits_dataset() -> TensorDataset:
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    return TensorDataset(x, y)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--every", type=int, default=10, help="gradient spectra every N optimizer steps")
    parser.add_argument("--log-dir", default="runs")
    # This CNN takes ~15 ms a step, less than one spectrum of all its layers, so the library's default 5%
    # budget would thin the charts out to one point in ~25 steps; a demo can afford more.
    parser.add_argument("--max-overhead", type=float, default=0.3,
                        help="share of wall time gradwatch may take; due work is postponed beyond it")
    args = parser.parse_args(argv)

    L.seed_everything(0, verbose=False)
    loader = DataLoader(digits_dataset(), batch_size=args.batch_size, shuffle=True)
    watch = GradWatch(
        # the heatmap images (matplotlib, ~0.2 s each, one per statistic) cost a third of this whole 3-second
        # run: drawn once, near the end, so that the budget does not postpone the charts for the rest of it
        spectra=gradwatch.SpectraConfig(every=args.every, heatmap_every=args.every * 30,
                                        per_example=True, per_example_every=args.every * 10),
        max_overhead=args.max_overhead,
    )
    logger = TensorBoardLogger(args.log_dir, name="quickstart")
    trainer = L.Trainer(max_epochs=args.epochs, logger=logger, callbacks=[watch], log_every_n_steps=10,
                        enable_checkpointing=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(DigitsCNN(), loader)

    log_dir = watch.log_dir or logger.log_dir
    loss = float(trainer.callback_metrics["train_loss"])
    print(f"\ntrained {trainer.global_step} steps, final train loss {loss:.3f}; "
          f"gradwatch used {100 * watch.watcher.overhead():.1f}% of the wall time, "
          f"{100 * watch.watcher.budgeted_overhead():.1f}% without its one-off first runs (this demo looks every "
          f"{args.every} steps, with per-example spectra, under a {100 * args.max_overhead:.0f}% budget on "
          "the latter, which postpones due work while the share is over it, so a run can end above it by the "
          "cost of its last heatmap images; the defaults are every 50 steps within 5%)")
    print(f"TensorBoard logs: {os.path.abspath(log_dir)}")
    print(f"see them with:    tensorboard --logdir {os.path.abspath(args.log_dir)}")
    return log_dir


if __name__ == "__main__":
    main()
