"""Worker of tests/reliability/test_surroundings.py: ``python _rank_fault_worker.py OUTDIR``.

First, in the launching process only (rank 0, before any rank starts), the disk-full run of
``_disk_full_worker.py`` (``DISK_LIMIT`` bytes, ``DISK_STEPS`` steps) into ``OUTDIR/disk_full``, its report
lines in ``OUTDIR/disk_full.txt``: one interpreter start serves both cases. Then:

Two CPU ranks (gloo), one launch: the tiny MLP of tests/callbacks/_fsdp2_worker.py trained under Lightning DDP
and then under FSDP2 (``ModelParallelStrategy``), with the stability family at every step
(``on_error="warn"``), and the update/weight ratio (an all-ranks diagnostic whose sums are all-reduced) made
to raise on rank 1 only at step ``FAIL_STEP``, before its all-reduce (fenced: the other rank's all-reduce
ends too). A collective timeout of 30 s turns a rank left waiting into a failure instead of a hang. Each
rank writes ``OUTDIR/<strategy>/rank<r>.pt`` (final weights, steps, the warnings gradwatch gave);
rank 0's TensorBoard run is ``OUTDIR/<strategy>/tb/version_0``.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "callbacks"))
sys.path.insert(0, os.path.dirname(HERE))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from _fsdp2_worker import BATCH, WORLD, RunRecord, ShardedMLP, make_dataset  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

STEPS = 4
DISK_LIMIT, DISK_STEPS = 30000, 20  # the limit is reached at step 11 or so
FAIL_STEP, FAIL_RANK = 3, 1
STRATEGIES = ("ddp", "fsdp2")


class UpdateRatioFails(Callback):
    """The update/weight ratio raises on ``FAIL_RANK`` at ``FAIL_STEP`` (put after GradWatch) while it computes
    its sums, i.e. before its all-reduce of the FSDP2 shards' sums, on one rank only: without the fence
    (gradwatch.engine.ranks.Ranks.fenced) rank 0's all-reduce would pair with rank 1's next collective."""

    def __init__(self, gw) -> None:  # noqa: ANN001
        self.gw = gw

    def on_train_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        from gradwatch.metrics.stability import update_ratio
        from gradwatch.metrics.stability.update_ratio import UpdateRatio

        rank = trainer.global_rank
        assert any(isinstance(d, UpdateRatio) for d in self.gw.watcher.diagnostics)
        original = update_ratio.update_ratio_terms

        def terms(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            if trainer.global_step == FAIL_STEP and rank == FAIL_RANK:  # step_end: already counted
                raise RuntimeError(f"injected: update ratio fails on rank {rank}")
            return original(*args, **kwargs)

        update_ratio.update_ratio_terms = terms


def disk_full(out_dir: str) -> None:
    from _disk_full_worker import run

    root = os.path.join(out_dir, "disk_full")
    os.makedirs(root, exist_ok=True)
    deterministic = torch.are_deterministic_algorithms_enabled()
    lines = run(root, DISK_LIMIT, DISK_STEPS)
    torch.use_deterministic_algorithms(deterministic)  # _support.lit.fit turned them on; the ranks run as before
    with open(os.path.join(out_dir, "disk_full.txt"), "w") as f:  # the limit is lifted again
        f.write("\n".join(lines) + "\n")


def main(out_dir: str, strategies: tuple[str, ...] = STRATEGIES, fault: bool = True) -> None:
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    from gradwatch import StabilityConfig
    from gradwatch.callbacks.lightning import GradWatch

    torch.set_num_threads(1)
    if "LOCAL_RANK" not in os.environ:  # the launching process, before Lightning starts rank 1
        disk_full(out_dir)
    for name in strategies:
        run_dir = os.path.join(out_dir, name)
        os.makedirs(run_dir, exist_ok=True)
        L.seed_everything(0, verbose=False)
        gw = GradWatch(spectra=False, stability=StabilityConfig(every=1), max_overhead=None, on_error="warn")
        strategy = (DDPStrategy(timeout=timedelta(seconds=30)) if name == "ddp" else
                    ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1,
                                          timeout=timedelta(seconds=30)))
        trainer = L.Trainer(accelerator="cpu", devices=WORLD, strategy=strategy, max_steps=STEPS, log_every_n_steps=1,
                            logger=TensorBoardLogger(save_dir=run_dir, name="tb", version=0),
                            callbacks=[gw, *([UpdateRatioFails(gw)] if fault else []), RunRecord(run_dir, gw)], enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                            default_root_dir=run_dir)
        trainer.fit(ShardedMLP(), DataLoader(make_dataset(), batch_size=BATCH, shuffle=False))


if __name__ == "__main__":
    main(sys.argv[1], tuple(sys.argv[2].split(",")) if len(sys.argv) > 2 else STRATEGIES,
         fault=len(sys.argv) <= 3 or sys.argv[3] != "nofault")
