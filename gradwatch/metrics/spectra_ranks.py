"""Gradient spectra spread over the ranks (for :class:`gradwatch.metrics.grad_spectrum.GradSpectrum`).

Each layer with a gradient gets one owner rank, balanced by cost (:func:`gradwatch.functional.owners.
balanced_owners`, the same answer on every rank). Under DDP (or one process) every rank holds the whole
gradient, so each owner computes its layers' statistics alone: per-step time falls with the ranks. An FSDP2
(row-sharded) gradient is never gathered: its smaller Gram is assembled from the shards
(:mod:`gradwatch.functional.gram_shards`: a sum of the shards' Grams, or block rows against shards broadcast
chunk by chunk) and reduced to the owner, who takes its eigenvalues. Owners' statistics reach every rank in
one all-reduce of a (stats + 2) x layers tensor.

Collectives, in the same order on every rank: one all-gather of the shard layout; per sharded layer (rounds
of one layer per owner, so the owners solve side by side) its broadcasts and one reduce; the final
all-reduce. A failure computing a rank's part is caught where it happens: the rank still enters every
collective (its contribution NaN), the layer is marked failed, and after the final all-reduce the failed
layers are NaN (a gap) on every rank while the others stand.

Extra memory per rank stays under the largest layer's Gram plus ``cap`` bytes: the Gram being assembled,
owned Grams waiting for their solve (held only while they fit in ``cap / 2``) and float64 chunks of rows
(at most ``cap / 2``); the peak this code allocated is measured and returned.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from gradwatch.functional.gram_shards import add_block_row, add_column_gram, chunk_rows, gram_side, piece
from gradwatch.functional.owners import balanced_owners, spectrum_cost
from gradwatch.functional.spectra import gradient_spectrum_statistics, gram_spectrum_statistics


def owned_statistics(grams: list[Tensor], stats: tuple[str, ...]) -> tuple[dict[str, Tensor], Tensor]:
    """An owner's statistics of its assembled Grams (a seam for tests that make one rank fail)."""
    return gram_spectrum_statistics(grams, stats)


def local_statistics(matrices: list[Tensor], stats: tuple[str, ...], method: Any) -> tuple[dict[str, Tensor], Tensor]:
    """An owner's statistics of the whole gradients it holds (a seam for tests that make one rank fail)."""
    return gradient_spectrum_statistics(matrices, stats, method)


@dataclass
class SpreadSpectra:
    """What :func:`spread_spectra` returns, the same on every rank but ``errors``.

    Attributes:
        values: (stats, layers) float64; NaN for failed layers and layers without a gradient.
        nonfinite: (layers,) the gradient held an inf/NaN (not a failure).
        present: (layers,) some rank has a gradient for the layer.
        failed: layers whose computation raised on some rank.
        owners: each layer's owner rank (-1: no gradient).
        peak_bytes: the largest extra memory this code allocated on one rank.
        errors: this rank's failures, (layer, exception).
    """

    values: Tensor
    nonfinite: Tensor
    present: Tensor
    failed: list[int]
    owners: list[int]
    peak_bytes: float
    errors: list[tuple[int, BaseException]] = field(default_factory=list)


class _Bytes:
    """Bytes held now and at most (what this code allocates)."""

    def __init__(self) -> None:
        self.now = self.peak = 0

    def take(self, n: int) -> None:
        self.now += n
        self.peak = max(self.peak, self.now)

    def give(self, n: int) -> None:
        self.now -= n


