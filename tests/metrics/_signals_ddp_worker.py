"""DDP worker for tests/metrics/test_signals_end_to_end.py: ``python _signals_ddp_worker.py <out_dir>``.

Lightning's subprocess launcher re-runs this script for the second rank. Two CPU processes (gloo), the
signals family probing every step: each rank evaluates its block of the probe and the blocks are gathered.
Every rank saves its signals window (carried state), the probe's dataset indices and the final weights to
``<out_dir>/rank<r>.pt``; rank zero alone writes TensorBoard and ``signals.jsonl``.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lightning as L  # noqa: E402
from _signals_helpers import Classifier, planted  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from gradwatch.callbacks.lightning import GradWatch  # noqa: E402
from gradwatch.metrics.signals import SignalsConfig  # noqa: E402


class Saver(Callback):
    def __init__(self, out_dir: str, gw: GradWatch) -> None:
        self.out_dir, self.gw = out_dir, gw

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        state = self.gw.watcher.state_dict()
        carried = next(v["carried"] for k, v in state["diagnostics"].items() if ":signals:" in k)
        torch.save({"carried": carried, "indices": list(self.gw.watcher.probe().indices),
                    "weights": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
                    "world_size": trainer.world_size, "log_dir": self.gw.log_dir},
                   os.path.join(self.out_dir, f"rank{trainer.global_rank}.pt"))


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    # probe batches of 100 (the training batch size): 3 batches, split 2 + 1 across the two ranks
    gw = GradWatch(signals=SignalsConfig(every=1, probe_size=256, window=5), spectra=False, max_overhead=None)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=8, log_every_n_steps=1,
                        logger=TensorBoardLogger(save_dir=out_dir, name="tb"), callbacks=[gw, Saver(out_dir, gw)],
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        default_root_dir=out_dir)
    data, _, _ = planted(1024)
    trainer.fit(Classifier(), DataLoader(data, batch_size=100, shuffle=True))


if __name__ == "__main__":
    main(sys.argv[1])
