"""gradwatch under FSDP2: Lightning's ``ModelParallelStrategy`` (``fully_shard``, data-parallel size 2) on two
CPU processes (gloo), with the GradWatch Lightning callback, against one process on the same global batches.

One launch of ``_fsdp2_worker.py OUTDIR gradwatch`` serves every test here (a module fixture); it trains the
same tiny MLP twice in the same process group:

- ``clean`` (``on_error="raise"``): spectra every step, sharpness every 2 steps; any gradwatch failure is fatal.
- ``faulty`` (``on_error="warn"``): GradSpectrum (a rank-zero diagnostic) raises on rank 0 only at step 3, and
  the sharpness probe forward (an all-ranks diagnostic, running through the unsharded FSDP modules) raises on
  rank 1 only at step 4, after FSDP's pre-forward of the second sharded Linear, so that module and the root
  are left mid-forward. (GradSpectrum raising on rank 1 would test nothing: it observes on rank zero only.)

The single-process reference runs in this process. Its probe set is the same (seeded draw from the same
dataset) and each of its steps trains on the concatenation of what the two ranks' ``DistributedSampler`` gave
them, so both runs see the same weights at every step.
"""

from __future__ import annotations

import glob
import math
import os
import subprocess
import sys
from typing import Any

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_fsdp2_worker.py")
STEPS = 6
SPECTRA_REL = 1e-4
# A cross-layer MAD over two layers is half the difference of two near-equal float32 numbers
# (grad_spectrum/mad/top1_ratio is ~1.7e-4 at step 2): relative error there is rounding of the layer values,
# so every spectra comparison also allows float32 epsilon on O(1) statistics.
SPECTRA_ABS = 1e-7
SHARPNESS_REL = 1e-2
SCRUBBED = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_", "PL_", "RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE",
            "TORCHELASTIC")


def _requirements() -> str | None:
    dist = torch.distributed
    if not dist.is_available() or not dist.is_gloo_available():
        return "torch.distributed with the gloo backend is not available"
    try:
        from torch.distributed.fsdp import FSDPModule  # noqa: F401
    except ImportError:
        return "torch.distributed.fsdp.FSDPModule (FSDP2) is not available"
    try:
        from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: F401
    except ImportError:
        return "Lightning's ModelParallelStrategy is not available"
    pytest.importorskip("tbparse")
    return None


def _scalars(run_dir: str) -> Any:
    from conftest import read_tb_scalars

    return read_tb_scalars(os.path.join(run_dir, "tb", "version_0"))


def _series(df: Any) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for tag, step, value in zip(df["tag"], df["step"], df["value"]):
        out.setdefault(tag, {})[int(step)] = float(value)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    why = _requirements()
    if why:
        pytest.skip(why)
    import _fsdp2_worker as worker

    out = tmp_path_factory.mktemp("fsdp2")
    env = {k: v for k, v in os.environ.items() if not k.startswith(SCRUBBED)}
    proc = subprocess.run([sys.executable, WORKER, str(out), "gradwatch"], cwd=HERE, env=env, capture_output=True,
                          text=True, timeout=180)  # a hang fails here; collectives themselves time out at 30 s
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    worker.run_gradwatch_reference(str(out / "reference"))
    data: dict[str, Any] = {}
    for run in (*worker.GW_MODES, "reference"):
        run_dir = str(out / run)
        ranks = (0, 1) if run != "reference" else (0,)
        data[run] = {"dir": run_dir, "df": _scalars(run_dir),
                     "ranks": [torch.load(os.path.join(run_dir, f"rank{r}.pt"), weights_only=False) for r in ranks]}
        data[run]["series"] = _series(data[run]["df"])
    data["worker"] = worker
    return data


def _compare(got: dict[str, dict[int, float]], want: dict[str, dict[int, float]], prefix: str, rel: float,
             abs_: float, skip_steps: tuple[int, ...] = ()) -> float:
    """Max relative error of ``got`` against ``want`` over every (tag, step) of ``want`` under ``prefix``."""
    worst, checked = 0.0, 0
    for tag, series in want.items():
        if not tag.startswith(prefix):
            continue
        for step, w in series.items():
            if step in skip_steps:
                continue
            g = got[tag][step]
            assert math.isfinite(w) and g == pytest.approx(w, rel=rel, abs=abs_), (tag, step, g, w)
            worst = max(worst, abs(g - w) / max(abs(w), 1e-30))
            checked += 1
    assert checked > 0, prefix
    return worst


