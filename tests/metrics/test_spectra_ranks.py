"""GradSpectrum spread over ranks (gradwatch.metrics.spectra_ranks) on 2 and 4 CPU processes (gloo), one launch
of ``_spectra_ranks_worker.py`` for every test here: DDP and FSDP2 values equal a one-process float64 reference
on the same gradients, FSDP2 never makes a gradient whole, extra memory stays under the largest Gram plus the
cap, owners are balanced and the same on every rank, and a share failing on one rank is a gap in those layers
only, said once, with every rank finishing."""

from __future__ import annotations

import math
import os

import pytest
import torch
from _support.launch import run_worker

from gradwatch.functional.gram_shards import gram_side
from gradwatch.functional.owners import balanced_owners, spectrum_cost

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_spectra_ranks_worker.py")
REL = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[dict]]:
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        pytest.skip("torch.distributed.fsdp.fully_shard (FSDP2) is not available")
    out = tmp_path_factory.mktemp("spectra_ranks")
    run_worker(WORKER, str(out), timeout=240)  # a hang fails here; collectives time out at 30 s
    return {w: [torch.load(out / str(w) / f"rank{r}.pt", weights_only=False) for r in range(w)] for w in (2, 4)}


def _check(got: dict[str, float], want: dict[str, float], gaps: set[str]) -> int:
    """Every reference value equal within REL, but the layers in ``gaps`` NaN; the number of values checked."""
    checked = 0
    for tag, w in want.items():
        layer = tag.split("/", 2)[2]
        if layer in gaps:
            assert math.isnan(got[tag]), tag
        else:
            assert got[tag] == pytest.approx(w, rel=REL), tag
            checked += 1
    return checked


CASES = [(2, "ddp_fail"), (2, "fsdp2_fail"), (4, "fsdp2")]


@pytest.mark.slow
@pytest.mark.parametrize("world,mode", CASES)
def test_values_equal_one_process_on_the_same_gradients(runs, world, mode):
    ranks = [r[mode] for r in runs[world]]
    zero = ranks[0]
    # MHA q/k/v/out, GPT-2 c_attn q/k/v (FSDP2-wrapped Conv1D too), wide, tall, square, c_proj
    assert len(zero["tags"]) == 11
    checked = 0
    for t in (1, 4):  # steps where nothing fails
        checked += _check(zero["logged"][t], zero["reference"][t], set())
        for r in ranks[1:]:  # every rank holds the same results (rank zero's are written)
            ours = {k: v for k, v in zero["logged"][t].items() if k.startswith("grad_spectrum/")}
            assert {k: r["logged"][t][k] for k in ours} == pytest.approx(ours, rel=1e-12)
    assert checked == 2 * 11 * 6


@pytest.mark.slow
@pytest.mark.parametrize("world,mode", [(2, "fsdp2_fail"), (4, "fsdp2")])
def test_fsdp2_never_makes_a_gradient_whole_and_memory_stays_bounded(runs, world, mode):
    for r in runs[world]:
        run = r[mode]
        assert run["full_tensor_calls"] == 0  # with stability's gradient-norm spikes on at every step too
        assert len(run["grad_norm"]) == len(run["logged"])  # on every rank, at every step
        for t, norm in run["grad_norm"].items():  # from row shards, equal to the whole gradients' norm
            assert norm == pytest.approx(run["grad_norm_reference"][t], rel=1e-6), t
        bound = run["largest_gram_bytes"] + run["cap"]
        for t, logged in run["logged"].items():
            assert 0 < logged["grad_spectrum/extra_memory_bytes"] <= bound, (t, bound)


@pytest.mark.slow
@pytest.mark.parametrize("world,mode", CASES)
def test_owners_are_balanced_deterministic_and_the_same_on_every_rank(runs, world, mode):
    ranks = [r[mode] for r in runs[world]]
    shapes = ranks[0]["shapes"]
    want = balanced_owners([spectrum_cost(*s) for s in shapes], world)
    for r in ranks:
        assert all(owners == want for owners in r["owners"].values())
    assert set(want) == set(range(world))  # every rank gets work


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp_fail", "fsdp2_fail"])
def test_a_share_failing_on_one_rank_is_a_gap_in_its_layers_only(runs, mode):
    ranks = [r[mode] for r in runs[2]]
    zero = ranks[0]
    tags, owners = zero["tags"], zero["owners"][2]
    # step 2: rank 1's owner solve raised: its layers are NaN on every rank, the others are logged
    gaps = {tag for tag, o in zip(tags, owners) if o == 1}
    assert 0 < len(gaps) < len(tags)
    for r in ranks:
        _check(r["logged"][2], zero["reference"][2], gaps)
        assert r["logged"][2]["grad_spectrum/nonfinite_layers"] == 0.0  # a failure, not a non-finite gradient
    if mode == "fsdp2_fail":  # step 3: rank 1's block-row products raised: the layers on the rows side only
        # (the side of the stored block: a transposed (Conv1D) matrix is stored the other way round)
        stored = [s[::-1] if tr else s for s, tr in zip(zero["shapes"], zero["transposed"])]
        rows = {tag for tag, s in zip(tags, stored) if gram_side(*s) == "rows"}
        assert rows and rows != set(tags)
        for r in ranks:
            _check(r["logged"][3], zero["reference"][3], rows)
    # one warning, on the failing rank, naming the layer and the cause; training went on to the last step
    assert zero["warnings"] == []
    (said,) = ranks[1]["warnings"]
    assert "GradSpectrum" in said and "at step 2" in said and "fails on rank 1" in said and "on layer" in said
    for r in ranks:
        assert not any(math.isnan(v) for v in r["logged"][4].values())
