"""The family's common diagnostic base (config, cadence, alert board, once-only messages) and the reductions
over ranks its activation and optimizer diagnostics share."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from gradwatch.cadence import Cadence
from gradwatch.metrics.base import Alert, Diagnostic, Results, StepContext
from gradwatch.metrics.stability.alerts import AlertBoard, _optimizer_settings
from gradwatch.metrics.stability.config import StabilityConfig


def _local(t: Tensor) -> Tensor:
    """A DTensor's local shard (FSDP2), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _reduced(ctx: StepContext, t: Tensor, op: Literal["sum", "max", "min"]) -> Tensor:
    """``t`` reduced over ranks (a no-op on one process). NaN entries stay NaN: they are mapped to the
    reduction's neutral value on the way and back where no rank had a value."""
    if getattr(ctx, "world_size", 1) <= 1:
        return t
    if op == "sum":
        return ctx.all_reduce(t, "sum")
    neutral = -math.inf if op == "max" else math.inf
    out = ctx.all_reduce(t.nan_to_num(nan=neutral), op)
    return torch.where(out == neutral, torch.full_like(out, math.nan), out) if op == "min" else out


class _StabilityDiagnostic(Diagnostic):
    """Common parts: the config, cadences, remedies' settings, the alert board and once-only messages."""

    stem = "stability"

    def __init__(self, config: StabilityConfig | None = None, board: AlertBoard | None = None,
                 emits_flag: bool | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.config = config if config is not None else StabilityConfig()
        self.board = board
        self.emits_flag = board is None if emits_flag is None else emits_flag
        self.step: int | None = None
        self.settings: dict[str, float] = {}
        self._said: set[str] = set()
        self._to_say: list[tuple[str, str]] = []

    def observe_cadence(self) -> Cadence:
        return self.config.every  # type: ignore[return-value]

    def _say_later(self, key: str, message: str) -> None:
        """From inside a hook: remember a message, said once at the next observe."""
        if key not in self._said:
            self._said.add(key)
            self._to_say.append((key, message))

    def _flush_messages(self, ctx: StepContext | None) -> None:
        say = getattr(ctx, "say_once", None)
        for key, message in self._to_say:
            if say is not None:
                say(f"stability/{key}", message)
            else:
                warnings.warn(message, RuntimeWarning, stacklevel=3)
        self._to_say.clear()

    def _begin_observe(self, ctx: StepContext) -> None:
        self.step = ctx.step
        self.settings = _optimizer_settings(ctx) if "optimizer" in self.needs else {}
        self._flush_messages(ctx)

    def _results(self, scalars: dict[str, Tensor], alerts: list[Alert]) -> Results:
        if self.board is not None:
            self.board.report(alerts)
        if self.emits_flag:
            raised = self.board.take() if self.board is not None else bool(alerts)
            scalars["stability/alert"] = torch.tensor(float(raised), dtype=torch.float64)
        return Results(scalars=scalars, alerts=tuple(alerts))

    def _nan_result(self, tags: Sequence[str]) -> Results:
        """What an interval whose observations all failed logs: NaN of ``tags`` (and the flag, if this one
        writes it)."""
        nan = torch.tensor(math.nan, dtype=torch.float64)
        return self._results({t: nan for t in tags}, [])