@pytest.mark.slow
@pytest.mark.parametrize("run", ["clean", "faulty"])
def test_training_finishes_on_both_ranks_and_each_point_is_logged_once(runs: dict[str, Any], run: str) -> None:
    ranks = runs[run]["ranks"]
    assert [r["global_step"] for r in ranks] == [STEPS, STEPS]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert {r["strategy"] for r in ranks} == {"ModelParallelStrategy"}
    for r in ranks:  # really sharded over the two ranks: DTensor parameters holding half the rows each
        assert r["param_types"] == ["DTensor"]
        assert r["local_shapes"]["net.0.weight"] == [16, 16] and r["local_shapes"]["net.2.weight"] == [2, 32]

    # only rank 0 writes: one event file, in rank 0's log directory
    assert ranks[1]["log_dir"] is None
    events = glob.glob(os.path.join(runs[run]["dir"], "**", "events.out.tfevents.*"), recursive=True)
    assert len(events) == 1 and os.path.dirname(events[0]) == ranks[0]["log_dir"], events

    df = runs[run]["df"]
    ours = df[df.tag.str.startswith(("grad_spectrum/", "sharpness/", "gradwatch/"))]
    counts = ours.groupby(["tag", "step"]).size()
    assert counts.max() == 1, counts[counts > 1]
    ref = runs["reference"]["df"]
    ref = ref[ref.tag.str.startswith(("grad_spectrum/", "sharpness/", "gradwatch/"))]
    assert set(zip(ours.tag, ours.step)) == set(zip(ref.tag, ref.step))  # nothing missing, nothing extra
    assert sorted(ours[ours.tag == "grad_spectrum/spectral_norm/net.0.weight"].step) == list(range(1, STEPS + 1))
    assert {2, 4, 6} <= set(ours[ours.tag == "sharpness/lambda_max"].step)  # every 2


