"""gradwatch under Lightning DDP: two CPU processes (gloo), launched as a script so Lightning's
launcher can re-run it for the second rank."""

from __future__ import annotations

import glob
import os

import pytest
import torch
from _lightning_helpers import WEIGHTS, reference_statistics
from _support.launch import run_worker
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_lightning_ddp_worker.py")


@pytest.mark.slow
def test_ddp_two_cpu_ranks(tmp_path, tb_scalars):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    run_worker(WORKER, str(tmp_path), timeout=120)  # a hang fails here

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["global_step"] for r in ranks] == [4, 4]
    steps = [1, 2, 3, 4]
    assert sorted(ranks[0]["grads"]) == steps
    for step in steps:
        # different data on each rank (DistributedSampler) ...
        x0, x1 = ranks[0]["batches"][step - 1], ranks[1]["batches"][step - 1]
        assert x0.shape == x1.shape == (16, 8) and not torch.equal(x0, x1)
        # ... yet the same gradient at on_before_optimizer_step: it has been all-reduced
        for name in WEIGHTS:
            torch.testing.assert_close(ranks[0]["grads"][step][name], ranks[1]["grads"][step][name],
                                       rtol=1e-6, atol=1e-9)

    # rank 0 wrote into the TensorBoard logger's run directory; one event file holds gradwatch's tags
    log_dir = (tmp_path / "gradwatch_log_dir.txt").read_text()
    assert os.path.realpath(log_dir) == os.path.realpath(tmp_path / "tb" / "version_0")
    events = glob.glob(str(tmp_path / "**" / "events.out.tfevents.*"), recursive=True)
    with_ours = []
    for path in events:
        ea = EventAccumulator(path, size_guidance={"scalars": 0})
        ea.Reload()
        if any(t.startswith(("grad_spectrum/", "gradwatch/")) for t in ea.Tags()["scalars"]):
            with_ours.append(path)
    assert len(with_ours) == 1, with_ours
    assert os.path.dirname(os.path.realpath(with_ours[0])) == os.path.realpath(log_dir)

    df = tb_scalars(with_ours[0])
    checked = 0
    for step in steps:
        ref = reference_statistics(ranks[0]["grads"][step])
        for tag, want in ref.items():
            got = df[(df.tag == tag) & (df.step == step)].value.tolist()
            assert len(got) == 1, (tag, step, got)  # logged once (rank 0), not once per rank
            assert got[0] == pytest.approx(want, rel=1e-5, abs=1e-12), (tag, step)
            checked += 1
    assert checked == 4 * 25
    assert sorted(df[df.tag == "gradwatch/overhead"].step.tolist()) == steps
