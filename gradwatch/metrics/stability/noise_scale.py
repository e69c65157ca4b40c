"""The gradient noise scale B_simple (McCandlish et al. 2018, appendix A)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from gradwatch.cadence import Cadence
from gradwatch.functional.stability import NoiseScaleEstimator
from gradwatch.metrics.base import Chart, ChartGroup, Results, StepContext
from gradwatch.metrics.stability.base import _StabilityDiagnostic
from gradwatch.metrics.stability.config import StabilityConfig


class NoiseScale(_StabilityDiagnostic):
    """Gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018, appendix A).

    From the step's squared gradient norms at two batch sizes b < B (``ctx.batch_gradient_norms()``, see
    :class:`gradwatch.engine.context.BatchGradientNorms`): |G|^2 ~ (B |G_B|^2 - b |G_b|^2) / (B - b) and
    tr(Sigma) ~ (|G_b|^2 - |G_B|^2) / (1/b - 1/B), each smoothed by a bias-corrected EMA (carried state)
    before the ratio is taken. ``stability/noise_scale`` is the smoothed ratio (examples); the batch size at
    which training is about as efficient in steps as in examples. ``stability/noise_scale/examples`` is B,
    the examples behind the big gradient, to read it against.
    """

    needs = frozenset({"micro_batches"})
    phase = "gradients_ready"
    runs_on = "all_ranks"  # the norms are reduced over ranks, and every rank must agree on going quiet

    def __init__(self, config: StabilityConfig | None = None, decay: float = 0.95, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.estimator = NoiseScaleEstimator(decay)
        self.add_state("value", torch.full((), math.nan, dtype=torch.float64), dist_reduce_fx=None, persistent=True)
        self.add_state("b_big", torch.full((), math.nan, dtype=torch.float64), dist_reduce_fx=None, persistent=True)
        self.inactive = False

    def observe_cadence(self) -> Cadence:
        return Cadence.at(()) if self.inactive else self.config.every  # type: ignore[return-value]

    def observe(self, ctx: StepContext) -> None:
        self._begin_observe(ctx)
        norms = ctx.batch_gradient_norms()
        if norms is None:
            if self.config.noise_scale:
                ctx.say_once("stability/noise_scale", "gradwatch: stability: stability/noise_scale is not logged: "
                             f"{getattr(ctx, 'batch_gradient_norms_reason', '') or 'one batch size only'}")
            else:  # asked for only where possible (the default): no more hooks in this run
                self.inactive = True
            return
        self.update(norms.sq_norm_small, norms.b_small, norms.sq_norm_big, norms.b_big)

    def update(self, sq_norm_small: Tensor | float, b_small: float,  # type: ignore[override]
               sq_norm_big: Tensor | float, b_big: float) -> None:
        self.estimator.update(sq_norm_small, b_small, sq_norm_big, b_big)
        self.value = self.estimator.value.to(self.value.device)
        self.b_big = torch.tensor(float(b_big), dtype=torch.float64, device=self.value.device)

    def compute(self) -> Results:
        return self._results({"stability/noise_scale": self.value.clone(),
                              "stability/noise_scale/examples": self.b_big.clone()}, [])

    def failed_result(self) -> Results:
        return self._results({}, [])  # one batch size at this step: nothing to log

    def charts(self) -> list[Chart]:
        return [ChartGroup("stability/noise_scale", "gradient noise scale B_simple and the batch (examples)",
                           ("stability/noise_scale", "stability/noise_scale/examples"))]

    def carried_state(self) -> dict[str, Any]:
        return {"estimator": self.estimator.state_dict()}

    def load_carried_state(self, state: Mapping[str, Any]) -> None:
        if "estimator" in state:
            self.estimator.load_state_dict(state["estimator"])
