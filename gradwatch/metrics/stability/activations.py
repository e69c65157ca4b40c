"""RMS of each transformer block's output (residual-stream growth)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gradwatch.metrics.base import ActivationSite, Chart, ChartGroup, Results, StepContext
from gradwatch.metrics.stability.base import _reduced, _StabilityDiagnostic
from gradwatch.metrics.stability.config import StabilityConfig
from gradwatch.metrics.stability.discovery import _submodule


def _first_tensor(value: Any) -> Tensor | None:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, Mapping):
        for v in value.values():
            t = _first_tensor(v)
            if t is not None:
                return t
        return None
    if isinstance(value, (tuple, list)):
        for v in value:
            t = _first_tensor(v)
            if t is not None:
                return t
        return None
    for attr in ("last_hidden_state", "hidden_states"):  # dataclass-like model outputs
        t = getattr(value, attr, None)
        if isinstance(t, Tensor):
            return t
    return None




class ActivationRMS(_StabilityDiagnostic):
    """RMS of each transformer block's output (residual-stream growth): sqrt(sum x^2 / count) over every
    element of the block's outputs during the interval. ``update(sum_sq, count)`` takes (n_blocks,) vectors."""

    needs = frozenset({"activations"})
    runs_on = "all_ranks"  # sums over every rank's batch

    def __init__(self, blocks: Sequence[str], config: StabilityConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.blocks = tuple(blocks)
        n = len(self.blocks)
        self.add_state("sum_sq", torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum", persistent=True)
        self.add_state("count", torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum", persistent=True)
        self._pending: dict[int, tuple[Tensor, int]] = {}

    def _on_forward(self, i: int):
        def on_forward(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            x = _first_tensor(output)
            if x is None or not x.is_floating_point():
                return
            with torch.no_grad():
                sq = x.detach().float().square().sum().to(torch.float64)
            prev = self._pending.get(i)
            self._pending[i] = (sq, x.numel()) if prev is None else (prev[0] + sq, prev[1] + x.numel())
        return on_forward

    def activation_sites(self, model: nn.Module) -> list[ActivationSite]:
        return [ActivationSite(name=b, module=_submodule(model, b), on_forward=self._on_forward(i))
                for i, b in enumerate(self.blocks)]

    def observe(self, ctx: StepContext) -> None:
        self._begin_observe(ctx)
        n = len(self.blocks)
        pending, self._pending = self._pending, {}
        device = next(iter(pending.values()))[0].device if pending else self.sum_sq.device
        sum_sq = torch.zeros(n, dtype=torch.float64, device=device)
        count = torch.zeros(n, dtype=torch.float64, device=device)
        for i, (sq, c) in pending.items():
            sum_sq[i] = sq
            count[i] = c
        both = _reduced(ctx, torch.stack([sum_sq, count]), "sum")
        self.update(both[0], both[1])

    def update(self, sum_sq: Tensor, count: Tensor) -> None:  # type: ignore[override]
        self.sum_sq = self.sum_sq + sum_sq.to(self.sum_sq.device, self.sum_sq.dtype)
        self.count = self.count + count.to(self.count.device, self.count.dtype)

    def compute(self) -> Results:
        rms = (self.sum_sq / self.count).sqrt()
        return self._results({f"stability/activations/rms/{b}": rms[i] for i, b in enumerate(self.blocks)}, [])

    def failed_result(self) -> Results:
        return self._nan_result([f"stability/activations/rms/{b}" for b in self.blocks])

    def charts(self) -> list[Chart]:
        return [ChartGroup("stability/activations", "block output RMS",
                           tuple(f"stability/activations/rms/{b}" for b in self.blocks))]
