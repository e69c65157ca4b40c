"""DDP worker for tests/callbacks/test_ddp.py: ``python _lightning_ddp_worker.py <out_dir>``.

Lightning's subprocess launcher re-runs this script once per extra rank. Two CPU processes (gloo), a
DistributedSampler (added by Lightning) so each rank sees different data, gradwatch every step, and a
recorder on every rank that saves the gradients seen in ``on_before_optimizer_step`` (all-reduced) and
the batches it trained on to ``<out_dir>/rank<r>.pt``.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: _support

import lightning as L  # noqa: E402
from _lightning_helpers import GradRecorder, TinyMLP, make_loader  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402

from gradwatch import SpectraConfig  # noqa: E402
from gradwatch.callbacks.lightning import GradWatch  # noqa: E402


class SavingRecorder(GradRecorder):
    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        torch.save({"grads": self.grads, "batches": self.batches, "global_step": trainer.global_step,
                    "world_size": trainer.world_size},
                   os.path.join(self.out_dir, f"rank{trainer.global_rank}.pt"))


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    gw = GradWatch(spectra=SpectraConfig(every=1), max_overhead=None, on_error="raise")
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=4, log_every_n_steps=1,
        logger=TensorBoardLogger(save_dir=out_dir, name="tb"), callbacks=[gw, SavingRecorder(out_dir)],
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        default_root_dir=out_dir,
    )
    # 128 examples, batch 16 per rank: 4 steps per rank per epoch, disjoint halves of the data
    trainer.fit(TinyMLP(), make_loader(128, 16, shuffle=True))
    if trainer.is_global_zero:
        with open(os.path.join(out_dir, "gradwatch_log_dir.txt"), "w") as f:
            f.write(str(gw.log_dir))


if __name__ == "__main__":
    main(sys.argv[1])
