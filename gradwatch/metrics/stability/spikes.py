"""Loss and gradient-norm spikes by robust running statistics, with the rules ``stability/loss_spike``,
``stability/grad_norm_spike``, ``stability/nonfinite_loss`` and ``stability/nonfinite_grad_norm``."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from gradwatch.cadence import Cadence
from gradwatch.functional.stability import RobustSpikeDetector
from gradwatch.metrics.base import Alert, Chart, ChartGroup, Results, StepContext
from gradwatch.metrics.stability.alerts import _fmt, _lower_lr
from gradwatch.metrics.stability.base import _StabilityDiagnostic
from gradwatch.metrics.stability.config import StabilityConfig


def _total_norm(tensors: list[Tensor]) -> Tensor:
    """The 2-norm of all entries of ``tensors`` together (one fused kernel where torch has one)."""
    total = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6
    if total is not None and len({t.device for t in tensors}) == 1:
        return total(tensors, 2.0)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t).to(tensors[0].device) for t in tensors]))


class _Spikes(_StabilityDiagnostic):
    """Spikes of one scalar series by robust running statistics, observed every step, logged at ``every``.

    Each step's value is scored against the previous ``spike_window`` steps: z = (x - median) / (1.4826 MAD)
    (see :class:`gradwatch.functional.stability.RobustSpikeDetector`), after ``spike_warmup`` steps; the
    window lives on the device, so no step syncs with the host. Logged: the interval's max z
    (``stability/spike/<quantity>``; absent until warmed up). ``update(value)`` scores one value. Carried
    state: the window.
    """

    quantity: str = ""
    label: str = ""

    def __init__(self, config: StabilityConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.detector = RobustSpikeDetector(self.config.spike_window, self.config.spike_warmup)
        f64 = torch.float64
        self.add_state("z_max", torch.tensor(-math.inf, dtype=f64), dist_reduce_fx="max", persistent=True)
        self.add_state("at_max", torch.tensor(math.nan, dtype=f64), dist_reduce_fx=None, persistent=True)
        self.add_state("spikes", torch.tensor(0.0, dtype=f64), dist_reduce_fx="sum", persistent=True)
        self.add_state("nonfinite", torch.tensor(0.0, dtype=f64), dist_reduce_fx="sum", persistent=True)
        self._scored = [0]  # host-side: steps past the warm-up in this interval (reset with the states)

    def observe_cadence(self) -> Cadence:
        return self.config.spike_every  # type: ignore[return-value]

    def log_cadence(self) -> Cadence:
        return self.config.every  # type: ignore[return-value]

    def reset(self) -> None:
        super().reset()
        self._scored[0] = 0

    def update(self, value: Tensor | float) -> None:  # type: ignore[override]
        """Score one value (a handful of small device ops; nothing is moved to the host)."""
        v = torch.as_tensor(value).detach().reshape(()).to(self.z_max.device, torch.float64)
        z = self.detector.score(v)
        # in place: a state reassignment costs an nn.Module __setattr__ per tensor, every step
        self.nonfinite.add_((~torch.isfinite(v)).to(torch.float64))
        if z is not None:
            self.at_max.copy_(torch.where(z > self.z_max, v, self.at_max))
            torch.maximum(self.z_max, z, out=self.z_max)
            self.spikes.add_((z > self.config.spike_threshold).to(torch.float64))
            self._scored[0] += 1

    @property
    def scored(self) -> int:
        """Steps past the warm-up in this interval."""
        return self._scored[0]

    def compute(self) -> Results:
        zmax, spikes, nonfinite, at = torch.stack([self.z_max, self.spikes, self.nonfinite,
                                                   self.at_max]).tolist()  # the one host transfer
        scalars: dict[str, Tensor] = {}
        if self.scored > 0:
            scalars[f"stability/spike/{self.quantity}"] = self.z_max.clone()
        alerts: list[Alert] = []
        if nonfinite > 0:
            alerts.append(Alert(
                rule=f"stability/nonfinite_{self.quantity}", severity="critical",
                message=f"the {self.label} was inf/NaN at {int(nonfinite)} step(s) of this interval",
                evidence={"nonfinite_steps": int(nonfinite)},
                remedies=[_lower_lr(self.settings), "gradient clipping (e.g. max norm 1.0)",
                          "z-loss 1e-4 * (log Z)^2", "bf16 instead of fp16, or a lower loss scale"]))
        if spikes > 0:
            hist = self.detector.history()
            finite = hist[torch.isfinite(hist)]
            median = float(finite.median()) if finite.numel() else math.nan
            thr = self.config.spike_threshold
            alerts.append(Alert(
                rule=f"stability/{self.quantity}_spike", severity="warning",
                message=(f"{self.label} spiked to {at:.4g} (robust z {zmax:.3g} > {_fmt(thr)}, window median "
                         f"{median:.4g}) at {int(spikes)} step(s) of this interval"),
                evidence={"value": at, "z": zmax, "threshold": thr, "spikes": int(spikes),
                          "window_median": median, "window": self.config.spike_window,
                          "trend": [v if math.isfinite(v) else None for v in hist[-8:].tolist()]},
                remedies=[_lower_lr(self.settings), "gradient clipping (e.g. max norm 1.0)",
                          "a longer learning-rate warm-up", "inspect the batches at those steps"]))
        return self._results(scalars, alerts)

    def failed_result(self) -> Results:
        return self._results({}, [])

    def charts(self) -> list[Chart]:
        return [ChartGroup("stability/spike", f"{self.label} robust z-score (max over interval)",
                           (f"stability/spike/{self.quantity}",))]

    def carried_state(self) -> dict[str, Any]:
        return {"window": self.detector.state_dict()}

    def load_carried_state(self, state: Mapping[str, Any]) -> None:
        if "window" in state:
            self.detector.load_state_dict(state["window"])


class LossSpikes(_Spikes):
    """Spikes of the training loss (``stability/spike/loss``), at the step's end."""

    quantity = "loss"
    label = "loss"
    needs = frozenset({"loss", "optimizer"})
    phase = "step_end"

    def observe(self, ctx: StepContext) -> None:
        self._begin_observe(ctx)
        if ctx.loss is not None:
            self.update(ctx.loss)


