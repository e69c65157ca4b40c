"""Where this process stands among the training ranks, and the few collectives the engine runs.

Every rank enters the engine, so every collective here is called on every rank in the same order; on a
single process (or before ``torch.distributed`` is initialised) each is the identity.

Fenced collectives: inside :meth:`Ranks.fenced` (the engine wraps each all-ranks diagnostic's ``observe``
in it) every collective is preceded by a control all-reduce of three counts: ranks about to run a
collective, ranks whose part ended, ranks whose part failed. A collective runs only when every rank is at
one; otherwise the ranks at one raise :class:`PeerFailed`, and the ranks whose part ended (normally or by
an exception) keep answering control rounds until no rank is left at a collective. So an exception on one
rank before one of its collectives ends the diagnostic's part on every rank together, instead of pairing
the other ranks' next collective with the wrong one (a crash or, with equal shapes, wrong numbers).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor

_AT_COLLECTIVE, _ENDED, _FAILED = 0, 1, 2


class PeerFailed(RuntimeError):
    """Raised at a fenced collective on a rank whose peers' part of the same diagnostic ended or failed."""


class Ranks:
    """The process group view the engine uses (the default group)."""

    def __init__(self) -> None:
        self._fence = False
        self.refresh()

    @contextmanager
    def fenced(self, enabled: bool = True) -> Iterator[None]:
        """Collectives inside the block are fenced (module docstring); on leaving, this rank answers control
        rounds until no rank waits at a collective. Not nested; the identity on one process."""
        if not (enabled and self.distributed) or self._fence:
            yield
            return
        self._fence, state = True, _FAILED
        try:
            yield
            state = _ENDED
        finally:
            self._fence = False
            while self._control(state)[_AT_COLLECTIVE] > 0:
                pass

    def observe_fenced(self, diagnostic: Any, ctx: Any, enabled: bool) -> None:
        """``diagnostic.observe(ctx)``, fenced where ``enabled``; a :class:`PeerFailed` is swallowed: the rank
        that failed flags it, and the engine's reduction of the failure flags marks it failed elsewhere here."""
        try:
            with self.fenced(enabled):
                diagnostic.observe(ctx)
        except PeerFailed:
            pass

    def _control(self, state: int) -> list[int]:
        counts = torch.zeros(3, dtype=torch.int64, device=self._device())
        counts[state] = 1
        torch.distributed.all_reduce(counts)
        return counts.tolist()

    def _enter(self) -> None:
        """Before a collective: inside a fence, go on only if every rank is at one."""
        if self._fence and self._control(_AT_COLLECTIVE)[_AT_COLLECTIVE] < self.world_size:
            raise PeerFailed("another rank's part of this diagnostic ended or failed before this collective")

    def refresh(self) -> None:
        dist = torch.distributed
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1

    @property
    def is_zero(self) -> bool:
        return self.rank == 0

    def _device(self) -> torch.device:
        dist = torch.distributed
        backend = dist.get_backend() if self.distributed else "gloo"
        if backend == "nccl" and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def all_reduce(self, tensor: Tensor, op: Literal["sum", "max", "min"] = "sum") -> Tensor:
        """The reduction over ranks of ``tensor`` (a new tensor, on ``tensor``'s device)."""
        if not self.distributed:
            return tensor.clone()
        self._enter()
        dist = torch.distributed
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        work = tensor.detach().to(self._device(), copy=True)
        dist.all_reduce(work, op=ops[op])
        return work.to(tensor.device)

    def all_gather(self, tensor: Tensor) -> list[Tensor]:
        """Every rank's ``tensor`` (1-d, lengths may differ), in rank order."""
        if not self.distributed:
            return [tensor]
        self._enter()
        dist = torch.distributed
        device = self._device()
        flat = tensor.detach().reshape(-1).to(device)
        sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(self.world_size)]
        dist.all_gather(sizes, torch.tensor([flat.numel()], device=device))
        longest = int(max(s.item() for s in sizes))
        padded = torch.zeros(longest, dtype=flat.dtype, device=device)
        padded[:flat.numel()] = flat
        out = [torch.zeros_like(padded) for _ in range(self.world_size)]
        dist.all_gather(out, padded)
        return [o[:int(s.item())].to(tensor.device) for o, s in zip(out, sizes)]

    def broadcast_(self, tensor: Tensor, src: int) -> Tensor:
        """``tensor`` overwritten with rank ``src``'s (in place; every rank passes one of the same shape)."""
        if not self.distributed:
            return tensor
        self._enter()
        work = tensor if tensor.device == self._device() else tensor.to(self._device())
        torch.distributed.broadcast(work, src=src)
        if work is not tensor:
            tensor.copy_(work)
        return tensor

    def reduce_(self, tensor: Tensor, dst: int) -> Tensor:
        """The sum over ranks of ``tensor``, in place on rank ``dst`` (left unspecified elsewhere)."""
        if not self.distributed:
            return tensor
        self._enter()
        work = tensor if tensor.device == self._device() else tensor.to(self._device())
        torch.distributed.reduce(work, dst=dst, op=torch.distributed.ReduceOp.SUM)
        if work is not tensor:
            tensor.copy_(work)
        return tensor

    def any(self, flags: Tensor) -> Tensor:
        """Element-wise: whether the flag is set on any rank (decisions taken together)."""
        return self.all_reduce(flags.to(torch.int32), "max").bool() if self.distributed else flags.bool()

    def flags_from_zero(self, flags: list[bool]) -> list[bool]:
        """Rank zero's ``flags``, on every rank (one broadcast)."""
        if not self.distributed or not flags:
            return list(flags)
        self._enter()
        t = torch.tensor([int(f) for f in flags], device=self._device())
        torch.distributed.broadcast(t, src=0)
        return [bool(v) for v in t.tolist()]

    def from_zero(self, value: bool) -> bool:
        """Rank zero's ``value``, on every rank."""
        if not self.distributed:
            return value
        self._enter()
        t = torch.tensor([int(value)], device=self._device())
        torch.distributed.broadcast(t, src=0)
        return bool(t.item())
