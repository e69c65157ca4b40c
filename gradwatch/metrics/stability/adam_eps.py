"""Adam's eps against sqrt(v_hat) per watched parameter, with the rule ``stability/adam_eps_dominates``
(Wortsman et al. 2023)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from gradwatch.functional.stability import adam_eps_statistics, adam_states
from gradwatch.metrics.base import Alert, Chart, ChartGroup, Results, StepContext
from gradwatch.metrics.stability.alerts import _fmt
from gradwatch.metrics.stability.base import _local, _reduced, _StabilityDiagnostic
from gradwatch.metrics.stability.config import StabilityConfig


class AdamEpsShare(_StabilityDiagnostic):
    """Per watched parameter, the share of entries whose sqrt(v_hat) is below Adam's eps, and sqrt(mean v_hat)
    / eps (the gradient RMS Adam sees, against eps), read after the optimizer step from
    ``state[p]["exp_avg_sq"]`` (``max_exp_avg_sq`` with amsgrad), ``state[p]["step"]`` and the group's
    betas/eps. ``update(shares, rms_over_eps)`` takes (n_params,) vectors (NaN where missing)."""

    needs = frozenset({"optimizer"})
    phase = "step_end"
    runs_on = "all_ranks"  # FSDP2 shards its optimizer state: counts and sums are all-reduced

    def __init__(self, params: Sequence[str], config: StabilityConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.params = tuple(params)
        n = len(self.params)
        self.add_state("total", torch.zeros((2, n), dtype=torch.float64), dist_reduce_fx="sum", persistent=True)
        self.add_state("count", torch.zeros((2, n), dtype=torch.float64), dist_reduce_fx="sum", persistent=True)
        self.no_adam_state = False

    def observe(self, ctx: StepContext) -> None:
        self._begin_observe(ctx)
        index = {id(p): self.params.index(n) for n, p in ctx.params.items() if n in self.params}
        n = len(self.params)
        device = self.total.device
        table = torch.zeros((n, 3), dtype=torch.float64, device=device)  # entries below eps, entries, sum v_hat / eps^2
        found = torch.zeros(n, dtype=torch.bool)
        sharded = torch.zeros(n, dtype=torch.bool)
        for st in adam_states(ctx.optimizer):
            i = index.get(id(st.param))
            if i is None:
                continue
            v = _local(st.exp_avg_sq)
            share, rms = adam_eps_statistics(v, st.step, st.beta2, st.eps)
            count = float(v.numel())
            table[i] = torch.stack([share * count, torch.tensor(count, dtype=torch.float64, device=share.device),
                                    rms.square() * count]).to(device)
            found[i] = True
            sharded[i] = hasattr(st.exp_avg_sq, "to_local")
        self.no_adam_state = not bool(found.any())
        if self.no_adam_state:
            self._say_later("adam", "gradwatch: stability: the optimizer keeps no Adam second moments "
                            "(exp_avg_sq) for the watched parameters; stability/adam is not logged")
            self._flush_messages(ctx)
            return
        if bool(sharded.any()):
            rows = sharded.to(device)[:, None]
            table = torch.where(rows, _reduced(ctx, table, "sum"), table)
        nan = torch.tensor(math.nan, dtype=torch.float64, device=device)
        keep = found.to(device)
        share = torch.where(keep, table[:, 0] / table[:, 1], nan)
        rms_over_eps = torch.where(keep, (table[:, 2] / table[:, 1]).sqrt(), nan)
        self.update(share, rms_over_eps)

    def update(self, shares: Tensor, rms_over_eps: Tensor) -> None:  # type: ignore[override]
        values = torch.stack([shares, rms_over_eps]).to(self.total.device, self.total.dtype)
        finite = torch.isfinite(values)
        self.total = self.total + torch.where(finite, values, torch.zeros_like(values))
        self.count = self.count + finite.to(self.count.dtype)

    def compute(self) -> Results:
        mean = self.total / self.count
        scalars: dict[str, Tensor] = {}
        for i, p in enumerate(self.params):
            scalars[f"stability/adam/eps_share/{p}"] = mean[0, i]
            scalars[f"stability/adam/rms_over_eps/{p}"] = mean[1, i]
        shares = mean[0].tolist()  # the one host transfer
        over = {p: s for p, s in zip(self.params, shares) if not math.isnan(s) and s > self.config.eps_share_limit}
        alerts: list[Alert] = []
        if over:
            worst = max(over, key=over.get)
            eps = self.settings.get("eps")
            alerts.append(Alert(
                rule="stability/adam_eps_dominates", severity="warning",
                message=(f"Adam's eps exceeds sqrt(v_hat) for {over[worst]:.0%} of {worst!r}'s entries: their updates "
                         "are damped by eps rather than normalised"),
                evidence={"param": worst, "eps_share": over[worst], "threshold": self.config.eps_share_limit,
                          "parameters": over, "eps": eps},
                remedies=[f"a smaller AdamW eps (now {_fmt(eps)}; e.g. 1e-15, Wortsman et al. 2023)" if eps is not None
                          else "a smaller AdamW eps (e.g. 1e-15, Wortsman et al. 2023)",
                          "check for vanishing gradients in those layers"]))
        return self._results(scalars, alerts)

    def failed_result(self) -> Results:
        if self.no_adam_state:  # not an Adam-like optimizer: nothing to log, not a failure
            return self._results({}, [])
        return self._nan_result([f"stability/adam/eps_share/{p}" for p in self.params])

    def charts(self) -> list[Chart]:
        return [ChartGroup("stability/adam", "share of entries with sqrt(v_hat) < eps",
                           tuple(f"stability/adam/eps_share/{p}" for p in self.params)),
                ChartGroup("stability/adam", "sqrt(mean v_hat) / eps",
                           tuple(f"stability/adam/rms_over_eps/{p}" for p in self.params))]
