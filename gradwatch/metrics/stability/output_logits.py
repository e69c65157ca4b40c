"""The output logits' log Z (mean and max over positions) and max |logit|, with the rule
``stability/log_z_drift`` (Wortsman et al. 2023)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from gradwatch.functional.stability import LogitStatistics, logit_statistics
from gradwatch.metrics.base import ActivationSite, Alert, Chart, ChartGroup, Results, StepContext
from gradwatch.metrics.stability.alerts import _lower_lr
from gradwatch.metrics.stability.base import _reduced, _StabilityDiagnostic
from gradwatch.metrics.stability.config import StabilityConfig
from gradwatch.metrics.stability.discovery import _submodule


def _logits_of(output: Any) -> Tensor | None:
    if isinstance(output, Tensor):
        return output if output.dim() >= 2 and output.is_floating_point() else None
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, (tuple, list)):
        for v in output:
            if isinstance(v, Tensor) and v.dim() >= 2 and v.is_floating_point():
                return v
    return None


class OutputLogits(_StabilityDiagnostic):
    """log Z (logsumexp over classes) mean and max over positions, and max |logit|, of the model's output.

    ``update(stats)`` takes a :class:`gradwatch.functional.stability.LogitStatistics`. Carried state: the
    first logged log_z_mean (the drift rule's reference) and recent values.
    """

    needs = frozenset({"activations", "optimizer"})
    runs_on = "all_ranks"  # sums and maxima over every rank's batch

    def __init__(self, module_name: str = "", source: Literal["hf", "head", "top"] = "top",
                 config: StabilityConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.module_name = module_name
        self.source = source
        self.add_state("z_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum", persistent=True)
        self.add_state("z_count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum", persistent=True)
        self.add_state("z_max", torch.full((), -math.inf, dtype=torch.float64), dist_reduce_fx="max", persistent=True)
        self.add_state("max_abs", torch.zeros((), dtype=torch.float64), dist_reduce_fx="max", persistent=True)
        self.reference: float | None = None
        self.history: list[tuple[int | None, float]] = []
        self._pending: list[Any] = []

    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        logits = _logits_of(output)
        if logits is None:
            self._say_later("logits", f"gradwatch: stability: the output of {self.module_name or 'the model'!r} "
                            f"({type(module).__name__}) has no logits to read; stability/logits is not logged")
            return
        mask = None
        if self.source == "hf":
            m = kwargs.get("attention_mask")
            if isinstance(m, Tensor) and m.dim() == 2 and tuple(m.shape) == tuple(logits.shape[:2]):
                mask = m
        self._pending.append(logit_statistics(logits, mask))

    def activation_sites(self, model: nn.Module) -> list[ActivationSite]:
        return [ActivationSite(name=self.module_name, module=_submodule(model, self.module_name),
                               on_forward=self._on_forward)]

    def observe(self, ctx: StepContext) -> None:
        self._begin_observe(ctx)
        pending, self._pending = self._pending, []
        dev = pending[0].log_z_sum.device if pending else self.z_sum.device
        zero = torch.zeros((), dtype=torch.float64, device=dev)
        sums = torch.stack([sum((p.log_z_sum.to(dev, torch.float64) for p in pending), zero),
                            sum((p.count.to(dev, torch.float64) for p in pending), zero)])
        maxima = torch.stack([torch.stack([p.log_z_max.to(dev, torch.float64) for p in pending]).amax() if pending
                              else torch.tensor(-math.inf, dtype=torch.float64, device=dev),
                              torch.stack([p.max_abs.to(dev, torch.float64) for p in pending]).amax() if pending
                              else zero])
        sums, maxima = _reduced(ctx, sums, "sum"), _reduced(ctx, maxima, "max")
        self.update(LogitStatistics(log_z_sum=sums[0], log_z_max=maxima[0], max_abs=maxima[1], count=sums[1]))

    def update(self, stats: Any) -> None:  # type: ignore[override]
        dev, dt = self.z_sum.device, self.z_sum.dtype
        self.z_sum = self.z_sum + stats.log_z_sum.to(dev, dt)
        self.z_count = self.z_count + stats.count.to(dev, dt)
        self.z_max = torch.maximum(self.z_max, stats.log_z_max.to(dev, dt))
        self.max_abs = torch.maximum(self.max_abs, stats.max_abs.to(dev, dt))

    def compute(self) -> Results:
        mean = self.z_sum / self.z_count
        z_max = torch.where(self.z_count > 0, self.z_max, torch.full_like(self.z_max, math.nan))
        scalars = {"stability/logits/log_z_mean": mean, "stability/logits/log_z_max": z_max,
                   "stability/logits/max_abs": torch.where(self.z_count > 0, self.max_abs,
                                                           torch.full_like(self.max_abs, math.nan))}
        return self._results(scalars, self._alerts(mean))

    def _alerts(self, mean: Tensor) -> list[Alert]:
        value = float(mean.item())  # the one host transfer
        if math.isnan(value):
            return []
        alerts: list[Alert] = []
        if self.reference is None:
            self.reference = value
        drift = value - self.reference
        if abs(drift) > self.config.log_z_drift:
            alerts.append(Alert(
                rule="stability/log_z_drift", severity="warning",
                message=f"output log Z drifted by {drift:+.3g} nats (from {self.reference:.4g} to {value:.4g})",
                evidence={"log_z_mean": value, "reference": self.reference, "drift": drift,
                          "threshold": self.config.log_z_drift,
                          "trend": [[s, v] for s, v in self.history[-5:]] + [[self.step, value]]},
                remedies=["z-loss 1e-4 * (log Z)^2 on the output logits (Wortsman et al. 2023)",
                          _lower_lr(self.settings), "weight decay on the output layer"]))
        self.history = (self.history + [(self.step, value)])[-6:]
        return alerts

    def failed_result(self) -> Results:
        return self._nan_result(["stability/logits/log_z_mean", "stability/logits/log_z_max",
                                 "stability/logits/max_abs"])

    def charts(self) -> list[Chart]:
        return [ChartGroup("stability/logits", "output log Z",
                           ("stability/logits/log_z_mean", "stability/logits/log_z_max")),
                ChartGroup("stability/logits", "max |logit|", ("stability/logits/max_abs",))]

    def carried_state(self) -> dict[str, Any]:
        return {"reference": self.reference, "history": [list(h) for h in self.history]}

    def load_carried_state(self, state: Mapping[str, Any]) -> None:
        self.reference = state.get("reference")
        self.history = [(None if s is None else int(s), float(v)) for s, v in state.get("history", [])]