class GradNormSpikes(_Spikes):
    """Spikes of the gradient norm (``stability/spike/grad_norm``): the Frobenius norm over the watched
    matrices' true gradients (unscaled, pre-clip), when they are ready,
    ||G|| = sqrt(sum_l ||G_l||_F^2) * grad_scale.

    Under FSDP2 no gradient is made whole: each rank sums the squares of its own rows of each watched block
    and one all-reduce adds the ranks' sums (the rows a rank holds follow FSDP2's ``torch.chunk`` layout)."""

    quantity = "grad_norm"
    label = "gradient norm"
    needs = frozenset({"gradient_shards", "optimizer"})
    phase = "gradients_ready"
    runs_on = "all_ranks"  # FSDP2: the ranks' sums of squares are all-reduced (DDP, one process: no collective)

    def observe(self, ctx: StepContext) -> None:
        self._begin_observe(ctx)
        shards = ctx.gradient_shards()
        if any(s.sharded for s in shards):
            self.update(_sharded_norm(ctx, shards))
            return
        if ctx.rank != 0:  # every rank holds the whole gradients (DDP): rank zero's norm is the one written
            return
        blocks = [s.stored[s.rows[0]:s.rows[1], s.cols[0]:s.cols[1]] for s in shards if s.stored is not None]
        if blocks:
            norm = _total_norm(blocks)
            self.update(norm if ctx.grad_scale is None else norm * ctx.grad_scale)


def _sharded_norm(ctx: StepContext, shards: Sequence[Any]) -> Tensor:
    """The true gradient norm from row shards: this rank's sum of squares over its rows of every watched
    block (a block every rank holds whole counts on rank zero only), all-reduced; NaN where no rank has one."""
    from gradwatch.functional.gram_shards import piece

    total = torch.zeros((), dtype=torch.float64, device=next((s.stored.device for s in shards
                                                              if s.stored is not None), "cpu"))
    held = torch.zeros((), dtype=torch.float64, device=total.device)
    for s in shards:
        if s.stored is None or (not s.sharded and ctx.rank != 0):
            continue
        if s.sharded:  # FSDP2 chunks dim 0 with torch.chunk: rank r holds rows [r c, (r + 1) c), c = ceil(a / world)
            per_rank = -(-s.shape[0] // ctx.world_size)
            lo, hi, _ = piece(s.rows, min(ctx.rank * per_rank, s.shape[0]), s.stored_rows)
        else:
            lo, hi = s.rows
        block = s.stored[lo:hi, s.cols[0]:s.cols[1]]
        total += torch.linalg.vector_norm(block, dtype=torch.float64).to(total.device).square()
        held += 1
    both = ctx.all_reduce(torch.stack([total, held]), "sum")
    norm = both[0].sqrt() if float(both[1]) > 0 else torch.tensor(math.nan, dtype=torch.float64)
    return norm if ctx.grad_scale is None else norm * ctx.grad_scale
