"""One probe step of the ``signals`` family as a row of numbers: the interval state is one flat float64 tensor
of such rows (each prefixed by its length), so that it is saved, cast and moved like any metric state."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

PAIR_NUMBERS = 7  # correlation, consistency, share, score, gradient cosine, shared direction, relative swing


@dataclass
class Pair:
    """An opposing pair as recorded: the sides as dataset indices, its statistics
    (:class:`gradwatch.functional.signals.OpposingPair`) and the gradient confirmation (NaN: not checked)."""

    a: list[int]
    b: list[int]
    correlation: float
    consistency: float
    share: float
    score: float
    cosine: float = math.nan
    shared: float = math.nan
    swing: float = math.nan
    followers_a: list[int] = field(default_factory=list)  # dataset indices that moved with a side without
    followers_b: list[int] = field(default_factory=list)  # carrying the shared direction

    def alarm(self, threshold: float) -> bool:
        """The score reaches ``threshold`` and the gradient check (where made) did not refute it."""
        return self.score >= threshold and not (math.isfinite(self.cosine) and self.cosine >= 0)


@dataclass
class Row:
    """What one probe step showed. ``changes`` is W, the one-step changes in the window (0: this probe step
    added none, e.g. the first of a burst; such a row is not logged)."""

    step: int
    changes: int
    top1pct_share: float
    loss_a: float
    loss_b: float
    outliers: list[int]  # dataset indices, most extreme first
    pairs: list[Pair] | None  # None: too few changes for pairs

    def encode(self, position: Mapping[int, int]) -> Tensor:
        """The row as numbers; examples as their positions in the probe (small ints, exact in any float dtype
        a state may be cast to, where a dataset index may not be)."""
        pos = lambda ids: [position[i] for i in ids]  # noqa: E731
        out: list[float] = [self.step, self.changes, self.top1pct_share, self.loss_a, self.loss_b,
                            len(self.outliers), *pos(self.outliers), -1 if self.pairs is None else len(self.pairs)]
        for p in self.pairs or ():
            out += [len(p.a), *pos(p.a), len(p.b), *pos(p.b), p.correlation, p.consistency, p.share, p.score,
                    p.cosine, p.shared, p.swing, len(p.followers_a), *pos(p.followers_a), len(p.followers_b),
                    *pos(p.followers_b)]
        return torch.tensor(out, dtype=torch.float64)

    @staticmethod
    def decode(row: Tensor, indices: Sequence[int]) -> Row:
        """:meth:`encode` undone, positions mapped back to the dataset ``indices`` of the probe."""
        v = row.detach().cpu().double().tolist()
        ids = lambda xs: [indices[int(round(x))] for x in xs]  # noqa: E731
        n_out = int(v[5])
        i = 6 + n_out
        outs = ids(v[6:i])
        n_pairs = int(v[i])
        i += 1
        pairs: list[Pair] | None = None if n_pairs < 0 else []
        for _ in range(max(0, n_pairs)):
            na = int(v[i])
            a = ids(v[i + 1:i + 1 + na])
            i += 1 + na
            nb = int(v[i])
            b = ids(v[i + 1:i + 1 + nb])
            i += 1 + nb
            numbers = v[i:i + PAIR_NUMBERS]
            i += PAIR_NUMBERS
            followers = []
            for _ in range(2):
                nf = int(v[i])
                followers.append(ids(v[i + 1:i + 1 + nf]))
                i += 1 + nf
            pairs.append(Pair(a, b, *numbers, *followers))  # type: ignore[union-attr]
        return Row(int(v[0]), int(v[1]), v[2], v[3], v[4], outs, pairs)


def append_row(rows: Tensor, row: Row, indices: Sequence[int]) -> Tensor:
    """``rows`` with ``row`` appended (length-prefixed), on the state's device and dtype."""
    code = row.encode({idx: k for k, idx in enumerate(indices)})
    code = torch.cat([code.new_tensor([code.numel()]), code]).to(rows.device, rows.dtype)
    return torch.cat([rows, code])


def decode_rows(rows: Tensor, indices: Sequence[int]) -> list[Row]:
    """Every row of the flat state ``rows``."""
    flat, out, i = rows.detach().cpu(), [], 0
    while i < flat.numel():
        n = int(flat[i])
        out.append(Row.decode(flat[i + 1:i + 1 + n], indices))
        i += 1 + n
    return out


def drop_last_row(rows: Tensor) -> Tensor:
    """``rows`` without its last row."""
    flat, i, last = rows.detach().cpu(), 0, 0
    while i < flat.numel():
        last, i = i, i + 1 + int(flat[i])
    return rows[:last]
