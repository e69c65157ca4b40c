"""Update/weight ratio ||dW|| / ||W|| per watched parameter, with the rule
``stability/update_ratio_jump``."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from gradwatch.functional.stability import update_ratio_terms
from gradwatch.metrics.base import Alert, Chart, ChartGroup, Results, StepContext
from gradwatch.metrics.stability.alerts import _fmt, _lower_lr
from gradwatch.metrics.stability.base import _local, _reduced, _StabilityDiagnostic
from gradwatch.metrics.stability.config import StabilityConfig


def _median(values: Sequence[float]) -> float:
    s = sorted(values)
    k = len(s)
    return s[k // 2] if k % 2 else 0.5 * (s[k // 2 - 1] + s[k // 2])


class UpdateRatio(_StabilityDiagnostic):
    """||W_after - W_before|| / ||W_before|| per watched parameter, from the engine's snapshot of the weights
    before the optimizer step. ``update(ratios)`` takes an (n_params,) vector (NaN where missing); the
    interval value is the mean. Carried state: each parameter's recent logged values (its running level)."""

    needs = frozenset({"weights_before", "optimizer"})
    phase = "step_end"
    runs_on = "all_ranks"  # FSDP2 shards: each rank sums its own rows, then the sums are all-reduced

    def __init__(self, params: Sequence[str], config: StabilityConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.params = tuple(params)
        n = len(self.params)
        self.add_state("total", torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum", persistent=True)
        self.add_state("count", torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum", persistent=True)
        self.levels: dict[str, list[float]] = {}

    def observe(self, ctx: StepContext) -> None:
        self._begin_observe(ctx)
        before = ctx.weights_before()
        params = ctx.params
        sums, sharded = [], []
        for name in self.params:
            if name in before and name in params:
                sums.append(update_ratio_terms(_local(before[name]), _local(params[name])))
                sharded.append(hasattr(params[name], "to_local"))
            else:
                sums.append(torch.full((2,), math.nan, dtype=torch.float64))
                sharded.append(False)
        if not sums:
            return
        device = self.total.device
        table = torch.stack([t.to(device) for t in sums])  # (n, 2): ||dW||^2, ||W||^2 (this rank's rows)
        if any(sharded):
            rows = torch.tensor(sharded, device=device)
            table = torch.where(rows[:, None], _reduced(ctx, table.nan_to_num(0.0), "sum"), table)
        self.update((table[:, 0] / table[:, 1]).sqrt())

    def update(self, ratios: Tensor) -> None:  # type: ignore[override]
        ratios = ratios.to(self.total.device, self.total.dtype)
        finite = torch.isfinite(ratios)
        self.total = self.total + torch.where(finite, ratios, torch.zeros_like(ratios))
        self.count = self.count + finite.to(self.count.dtype)

    def compute(self) -> Results:
        mean = self.total / self.count
        scalars = {f"stability/update_ratio/{p}": mean[i] for i, p in enumerate(self.params)}
        return self._results(scalars, self._alerts(mean))

    def _alerts(self, mean: Tensor) -> list[Alert]:
        cfg = self.config
        values = mean.tolist()  # the one host transfer
        flagged: dict[str, tuple[float, float]] = {}
        for p, v in zip(self.params, values):
            hist = self.levels.get(p, [])
            if math.isnan(v):
                continue
            if len(hist) >= cfg.level_warmup:
                level = _median(hist)
                if level > 0 and v > cfg.update_ratio_factor * level:
                    flagged[p] = (v, level)
            if v > 0:  # a skipped step (fp16 overflow) is no level
                self.levels[p] = (hist + [v])[-cfg.level_window:]
        if not flagged:
            return []
        worst = max(flagged, key=lambda p: flagged[p][0] / flagged[p][1])
        v, level = flagged[worst]
        return [Alert(
            rule="stability/update_ratio_jump", severity="warning",
            message=(f"update/weight ratio of {worst!r} is {v:.3g}, {v / level:.3g}x its running level {level:.3g}"
                     + (f" ({len(flagged)} parameters above {_fmt(cfg.update_ratio_factor)}x)" if len(flagged) > 1
                        else "")),
            evidence={"param": worst, "update_ratio": v, "level": level, "factor": v / level,
                      "threshold": cfg.update_ratio_factor, "parameters": {p: r for p, (r, _) in flagged.items()},
                      "trend": self.levels.get(worst, [])[-6:]},
            remedies=[_lower_lr(self.settings), "gradient clipping (e.g. max norm 1.0)",
                      "a longer learning-rate warm-up",
                      "inspect the step's batch for outliers"])]

    def failed_result(self) -> Results:
        return self._nan_result([f"stability/update_ratio/{p}" for p in self.params])

    def charts(self) -> list[Chart]:
        return [ChartGroup("stability/update_ratio", "||dW|| / ||W||",
                           tuple(f"stability/update_ratio/{p}" for p in self.params))]

    def carried_state(self) -> dict[str, Any]:
        return {"levels": {p: list(v) for p, v in self.levels.items()}}

    def load_carried_state(self, state: Mapping[str, Any]) -> None:
        self.levels = {p: [float(x) for x in v] for p, v in state.get("levels", {}).items()}
