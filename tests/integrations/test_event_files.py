"""gradwatch's reader of TensorBoard event files (``read_scalars``, what ``report`` and ``compare`` read): a
directory holding a killed run's file and its resumed run's is read in the order the files were written, not
by name (two files opened in the same second sort by process id), and merged tag by tag as TensorBoard does."""

from __future__ import annotations

import time
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from gradwatch.integrations.report.runs import read_scalars


def write(run_dir: Path, name: str, rows: dict[str, dict[int, float]]) -> None:
    """One event file named ``name`` with the ``{tag: {step: value}}`` rows (walltime in write order)."""
    writer = SummaryWriter(str(run_dir / "tmp"))
    for tag, steps in rows.items():
        for step, value in steps.items():
            writer.add_scalar(tag, value, step)
    writer.close()
    (path,) = (run_dir / "tmp").iterdir()
    path.rename(run_dir / name)
    (run_dir / "tmp").rmdir()


def test_a_resumed_run_wins_from_its_first_step_whatever_the_names_say(tmp_path: Path) -> None:
    # the killed run (steps 1-5 of two series), its resumed run from step 4 (the spectrum series only, to step
    # 6), and another writer's series: the resumed run's file name sorts first, as pid 1 before pid 2
    write(tmp_path, "events.out.tfevents.1700000000.host.2.0",
          {"grad_spectrum/nuclear_norm/w": {s: 100.0 + s for s in range(1, 6)},
           "stability/update_ratio/w": {s: 200.0 + s for s in range(1, 6)}})
    time.sleep(0.05)
    write(tmp_path, "events.out.tfevents.1700000000.host.1.0",
          {"grad_spectrum/nuclear_norm/w": {s: 300.0 + s for s in range(4, 7)},
           "train/loss": {s: 1.0 / s for s in (2, 4)}})
    got = read_scalars(tmp_path)
    spectrum = got["grad_spectrum/nuclear_norm/w"]
    assert spectrum.steps.tolist() == [1, 2, 3, 4, 5, 6]
    assert spectrum.values.tolist() == [101.0, 102.0, 103.0, 304.0, 305.0, 306.0]  # the resumed run's from 4
    assert got["stability/update_ratio/w"].values.tolist() == [201.0, 202.0, 203.0, 204.0, 205.0]  # untouched
    assert got["train/loss"].steps.tolist() == [2, 4]


def test_two_writers_of_one_run_leave_each_other_alone(tmp_path: Path) -> None:
    """A host's writer and gradwatch's in the same directory at the same time: neither purges the other."""
    write(tmp_path, "events.out.tfevents.1700000000.host.9.0", {"train/loss": {s: float(s) for s in (10, 20, 30)}})
    time.sleep(0.05)
    write(tmp_path, "events.out.tfevents.1700000000.host.10.0", {"gradwatch/overhead": {s: 0.01 for s in range(1, 31)}})
    got = read_scalars(tmp_path)
    assert got["train/loss"].steps.tolist() == [10, 20, 30]
    assert got["gradwatch/overhead"].steps.tolist() == list(range(1, 31))
