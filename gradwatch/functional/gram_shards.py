"""The Gram matrix of a matrix whose rows are spread over ranks, formed without gathering the matrix.

A watched gradient X (p x q) is a block S[R, C] of a stored parameter S (a x b) whose rows are sharded over
ranks (FSDP2 shards dim 0): rank r holds the stored rows [o_r, o_r + n_r), so its rows of X are the
intersection of that range with R, a contiguous block X_r, and X = [X_0; X_1; ...] in rank order. The
watched (out, in) matrix is X or X^T (GPT-2's Conv1D is stored (in, out)); either way its singular values
are those of X, the square roots of the eigenvalues of the smaller Gram:

- q <= p, "columns": X^T X = sum_r X_r^T X_r (q x q): each rank forms its own term, a sum-reduce adds them;
- p < q, "rows": X X^T (p x p) has blocks G[rows_r, rows_s] = X_r X_s^T: rank s's rows are broadcast in
  chunks, every rank forms its block row, a sum-reduce assembles the blocks (each is written by one rank).

Everything is float64 (the Gram squares the condition number; see :mod:`gradwatch.functional.spectra`),
converted one chunk of rows at a time, so no shard is ever copied whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from gradwatch.functional.spectra import single_threaded_blas

GramSide = Literal["columns", "rows"]


def watched_block(shape: tuple[int, int], block: tuple[int, int] | None,
                  transpose: bool) -> tuple[tuple[int, int], tuple[int, int]]:
    """Row and column ranges (start, stop) in the stored 2-D matrix S (``shape``) of the watched block.

    The watched (out, in) matrix is S (or S^T when ``transpose``); ``block = (i, n)`` takes the i-th of n
    equal row blocks of that (out, in) matrix: rows of S, or columns of S when S is stored transposed.
    """
    a, b = shape
    rows, cols = (0, a), (0, b)
    if block is not None:
        i, n = block
        if transpose:
            size = b // n
            cols = (i * size, (i + 1) * size)
        else:
            size = a // n
            rows = (i * size, (i + 1) * size)
    return rows, cols


def gram_side(rows: int, cols: int) -> GramSide:
    """Which Gram is smaller: ``"columns"`` (X^T X, q x q) when q <= p, else ``"rows"`` (X X^T, p x p)."""
    return "columns" if cols <= rows else "rows"


def piece(rows: tuple[int, int], shard_offset: int, shard_rows: int) -> tuple[int, int, int]:
    """(start, stop, offset): the local rows [start, stop) of a stored shard holding stored rows
    [shard_offset, shard_offset + shard_rows) that fall in the watched ``rows``, and where the first of them
    sits among X's rows (``start == stop``: none)."""
    lo = max(rows[0], shard_offset)
    hi = min(rows[1], shard_offset + shard_rows)
    if hi <= lo:
        return 0, 0, 0
    return lo - shard_offset, hi - shard_offset, lo - rows[0]


def chunk_rows(cols: int, bytes_per_entry: int, budget: int) -> int:
    """Rows per chunk so that a chunk of ``cols`` columns at ``bytes_per_entry`` stays within ``budget``
    bytes (at least one row)."""
    return max(1, int(budget) // max(1, cols * bytes_per_entry))


def _alpha(scale: float | None) -> float:
    return 1.0 if scale is None else float(scale) ** 2


def _dsyrk() -> Any:
    try:
        from scipy.linalg.blas import dsyrk
    except ImportError:  # pragma: no cover - SciPy is a dependency; torch's addmm does the same, twice the flops
        return None
    return dsyrk


def mirror_upper(gram: Tensor, block: int = 256) -> Tensor:
    """The upper triangle of ``gram`` copied onto its lower one, in place, a block of columns at a time (no
    full-size temporary)."""
    n = gram.shape[0]
    for j0 in range(0, n, block):
        j1 = min(n, j0 + block)
        d = gram[j0:j1, j0:j1]
        d.copy_(torch.triu(d) + torch.triu(d, 1).t())
        gram[j1:, j0:j1].copy_(gram[j0:j1, j1:].t())
    return gram


def add_column_gram(gram: Tensor, x: Tensor, rows_per_chunk: int, scale: float | None = None,
                    mirror_block: int = 256) -> Tensor:
    """``gram += scale^2 X^T X`` (q x q, float64, symmetric before and after), X converted ``rows_per_chunk``
    rows at a time. On the CPU with BLAS's ``dsyrk`` in place (one triangle: half the flops of a product,
    then mirrored ``mirror_block`` columns at a time), on one thread; elsewhere torch's ``addmm``."""
    dsyrk = _dsyrk() if gram.device.type == "cpu" and gram.is_contiguous() and x.shape[0] else None
    if dsyrk is None:
        for start in range(0, x.shape[0], rows_per_chunk):
            c = x[start:start + rows_per_chunk].to(torch.float64)
            gram.addmm_(c.t(), c, alpha=_alpha(scale))
        return gram
    target = gram.numpy().T  # Fortran order, the same memory: G^T = G; BLAS "lower" is its upper triangle
    with single_threaded_blas():
        for start in range(0, x.shape[0], rows_per_chunk):
            c = x[start:start + rows_per_chunk].to(torch.float64).contiguous().numpy()
            out = dsyrk(_alpha(scale), c.T, beta=1.0, c=target, trans=0, lower=1, overwrite_c=1)
            if not np.shares_memory(out, target):  # pragma: no cover - SciPy copied after all
                target[...] = out
    return mirror_upper(gram, mirror_block)


def add_block_row(gram: Tensor, x_r: Tensor, r_offset: int, x_s: Tensor, s_offset: int, rows_per_chunk: int,
                  scale: float | None = None) -> Tensor:
    """``gram[r_offset:+n_r, s_offset:+n_s] += scale^2 X_r X_s^T`` (float64), X_r converted in chunks."""
    other = x_s.to(torch.float64)
    for start in range(0, x_r.shape[0], rows_per_chunk):
        c = x_r[start:start + rows_per_chunk].to(torch.float64)
        r0 = r_offset + start
        gram[r0:r0 + c.shape[0], s_offset:s_offset + other.shape[0]].addmm_(c, other.t(), alpha=_alpha(scale))
    return gram


def gram_of_pieces(pieces: Sequence[tuple[Tensor, int]], rows: int, cols: int, rows_per_chunk: int,
                   scale: float | None = None) -> Tensor:
    """The smaller Gram of X from its row pieces ``(X_r, offset of X_r among X's rows)``, in one process:
    the sum the ranks' reduce forms (each rank's term or block row, as :func:`add_column_gram` and
    :func:`add_block_row` compute them), for checking the sharded route against a dense reference."""
    side = gram_side(rows, cols)
    n = cols if side == "columns" else rows
    device = pieces[0][0].device if pieces else None
    gram = torch.zeros(n, n, dtype=torch.float64, device=device)
    for x_r, r_offset in pieces:
        if side == "columns":
            add_column_gram(gram, x_r, rows_per_chunk, scale)
            continue
        for x_s, s_offset in pieces:  # rank s's rows arrive chunk by chunk
            for start in range(0, x_s.shape[0], rows_per_chunk):
                add_block_row(gram, x_r, r_offset, x_s[start:start + rows_per_chunk], s_offset + start,
                              rows_per_chunk, scale)
    return gram


__all__ = ["GramSide", "add_block_row", "add_column_gram", "chunk_rows", "gram_of_pieces", "gram_side",
           "mirror_upper", "piece", "watched_block"]
