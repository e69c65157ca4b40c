"""The Gram of a row-sharded matrix (gradwatch.functional.gram_shards) and the owner split
(gradwatch.functional.owners), in one process: shards are simulated as FSDP2 makes them (torch.chunk of the
stored rows, empty shards included), checked against float64 singular values of the dense watched matrix."""

from __future__ import annotations

import math

import pytest
import torch

from gradwatch.engine.layers import WatchedMatrix
from gradwatch.functional.gram_shards import gram_of_pieces, gram_side, piece, watched_block
from gradwatch.functional.owners import balanced_owners, spectrum_cost
from gradwatch.functional.spectra import STATISTICS, gram_spectrum_statistics, spectrum_statistics

# (stored shape, block, transpose): Linear tall and wide, MHA in_proj q/k/v (k straddles shards), GPT-2 Conv1D
# (stored (in, out), read transposed) and its fused c_attn (q/k/v are columns of the stored shard)
CASES = [((13, 5), None, False), ((5, 13), None, False), ((18, 6), (1, 3), False), ((18, 6), (2, 3), False),
         ((7, 21), (0, 3), True), ((7, 21), (1, 3), True), ((9, 4), None, True), ((4, 9), None, True)]


def _shards(rows: int, world: int) -> list[tuple[int, int]]:
    """(offset, count) of each rank's stored rows, as FSDP2 splits dim 0 (torch.chunk; trailing ranks may be
    empty)."""
    size = math.ceil(rows / world)
    return [(min(rows, r * size), max(0, min(rows, (r + 1) * size) - r * size)) for r in range(world)]


def _low_rank(shape: tuple[int, int], rank: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape[0], rank, generator=g) @ torch.randn(rank, shape[1], generator=g)).float()


@pytest.mark.parametrize("rank", [None, 2])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("chunk", [1, 64])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-{'T' if c[2] else 'N'}")
def test_gram_from_simulated_shards_gives_the_dense_spectrum(case, world, chunk, rank):
    shape, block, transpose = case
    stored = _low_rank(shape, rank or min(shape), seed=sum(shape) + world)
    watched = WatchedMatrix("w", "w", "linear", block, transpose).matrix(stored)
    rows, cols = watched_block(shape, block, transpose)
    x = stored[rows[0]:rows[1], cols[0]:cols[1]]
    assert torch.equal(x.t() if transpose else x, watched)  # the block is the watched matrix (or its transpose)
    pieces = []
    for offset, count in _shards(shape[0], world):
        lo, hi, at = piece(rows, offset, count)
        if hi > lo:
            shard = stored[offset:offset + count]  # what this rank holds
            pieces.append((shard[lo:hi, cols[0]:cols[1]], at))
    assert sum(p.shape[0] for p, _ in pieces) == x.shape[0]
    gram = gram_of_pieces(pieces, *x.shape, rows_per_chunk=chunk, scale=0.5)
    side = gram_side(*x.shape)
    assert gram.shape == (min(x.shape),) * 2 and side == ("columns" if x.shape[1] <= x.shape[0] else "rows")
    x64 = 0.5 * x.double()
    dense_gram = x64.t() @ x64 if side == "columns" else x64 @ x64.t()
    torch.testing.assert_close(gram, dense_gram, rtol=1e-12, atol=1e-12)  # both triangles (mirrored after syrk)
    got, bad = gram_spectrum_statistics([gram], STATISTICS)
    dense = 0.5 * watched.double()
    want = spectrum_statistics(torch.linalg.svdvals(dense)[None], dense.square().sum()[None], STATISTICS)
    assert not bad.any()
    # full rank: float64 agreement; rank-deficient: the float64 Gram's documented accuracy against an SVD
    # (its zero singular values come out ~1e-8 * s_1, as on the one-process route)
    rel = 1e-10 if rank is None else 1e-6
    for s in STATISTICS:
        assert got[s][0].item() == pytest.approx(want[s][0].item(), rel=rel), s


def test_a_non_finite_gram_gives_nan_and_a_flag():
    gram = torch.eye(3, dtype=torch.float64)
    gram[1, 1] = math.inf
    got, bad = gram_spectrum_statistics([gram, torch.eye(2, dtype=torch.float64)], ("nuclear_norm",))
    assert bad.tolist() == [True, False]
    assert math.isnan(got["nuclear_norm"][0]) and got["nuclear_norm"][1].item() == pytest.approx(2.0)


def test_owners_are_balanced_and_deterministic():
    # GPT-2-shaped: per block four (E, E) and two (4E, E) matrices
    shapes = [(64, 64)] * 4 + [(256, 64), (64, 256)]
    costs = [spectrum_cost(*s) for s in shapes * 6]
    for parts in (1, 2, 3, 4):
        owners = balanced_owners(costs, parts)
        assert owners == balanced_owners(list(costs), parts)  # the same answer on every rank
        load = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(parts)]
        assert sorted(set(owners)) == list(range(parts))
        assert max(load) <= sum(costs) / parts + max(costs) / 2  # within half the largest item of perfect
    assert balanced_owners([1.0, 5.0, 3.0, 3.0], 2) == [0, 0, 1, 1]  # 5 | 3, 3; then 1 to the lighter (5 < 6)
    with pytest.raises(ValueError, match="parts"):
        balanced_owners([1.0], 0)