@pytest.mark.slow
def test_spectra_and_sharpness_equal_a_single_process_run(runs: dict[str, Any]) -> None:
    got, want = runs["clean"]["series"], runs["reference"]["series"]
    spectra = _compare(got, want, "grad_spectrum/", SPECTRA_REL, SPECTRA_ABS)
    sharpness = _compare(got, want, "sharpness/lambda_max", SHARPNESS_REL, 0.0)
    assert all(v > 0 for v in want["sharpness/lambda_max"].values())
    print(f"\nFSDP2 vs one process: spectra max rel err {spectra:.2e}, "
          f"sharpness/lambda_max max rel err {sharpness:.2e}")
    # training itself is unperturbed by the extra passes through the unsharded modules
    final_ref = runs["reference"]["ranks"][0]["final"]
    for r in runs["clean"]["ranks"]:
        for name, w in final_ref.items():
            torch.testing.assert_close(r["final"][name], w, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_a_failure_on_one_rank_lets_both_ranks_finish(runs: dict[str, Any]) -> None:
    worker = runs["worker"]
    ranks = runs["faulty"]["ranks"]
    failures = [[w for w in r["warnings"] if " failed" in w] for r in ranks]
    spectra_rank, sharpness_rank = worker.FAIL_SPECTRA_RANK, worker.FAIL_SHARPNESS_RANK
    assert len(failures[spectra_rank]) + len(failures[sharpness_rank]) == 2, failures  # each said once
    assert any("GradSpectrum" in w and f"at step {worker.FAIL_SPECTRA_STEP}" in w for w in failures[spectra_rank])
    assert any("Sharpness" in w and f"at step {worker.FAIL_SHARPNESS_STEP}" in w and "probe forward fails" in w
               for w in failures[sharpness_rank])

    got, want = runs["faulty"]["series"], runs["reference"]["series"]
    layer_tags = [t for t in want if t.startswith("grad_spectrum/") and "/mad/" not in t and "/net." in t]
    assert layer_tags and all(math.isnan(got[t][worker.FAIL_SPECTRA_STEP]) for t in layer_tags)
    # every other point is the reference's: the FSDP state (unshard, settings, the aborted forward) was put back
    _compare(got, want, "grad_spectrum/", SPECTRA_REL, SPECTRA_ABS, skip_steps=(worker.FAIL_SPECTRA_STEP,))
    _compare(got, want, "sharpness/lambda_max", SHARPNESS_REL, 0.0, skip_steps=(worker.FAIL_SHARPNESS_STEP,))
    # the step that failed on rank 1 is a gap on rank 0's charts too: the failure was decided together
    assert math.isnan(got["sharpness/lambda_max"][worker.FAIL_SHARPNESS_STEP])
    final_ref = runs["reference"]["ranks"][0]["final"]
    for r in ranks:
        for name, w in final_ref.items():
            torch.testing.assert_close(r["final"][name], w, rtol=0, atol=1e-6)


# ---- gradwatch.engine.fsdp.unsharded on a one-rank mesh, in this process -------------------------------------


@pytest.fixture
def one_rank_group() -> Any:
    """A one-process gloo group (FSDP2 needs a process group even on a one-rank mesh); destroyed after."""
    dist = torch.distributed
    if not dist.is_available() or not dist.is_gloo_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed with gloo and no process group already initialised")
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        pytest.skip("torch.distributed.fsdp.fully_shard (FSDP2) is not available")
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def _sharded_mlp(mesh: Any) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    for m in (net[0], net[2], net):
        fully_shard(m, mesh=mesh)
    return net


def _settings(net: torch.nn.Module) -> list[tuple]:
    from gradwatch.engine.fsdp import _GROUP_FIELDS, _param_groups, fsdp_modules

    out = []
    for m in fsdp_modules(net):
        state = m._get_fsdp_state()
        out.append((state._auto_reshard_after_forward,
                    [tuple(getattr(pg, k) for k in _GROUP_FIELDS) for pg in _param_groups(state)]))
    return out


def test_unsharded_gives_plain_parameters_and_restores_fsdp_exactly(one_rank_group: Any) -> None:
    import torch.nn.functional as F
    from torch.distributed.tensor import DTensor

    from gradwatch.engine.fsdp import is_fsdp2, unsharded

    plain = torch.nn.Linear(2, 2)
    with unsharded(plain) as m:  # no FSDP module: nothing happens
        assert m is plain and not is_fsdp2(plain)

    net = _sharded_mlp(one_rank_group)
    x, y = torch.randn(5, 6), torch.tensor([0, 1, 2, 0, 1])
    F.cross_entropy(net(x), y).backward()  # lazy init, and training gradients to keep
    grads = {n: p.grad.to_local().clone() for n, p in net.named_parameters()}
    before = _settings(net)
    with unsharded(net):
        params = dict(net.named_parameters())
        assert not any(isinstance(p, DTensor) for p in params.values())
        g = torch.autograd.grad(F.cross_entropy(net(x), y), list(params.values()), create_graph=True)
        hv = torch.autograd.grad(g, list(params.values()), grad_outputs=[torch.ones_like(t) for t in g])
        assert all(t is not None and torch.isfinite(t).all() for t in hv)  # double backward on live storage
    assert all(isinstance(p, DTensor) for p in net.parameters()) and _settings(net) == before
    assert all(torch.equal(p.grad.to_local(), grads[n]) for n, p in net.named_parameters())  # no sync into .grad

    def fail(module: torch.nn.Module, args: Any) -> None:
        raise RuntimeError("mid-forward")

    handle = net[2].register_forward_pre_hook(fail)  # after FSDP's own pre-forward: net[2] left mid-forward
    with pytest.raises(RuntimeError, match="mid-forward"), unsharded(net):
        net(x)
    handle.remove()
    assert all(isinstance(p, DTensor) for p in net.parameters()) and _settings(net) == before
    assert all(torch.equal(p.grad.to_local(), grads[n]) for n, p in net.named_parameters())
    # the next training step sees the sharded weights again (an optimizer step on them reaches the forward)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ref = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    ref.load_state_dict({n: p.full_tensor() for n, p in net.named_parameters()})
    torch.testing.assert_close(net(x), ref(x))
