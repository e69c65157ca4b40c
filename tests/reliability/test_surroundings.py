"""Faults in the surroundings, not in the model: each ends with training finished and one clear warning.

- a ``log_dir`` that cannot be created (a path under a regular file: what a typo or a stale mount gives a user;
  chmod would not do, the tests run as root), through Lightning and the Hugging Face Trainer;
- a disk that fills in the middle of a run: ``RLIMIT_FSIZE`` in a subprocess (SIGXFSZ ignored, so a write
  past the limit fails with EFBIG, as ENOSPC does on a full disk), the same launch as the two-rank case;
- the Hugging Face TensorBoard writer closed before gradwatch's last write (HF's ``TensorBoardCallback``
  closes its ``SummaryWriter`` at ``on_train_end``; here a callback ahead of gradwatch closes it before the
  last step's write);
- one rank raising inside a gradwatch diagnostic (the update/weight ratio, an all-ranks one) under Lightning
  DDP and under FSDP2 on two gloo ranks: no hang, both ranks finish, one warning, NaN at that step.
"""

from __future__ import annotations

import math
import os
import pathlib
import re
import sys
import warnings
from typing import Any

import pytest
import torch
from _support.launch import run_worker
from _support.tensorboard import read_series

HERE = os.path.dirname(os.path.abspath(__file__))


def _gradwatch_warnings(caught: list[warnings.WarningMessage], word: str) -> list[str]:
    return [str(w.message) for w in caught if str(w.message).startswith("gradwatch") and word in str(w.message)]


def test_lightning_log_dir_under_a_file_warns_once_and_training_finishes(tmp_path):
    from _support.lit import fit

    from gradwatch.callbacks.lightning import GradWatch

    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    log_dir = str(blocker / "logs")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, _ = fit(tmp_path, [GradWatch(spectra=1, log_dir=log_dir, max_overhead=None)], max_steps=3,
                         logger=False)
    assert trainer.global_step == 3
    said = _gradwatch_warnings(caught, "failed")
    assert len(said) == 1 and log_dir in said[0] and "NotADirectoryError" in said[0] and "training goes on" in said[0]
    assert blocker.read_text() == "not a directory"


def test_hf_log_dir_under_a_file_warns_once_and_training_finishes(tmp_path):
    from _support.hf import trainer, training_args

    from gradwatch.callbacks.transformers import GradWatch

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    log_dir = str(blocker / "logs")
    t = trainer(training_args(tmp_path / "out", max_steps=3), [GradWatch(spectra=1, log_dir=log_dir,
                                                                         max_overhead=None)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.train()
    assert t.state.global_step == 3
    said = _gradwatch_warnings(caught, "failed")
    assert len(said) == 1 and log_dir in said[0] and "NotADirectoryError" in said[0]


@pytest.fixture(scope="module")
def worker_runs(tmp_path_factory) -> str:
    """One launch of ``_rank_fault_worker.py``: the disk-full run, then the two-rank DDP and FSDP2 runs."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    out = tmp_path_factory.mktemp("surroundings")
    run_worker(os.path.join(HERE, "_rank_fault_worker.py"), str(out), timeout=240)  # a hang fails here
    return str(out)


@pytest.mark.slow
def test_disk_full_in_the_middle_of_a_run_warns_once_and_training_finishes(worker_runs):
    """The limit (30 kB) is reached after a few steps of spectra and stability at every step (about 2 kB a
    step): the steps before it are in the event file, then one warning, and training runs to its end."""
    sys.path.insert(0, HERE)
    from _rank_fault_worker import DISK_LIMIT, DISK_STEPS

    steps = DISK_STEPS

    root = os.path.join(worker_runs, "disk_full")
    with open(os.path.join(worker_runs, "disk_full.txt")) as f:
        lines = f.read().splitlines()
    assert f"FINISHED {steps}" in lines, lines
    said = [line for line in lines if line.startswith("WARNING") and "failed" in line]
    assert len(said) == 1, said
    assert "File too large" in said[0] and os.path.join(root, "gw") in said[0] and "training goes on" in said[0]
    (event,) = os.listdir(os.path.join(root, "gw"))
    assert os.path.getsize(os.path.join(root, "gw", event)) == DISK_LIMIT  # the run did reach the limit
    series = read_series(os.path.join(root, "gw"), ("grad_spectrum/frobenius_norm/",))
    written = sorted(next(iter(series.values())))
    assert written and written == list(range(1, len(written) + 1)) and len(written) < steps, written  # cut mid-run


def _closer(step: int) -> Any:
    """A callback ahead of gradwatch that closes HF's TensorBoard writer at the end of step ``step``, before
    gradwatch writes that step (as HF's own ``on_train_end`` does before a late write). Set ``.trainer``."""
    from transformers import TrainerCallback
    from transformers.integrations import TensorBoardCallback

    class Closer(TrainerCallback):
        trainer: Any = None
        closed = False

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == step:
                (tb,) = [cb for cb in self.trainer.callback_handler.callbacks if isinstance(cb, TensorBoardCallback)]
                tb.tb_writer.close()
                self.closed = True

    return Closer()


def test_hf_tensorboard_writer_closed_before_gradwatch_writes(tmp_path, monkeypatch):
    """The writes after the close still land (torch's SummaryWriter reopens a file) and every gradwatch series
    has every step once; training finishes with no gradwatch warning."""
    from _support.hf import trainer, training_args

    from gradwatch.callbacks.transformers import GradWatch

    closer = _closer(4)
    gw = GradWatch(spectra=1, max_overhead=None, on_error="raise")
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    t = trainer(training_args(tmp_path / "out", max_steps=4), [closer, gw])
    closer.trainer = t
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.train()
    assert closer.closed and t.state.global_step == 4
    assert _gradwatch_warnings(caught, "failed") == []
    series = read_series(tmp_path / "tb", ("grad_spectrum/",))
    assert series and all(sorted(s) == [1, 2, 3, 4] for s in series.values())


@pytest.mark.slow
def test_one_rank_failing_under_ddp_and_fsdp2_does_not_hang(worker_runs):
    sys.path.insert(0, HERE)
    from _rank_fault_worker import FAIL_RANK, FAIL_STEP, STEPS, STRATEGIES

    tmp_path = pathlib.Path(worker_runs)
    for strategy in STRATEGIES:
        ranks = [torch.load(tmp_path / strategy / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
        assert [r["global_step"] for r in ranks] == [STEPS, STEPS], strategy
        for name, w in ranks[0]["final"].items():  # the ranks trained the same model to the end
            assert torch.equal(w, ranks[1]["final"][name]), (strategy, name)
        said = [w for r in ranks for w in r["warnings"] if "failed" in w]
        assert len(said) == 1 and "UpdateRatio" in said[0] and f"step {FAIL_STEP}" in said[0], (strategy, said)
        assert "injected" in said[0] and f"rank {FAIL_RANK}" in said[0]
        series = read_series(tmp_path / strategy / "tb", ("stability/update_ratio/",))
        assert series, strategy
        for tag, values in series.items():
            assert sorted(values) == list(range(1, STEPS + 1)), (strategy, tag)
            assert math.isnan(values[FAIL_STEP]), (strategy, tag)  # rank 0 logs the failure on rank 1
            assert all(math.isfinite(v) and v > 0 for s, v in values.items() if s != FAIL_STEP), (strategy, tag)
        assert not [w for w in said if re.search("collective|timed out", w)]
