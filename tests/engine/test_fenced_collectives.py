"""Fenced collectives (gradwatch.engine.ranks.Ranks.fenced) on two gloo ranks: a part failing on one rank
before one of its collectives ends the part on both ranks together, and the ranks' next collectives pair
up correctly (without the fence, rank 0's all-reduce would pair with rank 1's next one)."""

from __future__ import annotations

import os
import socket
import tempfile
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gradwatch.engine.ranks import PeerFailed, Ranks


def _part(ranks: Ranks, fail_rank: int, fail_before: int) -> list[float]:
    """Three collectives; on ``fail_rank`` an exception before collective number ``fail_before``."""
    out = []
    for k in range(3):
        if ranks.rank == fail_rank and k == fail_before:
            raise RuntimeError(f"injected on rank {ranks.rank} before collective {k}")
        if k == 1:
            out += [float(t.sum()) for t in ranks.all_gather(torch.ones(ranks.rank + 1))]
        else:
            out.append(float(ranks.all_reduce(torch.tensor([float(ranks.rank + 1)]))))
    return out


def _rank(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=20))
    ranks = Ranks()
    rows = []
    for fail_rank, fail_before in [(-1, -1), (1, 0), (1, 2), (0, 1)]:
        got: object
        try:
            with ranks.fenced():
                got = _part(ranks, fail_rank, fail_before)
        except PeerFailed:
            got = "peer failed"
        except RuntimeError as exc:
            got = f"own: {exc}"
        # the next collective, outside any fence, must pair with the other rank's
        after = float(ranks.all_reduce(torch.tensor([10.0 * (rank + 1)])))
        rows.append((got, after))
    with ranks.fenced(enabled=False):  # not fenced: no control round (one collective, the data's)
        rows.append(float(ranks.all_reduce(torch.tensor([1.0]))))
    torch.save(rows, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_a_failure_before_a_collective_on_one_rank_ends_the_part_on_both() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_rank, args=(port, out), nprocs=2, start_method="fork", join=True)
        r0, r1 = (torch.load(os.path.join(out, f"rank{r}.pt")) for r in (0, 1))
    assert r0[0] == r1[0] == ([3.0, 1.0, 2.0, 3.0], 30.0)  # no failure: the values, then in step
    assert r0[1] == ("peer failed", 30.0) and r1[1][0].startswith("own: injected on rank 1 before collective 0")
    assert r0[2] == ("peer failed", 30.0) and r1[2][0].startswith("own: injected on rank 1 before collective 2")
    assert r0[3][0].startswith("own: injected on rank 0") and r1[3] == ("peer failed", 30.0)
    assert r0[4] == r1[4] == 2.0
