"""DDP worker for tests/metrics/test_noise_scale.py: ``python _noise_scale_ddp_worker.py <out_dir>``.

Two CPU processes (gloo), linear regression with frozen weights (SGD at lr 0), gradwatch's noise scale every
step; two fits in one process group: one micro-batch per step (the per-rank route) and two (the micro-batch
route). Every rank saves the micro-batches it trained on to ``<out_dir>/<run>_rank<r>.pt``; rank zero's
TensorBoard files are under ``<out_dir>/<run>``.
"""

from __future__ import annotations

import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import lightning as L  # noqa: E402
from _support.regression import LitRegression  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402
from metrics.test_noise_scale import config, linear, regression_data  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from gradwatch.callbacks.lightning import GradWatch  # noqa: E402

STEPS = 6


class Batches(L.Callback):
    def __init__(self) -> None:
        self.batches: list = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self.batches.append([t.clone() for t in batch])


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    x, y = regression_data()
    for run, accumulate in (("ranks", 1), ("micro", 2)):
        L.seed_everything(0, verbose=False)
        recorder = Batches()
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=STEPS,
                            accumulate_grad_batches=accumulate, logger=TensorBoardLogger(out_dir, name=run),
                            callbacks=[GradWatch(config(noise_scale=True)), recorder], enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False, default_root_dir=out_dir)
        trainer.fit(LitRegression(linear(), lr=0.0), DataLoader(TensorDataset(x[:512], y[:512]), batch_size=16, shuffle=True))
        torch.save(recorder.batches, os.path.join(out_dir, f"{run}_rank{trainer.global_rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
