"""The sustained-sharpness rule ``stability/sharpness_above_threshold`` (Cohen et al. 2021, 2022), read
from what the sharpness family logged."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from gradwatch.metrics.base import Alert, Results, StepContext
from gradwatch.metrics.stability.alerts import _fmt, _lower_lr
from gradwatch.metrics.stability.base import _StabilityDiagnostic
from gradwatch.metrics.stability.config import StabilityConfig


class SharpnessRatio(_StabilityDiagnostic):
    """The sustained-sharpness rule: the sharpness family's ``sharpness/ratio`` (lambda_max over the
    stability threshold 2/lr, or Adam's 38/lr: Cohen et al. 2021, 2022) above ``sharpness_ratio_limit`` for
    ``sharpness_sustain`` consecutive estimates raises ``stability/sharpness_above_threshold``.

    It reads what the sharpness family logged (capability ``"logged"``), so it sees each estimate once, at
    the first of its own observations after that estimate was written. Carried state: the recent estimates.
    """

    needs = frozenset({"logged", "optimizer"})
    phase = "step_end"

    def __init__(self, config: StabilityConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.recent: list[tuple[int, float]] = []  # (step, ratio) of the last sharpness_sustain estimates

    def observe(self, ctx: StepContext) -> None:
        self._begin_observe(ctx)
        got = ctx.logged("sharpness/ratio")
        if got is None or (self.recent and got[0] <= self.recent[-1][0]):
            return
        self.update(*got)

    def update(self, step: int, ratio: float) -> None:  # type: ignore[override]
        self.recent = (self.recent + [(int(step), float(ratio))])[-self.config.sharpness_sustain:]

    def compute(self) -> Results:
        limit, k = self.config.sharpness_ratio_limit, self.config.sharpness_sustain
        alerts: list[Alert] = []
        ratios = [r for _, r in self.recent]
        if len(ratios) == k and all(math.isfinite(r) and r > limit for r in ratios):
            alerts.append(Alert(
                rule="stability/sharpness_above_threshold", severity="warning",
                message=(f"sharpness lambda_max has been above its stability threshold for {k} estimate(s) in a "
                         f"row (ratio {ratios[-1]:.3g} > {_fmt(limit)}): steps of this size overshoot along the top "
                         "Hessian direction; loss spikes or divergence often follow"),
                evidence={"ratios": ratios, "steps": [s for s, _ in self.recent], "limit": limit, "sustain": k},
                remedies=[_lower_lr(self.settings), "a longer learning-rate warm-up",
                          "gradient clipping (e.g. max norm 1.0)"]))
        return self._results({}, alerts)

    def failed_result(self) -> Results:
        return self._results({}, [])

    def carried_state(self) -> dict[str, Any]:
        return {"recent": [list(x) for x in self.recent]}

    def load_carried_state(self, state: Mapping[str, Any]) -> None:
        self.recent = [(int(s), float(r)) for s, r in state.get("recent", [])]
