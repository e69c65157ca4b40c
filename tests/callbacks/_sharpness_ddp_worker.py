"""DDP worker for tests/callbacks/test_sharpness_safety.py.

``python _sharpness_ddp_worker.py <out_dir> with [without]``.

Lightning's subprocess launcher re-runs this script once per extra rank. Two CPU processes (gloo), a
DistributedSampler (added by Lightning), gradwatch's sharpness every 2 steps (``with``) or no gradwatch
(``without``); several modes run in one launch, one after the other. Each run saves, on every rank, to
``<out_dir>/<mode>/rank<r>.pt`` its weights and buffers at step 1 (before the first optimizer step), its
final ones, and (with gradwatch) the probe batches and the log directory.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: _support

import lightning as L  # noqa: E402
from _lightning_helpers import TinyMLP, make_loader  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

from gradwatch import SharpnessConfig  # noqa: E402
from gradwatch.callbacks.lightning import GradWatch  # noqa: E402


class Saver(Callback):
    def __init__(self, out_dir: str, gw: GradWatch | None) -> None:
        self.out_dir, self.gw, self.initial = out_dir, gw, None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # noqa: ANN001
        if trainer.global_step == 0:
            self.initial = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        probe = None
        if self.gw is not None and trainer.is_global_zero:
            probe = [tuple(t.detach().clone() for t in b) for b in self.gw.watcher.probe().batches(drop_last=True)]
        torch.save({"initial": self.initial, "world_size": trainer.world_size, "global_step": trainer.global_step,
                    "final": {k: v.detach().clone() for k, v in pl_module.state_dict().items()}, "probe": probe,
                    "log_dir": self.gw.log_dir if self.gw is not None else None},
                   os.path.join(self.out_dir, f"rank{trainer.global_rank}.pt"))


def main(out_dir: str, mode: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    gw = None
    if mode == "with":
        gw = GradWatch(spectra=False, sharpness=SharpnessConfig(every=2, probe_size=16, max_iter=200, tol=1e-6),
                       max_overhead=None, on_error="raise", log_dir=os.path.join(out_dir, "gw"))
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=4, logger=False,
        callbacks=([gw] if gw is not None else []) + [Saver(out_dir, gw)],
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, default_root_dir=out_dir,
    )
    trainer.fit(TinyMLP(), make_loader(128, 16, shuffle=True))


if __name__ == "__main__":
    for mode in sys.argv[2:]:  # several runs in one launch share the process group (one start-up)
        main(os.path.join(sys.argv[1], mode), mode)