class _Spread:
    def __init__(self, ctx: Any, stats: tuple[str, ...], method: Any, cap: int) -> None:
        self.ctx, self.stats, self.method, self.cap = ctx, stats, method, int(cap)
        self.world, self.me = ctx.world_size, ctx.rank
        self.scale = ctx.grad_scale
        self.bytes = _Bytes()
        self.errors: list[tuple[int, BaseException]] = []
        n = len(ctx.watched)
        self.values = torch.zeros(len(stats), n, dtype=torch.float64)
        self.nonfinite = torch.zeros(n, dtype=torch.float64)
        self.failed = torch.zeros(n, dtype=torch.float64)

    def fail(self, layers: list[int], exc: BaseException) -> None:
        for j in layers:
            self.failed[j] = 1.0
        if layers:
            self.errors.append((layers[0], exc))

    def run(self) -> SpreadSpectra:
        n = len(self.ctx.watched)
        try:
            self.shards = list(self.ctx.gradient_shards())
            local = torch.tensor([[s.stored is not None, s.stored_rows] for s in self.shards] + [[0, 0]],
                                 dtype=torch.long)
        except Exception as exc:  # this rank cannot even read its gradients: every layer fails, together
            self.fail(list(range(n)), exc)
            self.shards = []
            local = torch.tensor([[0, 0]] * n + [[1, 0]], dtype=torch.long)
        every = torch.stack(self.ctx.all_gather(local.reshape(-1))).reshape(self.world, n + 1, 2)
        owners = [-1] * n
        if not bool(every[:, n, 0].any()):
            self.has, self.rows = every[:, :n, 0].bool(), every[:, :n, 1]
            present = [j for j in range(n) if bool(self.has[:, j].any())]
            sizes = {j: self._shape(j) for j in present}
            costs = [spectrum_cost(*sizes[j]) for j in present]
            for j, r in zip(present, balanced_owners(costs, self.world)):
                owners[j] = r
            order = sorted(present, key=lambda j: (-spectrum_cost(*sizes[j]), j))
            self._sharded([j for j in order if self.shards[j].sharded], owners)
            self._whole([j for j in order if not self.shards[j].sharded and owners[j] == self.me])
        else:
            self.failed[:] = 1.0
        return self._combine(owners, every)

    def _shape(self, j: int) -> tuple[int, int]:
        s = self.shards[j]
        return s.rows[1] - s.rows[0], s.cols[1] - s.cols[0]

    # ---- FSDP2: Grams from shards -------------------------------------------------------------------

    def _sharded(self, order: list[int], owners: list[int]) -> None:
        mine = [[j for j in order if owners[j] == r] for r in range(self.world)]
        for k in range(max((len(m) for m in mine), default=0)):  # a round: the k-th layer of every owner
            held: list[tuple[int, Tensor]] = []
            for r in range(self.world):
                if k >= len(mine[r]):
                    continue
                j = mine[r][k]
                gram = self._assemble(j)
                self.ctx.reduce_(gram, r)
                size = gram.numel() * 8
                if r != self.me:
                    self.bytes.give(size)
                elif sum(g.numel() * 8 for _, g in held) + size <= self.cap // 2:
                    held.append((j, gram))  # solved at the round's end, beside the other owners
                else:
                    self._solve([(j, gram)])
            self._solve(held)

    def _piece(self, j: int, rank: int) -> tuple[int, int, int]:
        offset = int(self.rows[:rank, j].sum())
        return piece(self.shards[j].rows, offset, int(self.rows[rank, j]))

    def _assemble(self, j: int) -> Tensor:
        """This rank's share of layer ``j``'s Gram (its term, or its block row), every collective entered."""
        s = self.shards[j]
        p, q = self._shape(j)
        side = gram_side(p, q)
        device = s.stored.device if s.stored is not None else self.ctx.params[self.ctx.watched[j].param_name].device
        size = q if side == "columns" else p
        gram = torch.zeros(size, size, dtype=torch.float64, device=device)
        self.bytes.take(gram.numel() * 8)
        lo, hi, off = self._piece(j, self.me)
        mine = s.stored[lo:hi, s.cols[0]:s.cols[1]] if s.stored is not None and hi > lo else None
        bad: BaseException | None = None
        rows = chunk_rows(q, 8, self.cap // 4)
        if side == "columns":
            if mine is not None:
                block = max(1, min(256, math.isqrt(self.cap // 64)))  # mirroring's two temps: 2 block^2 floats
                chunk = max(min(rows, hi - lo) * q, 2 * min(block, q) ** 2) * 8  # a chunk, or those temps after
                try:
                    self.bytes.take(chunk)
                    add_column_gram(gram, mine, rows, self.scale, block)
                except Exception as exc:
                    bad = exc
                finally:
                    self.bytes.give(chunk)
        else:
            for r in range(self.world):
                r_lo, r_hi, r_off = self._piece(j, r)
                if r_hi <= r_lo or not bool(self.has[r, j]):
                    continue  # a rank without these rows (or without a gradient) sends nothing: they are zero
                for start in range(0, r_hi - r_lo, rows):
                    count = min(rows, r_hi - r_lo - start)
                    buf = torch.empty(count, q, dtype=torch.float64, device=device)
                    self.bytes.take(2 * buf.numel() * 8)  # this chunk and one float64 chunk of our own rows
                    if r == self.me:
                        try:
                            buf.copy_(mine[start:start + count])  # type: ignore[index]
                        except Exception as exc:
                            bad = bad or exc
                            buf.fill_(float("nan"))
                    self.ctx.broadcast_(buf, r)
                    if mine is not None and bad is None:
                        try:
                            add_block_row(gram, mine, off, buf, r_off + start, count, self.scale)
                        except Exception as exc:
                            bad = exc
                    self.bytes.give(2 * buf.numel() * 8)
                    del buf
        if bad is not None:
            gram.fill_(float("nan"))
            self.fail([j], bad)
        return gram

    def _solve(self, held: list[tuple[int, Tensor]]) -> None:
        if not held:
            return
        layers = [j for j, _ in held]
        try:
            values, bad = owned_statistics([g for _, g in held], self.stats)
            self._store(layers, values, bad)
        except Exception as exc:
            self.fail(layers, exc)
        for _, g in held:
            self.bytes.give(g.numel() * 8)

    # ---- DDP or one process: whole gradients ----------------------------------------------------------

    def _whole(self, layers: list[int]) -> None:
        if not layers:
            return
        sizes = []
        try:
            mats = []
            for j in layers:
                m = self.ctx.watched[j].matrix(self.shards[j].stored)
                mats.append(m if self.scale is None else m * self.scale)
                p, q = m.shape
                sizes.append((0 if m.dtype == torch.float64 else p * q * 8) + min(p, q) ** 2 * 8)
            # a float64 copy and a Gram per matrix in flight, one per worker thread at a time
            self.bytes.take(sum(heapq.nlargest(max(1, torch.get_num_threads()), sizes)))
            values, bad = local_statistics(mats, self.stats, self.method)
            self._store(layers, values, bad)
        except Exception as exc:
            self.fail(layers, exc)

    def _store(self, layers: list[int], values: dict[str, Tensor], bad: Tensor) -> None:
        """Owned layers' statistics into the table (one device-to-host transfer)."""
        table = torch.cat([torch.stack([values[s] for s in self.stats]), bad[None].to(torch.float64)]).cpu()
        index = torch.tensor(layers)
        self.values[:, index] = table[:-1]
        self.nonfinite[index] = table[-1]

    # ---- every rank's results on every rank -----------------------------------------------------------

    def _combine(self, owners: list[int], every: Tensor) -> SpreadSpectra:
        n = len(owners)
        slots = torch.zeros(self.world, dtype=torch.float64)
        slots[self.me] = float(self.bytes.peak)
        packed = torch.cat([self.values.reshape(-1), self.nonfinite, self.failed, slots])
        got = self.ctx.all_reduce(packed, "sum").cpu()
        s = len(self.stats)
        values = got[:s * n].reshape(s, n).clone()
        nonfinite = got[s * n:(s + 1) * n] > 0.5
        failed = got[(s + 1) * n:(s + 2) * n] > 0.5
        present = torch.tensor([o >= 0 for o in owners], dtype=torch.bool)
        values[:, failed | ~present] = float("nan")
        nonfinite &= ~failed
        return SpreadSpectra(values, nonfinite, present, [j for j in range(n) if failed[j]], owners,
                             float(got[(s + 2) * n:].max()), self.errors)


def spread_spectra(ctx: Any, stats: tuple[str, ...], method: Any, cap: int) -> SpreadSpectra:
    """Every watched layer's spectrum statistics, computed by its owner rank (see the module docstring);
    a collective: every rank calls it at the same step."""
    return _Spread(ctx, tuple(stats), method, cap).run()


__all__ = ["SpreadSpectra", "local_statistics", "owned_statistics", "spread_spectra"]
