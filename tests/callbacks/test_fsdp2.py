"""gradwatch under FSDP2: Lightning's ``ModelParallelStrategy`` (``fully_shard``, data-parallel size 2) on two
CPU processes (gloo), with the GradWatch Lightning callback, against one process on the same global batches.

One launch of ``_fsdp2_worker.py OUTDIR gradwatch`` serves every test here (a module fixture); it trains the
same tiny MLP twice in the same process group:

- ``clean`` (``on_error="raise"``): spectra every step, sharpness every 2 steps; any gradwatch failure is fatal.
- ``faulty`` (``on_error="warn"``): GradSpectrum's share on rank 0 (the statistics of the layers rank 0 owns:
  spectra are spread over the ranks) raises at step 3, and the sharpness probe forward (an all-ranks
  diagnostic, running through the unsharded FSDP modules) raises on rank 1 only at step 4, after FSDP's
  pre-forward of the second sharded Linear, so that module and the root are left mid-forward.

The same launch then trains the MLP on 192 examples with an opposing signal planted (two groups of 16 that
share a strong feature and have different labels) for 12 steps with the signals family alone, probing every
step over the whole dataset (probe batches 80, 80, 32: rank 0 evaluates two, rank 1 one, gathered in probe
order), twice:

- ``signals`` (``on_error="raise"``, alarm 1.0): every failure and every alert would be fatal.
- ``signals_confirm`` (``on_error="warn"``, alarm 0.2): the planted pair alarms and is confirmed by the
  cosine of its sides' last-layer gradients, a pass with gradients through the unsharded modules on both
  ranks (each rank's block holds members of both sides), summed over the ranks.

The single-process reference runs in this process. Its probe set is the same (seeded draw from the same
dataset) and each of its steps trains on the concatenation of what the two ranks' ``DistributedSampler`` gave
them, so both runs see the same weights at every step.
"""

from __future__ import annotations

import glob
import json
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
# The two signals runs differ by float32 rounding only: the training gradients are summed in another order
# (reduce-scatter of two half-batch means against one full-batch mean), so after 12 steps the weights differ
# by ~1e-7 and the probe losses by <= ~2e-6 relative (7e-7 absolute, measured). Every signals statistic is a
# float64 function of those losses (means, ratios of sums, correlations of their O(0.1-1) step changes) and
# moves by about as much relatively; 1e-5 leaves a margin of 5x over the losses' own error (the statistics
# themselves agree to ~5e-7). Discrete results (outliers and their order, pair sides, counts, the alarm,
# consistency) must be equal, and are far from any tie (measured on the reference run, every window): the two
# closest outliers' robust z-scores are 3e-4 apart and the nearest z is 7e-3 from the cut, while the two runs'
# z-scores differ by ~2e-6; the nearest group correlation is 2e-2 from -rho, the smallest mean change 7e-3.
SIGNALS_REL = 1e-5
SIGNALS_LOSS_RTOL, SIGNALS_LOSS_ATOL = 1e-5, 1e-6
SIGNALS_COUNT_TAGS = ("signals/outliers", "signals/pairs", "signals/alarm")
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
    worker.run_signals_reference(str(out))
    data: dict[str, Any] = {}
    references = ("reference", *(f"{m}_reference" for m in worker.SIGNALS_MODES))
    for run in (*worker.GW_MODES, *worker.SIGNALS_MODES, *references):
        run_dir = str(out / run)
        ranks = (0, 1) if run not in references else (0,)
        data[run] = {"dir": run_dir, "df": _scalars(run_dir),
                     "ranks": [torch.load(os.path.join(run_dir, f"rank{r}.pt"), weights_only=False) for r in ranks]}
        data[run]["series"] = _series(data[run]["df"])
        for stem in ("signals", "alerts"):
            path = os.path.join(data[run]["ranks"][0]["log_dir"], f"{stem}.jsonl")
            data[run][stem] = _jsonl(path) if os.path.exists(path) else []
    data["worker"] = worker
    return data


