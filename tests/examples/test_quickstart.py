"""The README's main command, at a tiny size: trains on real digits and writes readable TensorBoard logs."""

import sys
from pathlib import Path

import pytest
from tbparse import SummaryReader

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))


def test_quickstart_writes_spectra(tmp_path, capsys):
    quickstart = pytest.importorskip("quickstart")
    log_dir = quickstart.main(["--epochs", "1", "--every", "20", "--log-dir", str(tmp_path), "--max-overhead", "1.0"])
    out = capsys.readouterr().out
    assert "tensorboard --logdir" in out and str(tmp_path) in out
    scalars = SummaryReader(log_dir).scalars
    tags = set(scalars.tag)
    for stat in ("nuclear_norm", "effective_rank", "stable_rank"):
        assert f"grad_spectrum/{stat}/features.0.weight" in tags  # conv kernel read as (out, in*k*k)
        assert f"grad_spectrum/{stat}/classifier.1.weight" in tags
    assert "train_loss" in tags  # the user's own metrics share the run
    steps = sorted(scalars[scalars.tag == "grad_spectrum/nuclear_norm/features.0.weight"].step)
    assert steps == [1, 20, 40]  # 57 steps in one epoch, every 20 (and the first step)
    assert scalars[scalars.tag.str.startswith("grad_spectrum/")].value.notna().all()