def _jsonl(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


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
    # spread over ranks, spectra also say the most extra memory one rank allocated for them, at every step
    extra = ours.tag == "grad_spectrum/extra_memory_bytes"
    assert sorted(ours[extra].step) == list(range(1, STEPS + 1)) and (ours[extra].value > 0).all()
    ours = ours[~extra]
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
    # owners by cost: net.0.weight (32 x 16) is rank 0's, net.2.weight (4 x 32) rank 1's; only rank 0's share
    # failed, so only its layer is a gap at that step (and the family's MAD, which reads it)
    step = worker.FAIL_SPECTRA_STEP
    layer_tags = [t for t in want if t.startswith("grad_spectrum/") and "/mad/" not in t and "/net." in t]
    gaps = [t for t in layer_tags if t.endswith("/net.0.weight")]
    assert gaps and all(math.isnan(got[t][step]) for t in gaps)
    for t in set(layer_tags) - set(gaps):
        assert got[t][step] == pytest.approx(want[t][step], rel=SPECTRA_REL, abs=SPECTRA_ABS), t
    # every other point is the reference's: the FSDP state (unshard, settings, the aborted forward) was put back
    _compare(got, want, "grad_spectrum/", SPECTRA_REL, SPECTRA_ABS, skip_steps=(worker.FAIL_SPECTRA_STEP,))
    _compare(got, want, "sharpness/lambda_max", SHARPNESS_REL, 0.0, skip_steps=(worker.FAIL_SHARPNESS_STEP,))
    # the step that failed on rank 1 is a gap on rank 0's charts too: the failure was decided together
    assert math.isnan(got["sharpness/lambda_max"][worker.FAIL_SHARPNESS_STEP])
    final_ref = runs["reference"]["ranks"][0]["final"]
    for r in ranks:
        for name, w in final_ref.items():
            torch.testing.assert_close(r["final"][name], w, rtol=0, atol=1e-6)


# ---- the signals family (opposing signals) under FSDP2 ------------------------------------------------------


def _signals_tags() -> tuple[str, ...]:
    from gradwatch.metrics.signals import TAGS

    return TAGS


def _same(got: Any, want: Any, where: str = "") -> float:
    """Assert ``got`` equals ``want`` (JSON values): floats within ``SIGNALS_REL``, everything else exactly;
    returns the max relative error of the floats."""
    if isinstance(want, float) and not isinstance(got, bool) and isinstance(got, (int, float)):
        assert float(got) == pytest.approx(want, rel=SIGNALS_REL, abs=1e-12), (where, got, want)
        return abs(got - want) / max(abs(want), 1e-30)
    assert type(got) is type(want), (where, got, want)
    if isinstance(want, dict):
        assert got.keys() == want.keys(), (where, sorted(got), sorted(want))
        return max((_same(got[k], want[k], f"{where}.{k}") for k in want), default=0.0)
    if isinstance(want, list):
        assert len(got) == len(want), (where, got, want)
        return max((_same(g, w, f"{where}[{i}]") for i, (g, w) in enumerate(zip(got, want))), default=0.0)
    assert got == want, (where, got, want)
    return 0.0


@pytest.mark.slow
@pytest.mark.parametrize("run", ["signals", "signals_confirm"])
def test_signals_training_finishes_on_both_ranks_and_each_point_is_logged_once(runs: dict[str, Any],
                                                                              run: str) -> None:
    worker = runs["worker"]
    ranks = runs[run]["ranks"]
    assert [r["global_step"] for r in ranks] == [worker.SIGNALS_STEPS] * 2
    assert [r["world_size"] for r in ranks] == [2, 2]
    for r in ranks:
        assert r["strategy"] == "ModelParallelStrategy" and r["param_types"] == ["DTensor"]
        assert r["local_shapes"]["net.0.weight"] == [16, 16]
        assert r["warnings"] == []  # no gradwatch warning: nothing failed (the confirm run would only warn)

    # only rank 0 writes: one event file and one signals.jsonl, in rank 0's log directory
    assert ranks[1]["log_dir"] is None
    for pattern in ("events.out.tfevents.*", "signals.jsonl"):
        found = glob.glob(os.path.join(runs[run]["dir"], "**", pattern), recursive=True)
        assert len(found) == 1 and os.path.dirname(found[0]) == ranks[0]["log_dir"], found

    df, ref = runs[run]["df"], runs[f"{run}_reference"]["df"]
    ours = df[df.tag.str.startswith(("signals/", "gradwatch/"))]
    counts = ours.groupby(["tag", "step"]).size()
    assert counts.max() == 1, counts[counts > 1]
    ref = ref[ref.tag.str.startswith(("signals/", "gradwatch/"))]
    assert set(zip(ours.tag, ours.step)) == set(zip(ref.tag, ref.step))  # nothing missing, nothing extra
    for tag in _signals_tags():  # every step but the first (no one-step change yet)
        assert sorted(ours[ours.tag == tag].step) == list(range(2, worker.SIGNALS_STEPS + 1)), tag
    # one signals.jsonl row per probe step with a change (all but the first), each step once
    assert [row["step"] for row in runs[run]["signals"]] == list(range(2, worker.SIGNALS_STEPS + 1))


@pytest.mark.slow
@pytest.mark.parametrize("run", ["signals", "signals_confirm"])
def test_signals_equal_a_single_process_run(runs: dict[str, Any], run: str) -> None:
    worker = runs["worker"]
    got, want = runs[run], runs[f"{run}_reference"]
    _, side_a, side_b = worker.make_signals_dataset()
    planted = {"a": sorted(side_a), "b": sorted(side_b)}

    # the same probe, and every rank holds the same window of one-step changes and the same latest losses,
    # the reference's within rounding
    (ref,) = want["ranks"]
    assert ref["probe_indices"] == list(range(worker.SIGNALS_N))
    window = ref["carried"]
    assert window["change_steps"].tolist() == list(range(worker.SIGNALS_STEPS - worker.SIGNALS_WINDOW + 1,
                                                         worker.SIGNALS_STEPS + 1))
    for r in got["ranks"]:
        assert r["probe_indices"] == ref["probe_indices"]
        assert torch.equal(r["carried"]["change_steps"], window["change_steps"])
        assert torch.equal(r["carried"]["indices"], window["indices"])
        for key in ("changes", "last"):  # gathered alike on every rank
            assert torch.equal(r["carried"][key], got["ranks"][0]["carried"][key])
    loss_err = float((got["ranks"][0]["carried"]["last"] - window["last"]).abs().max())
    for key in ("changes", "last"):
        torch.testing.assert_close(got["ranks"][0]["carried"][key], window[key], rtol=SIGNALS_LOSS_RTOL,
                                   atol=2 * SIGNALS_LOSS_ATOL)

    # the scalars: counts and the alarm exactly, the rest within SIGNALS_REL; NaN where the reference has NaN
    worst = 0.0
    for tag in _signals_tags():
        for step, w in want["series"][tag].items():
            g = got["series"][tag][step]
            if math.isnan(w) or tag in SIGNALS_COUNT_TAGS:
                assert g == w or (math.isnan(g) and math.isnan(w)), (tag, step, g, w)
            else:
                assert g == pytest.approx(w, rel=SIGNALS_REL), (tag, step, g, w)
                worst = max(worst, abs(g - w) / max(abs(w), 1e-30))

    # the records: outliers in order, pairs with their sides, statistics and gradient cosines
    worst = max(worst, _same(got["signals"], want["signals"], "signals"))
    # ... and the alerts (the message formats the same numbers; the evidence carries them)
    assert [a["message"] for a in got["alerts"]] == [a["message"] for a in want["alerts"]]
    worst = max(worst, _same([a["evidence"] for a in got["alerts"]], [a["evidence"] for a in want["alerts"]],
                             "alerts"))

    # what was compared is not trivial: the planted pair is found, late in the run it is the only pair
    rows = want["signals"]
    with_pairs = [r for r in rows if r["pairs"]]
    assert len(with_pairs) >= 4 and any(r["pairs"] == [] and r["changes"] >= 5 for r in rows)
    last = rows[-1]
    assert len(last["pairs"]) == 1 and {"a": sorted(last["pairs"][0]["a"]), "b": sorted(last["pairs"][0]["b"])} \
        in (planted, {"a": planted["b"], "b": planted["a"]})
    assert set(last["outliers"]) >= set(side_a) | set(side_b)
    assert want["series"]["signals/opposing_score"][worker.SIGNALS_STEPS] > 0.5
    pairs = [p for r in with_pairs for p in r["pairs"]]
    if run == "signals":  # strict: nothing alarmed, so nothing was confirmed and no alert was written
        assert not any(p["alarm"] for p in pairs) and all(p["gradient_cosine"] is None for p in pairs)
        assert got["alerts"] == want["alerts"] == []
    else:  # every pair alarmed and its gradients were confirmed to oppose; one alert (cooldown)
        assert all(p["alarm"] and p["gradient_cosine"] < 0 for p in pairs)
        assert len(want["alerts"]) == 1 and want["alerts"][0]["rule"] == "signals/opposing_pair"
        # the confirmation summed both ranks' parts: each rank's block of the probe holds members of both sides
        blocks = [range(0, 2 * worker.SIGNALS_PROBE_BATCH), range(2 * worker.SIGNALS_PROBE_BATCH, worker.SIGNALS_N)]
        assert all(set(block) & set(side) for block in blocks for side in (side_a, side_b))
    print(f"\nFSDP2 vs one process, {run}: probe losses max abs err {loss_err:.1e}, signals statistics max rel "
          f"err {worst:.1e}")

    # training itself is unperturbed by the probe and confirmation passes through the unsharded modules
    for r in got["ranks"]:
        for name, w in ref["final"].items():
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


def test_an_extra_forward_on_one_rank_only_leaves_the_next_steps_in_line() -> None:
    """FSDP2's post-forward hook records the forward order that the next backward's prefetching reads; an extra
    pass run on one rank only (an empty probe block) must leave those records as they were, or that rank's
    next backward makes an all-gather the other rank never makes (before the fix: a timeout)."""
    why = _requirements()
    if why:
        pytest.skip(why)
    from _support.launch import run_worker

    proc = run_worker(os.path.join(HERE, "_fsdp2_extra_pass_worker.py"), timeout=120)
    assert proc.stdout.split() == ["no_grad:", "ok", "forward_with_grad:", "ok", "grad_of_all:", "ok"], proc.stdout
