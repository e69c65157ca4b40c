"""Max attention logit and attention entropy per attention module (Wortsman et al. 2023; Zhai et al.
2023), with the rules ``stability/attention_logit_level``, ``stability/attention_logit_growth`` and
``stability/attention_entropy_collapse``."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gradwatch.functional.attention import AttentionStatistics, attention_logit_statistics, multihead_attention_qk
from gradwatch.metrics.base import ActivationSite, Alert, Chart, ChartGroup, Results, StepContext
from gradwatch.metrics.stability.alerts import _fmt, _lower_lr
from gradwatch.metrics.stability.base import _reduced, _StabilityDiagnostic
from gradwatch.metrics.stability.config import StabilityConfig
from gradwatch.metrics.stability.discovery import AttentionKind, _submodule


class AttentionLogits(_StabilityDiagnostic):
    """Max attention logit and min-over-heads attention entropy per attention module.

    ``update(max_logit, entropy_min)`` takes two (n_modules,) vectors of one observation (NaN / -inf where a
    module was not measured); :meth:`observe` builds them from what the hooks reduced during the step.
    Carried state: the last logged global max logits (for the growth rule).
    """

    needs = frozenset({"activations", "optimizer"})
    runs_on = "all_ranks"  # the step's batch spans the ranks: max / min over them

    def __init__(self, names: Sequence[str], kinds: Sequence[AttentionKind] | None = None,
                 config: StabilityConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.names = tuple(names)
        self.kinds = tuple(kinds) if kinds is not None else ("sdpa",) * len(self.names)
        n = len(self.names)
        self.add_state("max_logit", torch.full((n,), -math.inf, dtype=torch.float64), dist_reduce_fx="max",
                       persistent=True)
        self.add_state("entropy_min", torch.full((n,), math.inf, dtype=torch.float64), dist_reduce_fx="min",
                       persistent=True)
        self.history: list[tuple[int | None, float]] = []  # carried: (step, global max) per logging event
        self._pending: dict[int, list[Tensor]] = {}
        self._sdpa_seen: dict[int, bool] = {}
        # not _dtype: torchmetrics owns that name and resets it to float32 on every .to() (the engine's attach)
        self._logit_dtype = torch.float64 if self.config.attention_precision == "float64" else torch.float32

    # hooks ---------------------------------------------------------------------------------------

    def _add(self, i: int, stats: AttentionStatistics) -> None:
        cur = self._pending.get(i)
        if cur is None:
            self._pending[i] = [stats.max_logit, stats.entropy_sum, stats.rows]
        elif cur[0].shape == stats.max_logit.shape:
            self._pending[i] = [torch.maximum(cur[0], stats.max_logit), cur[1] + stats.entropy_sum,
                                cur[2] + stats.rows]
        else:  # several calls with different head counts inside one module: keep per-call minima apart
            mx = torch.maximum(cur[0].amax(), stats.max_logit.amax()).reshape(1)
            ent = torch.minimum((cur[1] / cur[2]).nan_to_num(math.inf).amin(),
                                stats.entropy.nan_to_num(math.inf).amin()).reshape(1)
            self._pending[i] = [mx, ent, torch.ones(1, dtype=ent.dtype, device=ent.device)]

    def _on_attention(self, i: int):
        def on_attention(query: Tensor, key: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False,
                         scale: float | None = None, enable_gqa: bool = False) -> None:
            self._sdpa_seen[i] = True
            self._add(i, attention_logit_statistics(query, key, attn_mask, is_causal, scale, enable_gqa,
                                                    max_exact_len=self.config.max_exact_seq_len,
                                                    dtype=self._logit_dtype))
        return on_attention

    def _on_forward(self, i: int):
        name, kind = self.names[i], self.kinds[i]

        def on_forward(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            seen = self._sdpa_seen.pop(i, False)
            if seen:
                return
            if kind == "mha":
                self._mha_fallback(i, module, args, kwargs)
                return
            self._say_later(f"unreadable/{name}",
                            f"gradwatch: stability: attention module {name!r} ({type(module).__name__}) made no "
                            "scaled_dot_product_attention call (an eager or custom attention kernel?); its "
                            "attention logits are not measured")
        return on_forward

    def _mha_fallback(self, i: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
                 "is_causal")
        bound = dict(zip(names, args))
        bound.update(kwargs)
        inputs = multihead_attention_qk(module, bound["query"], bound["key"], bound.get("key_padding_mask"),
                                        bound.get("attn_mask"), bool(bound.get("is_causal", False)))
        self._add(i, attention_logit_statistics(inputs.query, inputs.key, inputs.attn_mask, False, inputs.scale,
                                                max_exact_len=self.config.max_exact_seq_len, dtype=self._logit_dtype))

    def activation_sites(self, model: nn.Module) -> list[ActivationSite]:
        return [ActivationSite(name=n, module=_submodule(model, n), on_forward=self._on_forward(i),
                               on_attention=self._on_attention(i)) for i, n in enumerate(self.names)]

    # metric --------------------------------------------------------------------------------------

    def observe(self, ctx: StepContext) -> None:
        self._begin_observe(ctx)
        mx, ent = self.take_pending()
        self.update(_reduced(ctx, mx, "max"), _reduced(ctx, ent, "min"))

    def take_pending(self) -> tuple[Tensor, Tensor]:
        """(max_logit, entropy_min) per module from what the hooks reduced since the last call."""
        n = len(self.names)
        mx = torch.full((n,), -math.inf, dtype=torch.float64)
        ent = torch.full((n,), math.nan, dtype=torch.float64)
        if self._pending:
            device = next(iter(self._pending.values()))[0].device
            mx, ent = mx.to(device), ent.to(device)
            for i, (m, s, r) in self._pending.items():
                mx[i] = m.amax().to(torch.float64)
                ent[i] = (s / r).to(torch.float64).nan_to_num(math.inf).amin()
        self._pending.clear()
        self._sdpa_seen.clear()
        return mx, torch.where(torch.isinf(ent) & (ent > 0), torch.full_like(ent, math.nan), ent)

    def update(self, max_logit: Tensor, entropy_min: Tensor) -> None:  # type: ignore[override]
        max_logit = max_logit.to(self.max_logit.device, self.max_logit.dtype)
        entropy_min = entropy_min.to(self.entropy_min.device, self.entropy_min.dtype)
        self.max_logit = torch.fmax(self.max_logit, max_logit)
        self.entropy_min = torch.fmin(self.entropy_min, entropy_min)

    def compute(self) -> Results:
        mx = torch.where(torch.isfinite(self.max_logit), self.max_logit, torch.full_like(self.max_logit, math.nan))
        ent = torch.where(torch.isfinite(self.entropy_min), self.entropy_min,
                          torch.full_like(self.entropy_min, math.nan))
        scalars: dict[str, Tensor] = {}
        for i, n in enumerate(self.names):
            scalars[f"stability/attention/max_logit/{n}"] = mx[i]
            scalars[f"stability/attention/entropy_min/{n}"] = ent[i]
        if self.names:
            overall = mx.nan_to_num(nan=-math.inf).amax()
            overall = torch.where(torch.isfinite(overall), overall, torch.full_like(overall, math.nan))
        else:
            overall = torch.tensor(math.nan, dtype=torch.float64)
        scalars["stability/attention/max_logit"] = overall
        return self._results(scalars, self._alerts(mx, ent, overall))

    def _alerts(self, mx: Tensor, ent: Tensor, overall: Tensor) -> list[Alert]:
        cfg = self.config
        host = torch.cat([mx, ent, overall.reshape(1)]).tolist()  # the one host transfer
        n = len(self.names)
        per_max, per_ent, top = host[:n], host[n:2 * n], host[-1]
        alerts: list[Alert] = []
        if math.isnan(top):
            return alerts
        worst = self.names[max(range(n), key=lambda j: -math.inf if math.isnan(per_max[j]) else per_max[j])]
        trend = [[s, v] for s, v in self.history[-cfg.growth_window:]] + [[self.step, top]]
        remedies = [_lower_lr(self.settings),
                    "qk-layernorm (LayerNorm on queries and keys before the dot product; Wortsman et al. 2023)",
                    "a longer learning-rate warm-up", "gradient clipping (e.g. max norm 1.0)"]
        if top >= cfg.attention_logit_level:
            critical = top >= cfg.attention_logit_critical
            alerts.append(Alert(
                rule="stability/attention_logit_level", severity="critical" if critical else "warning",
                message=(f"max attention logit {top:.4g} in {worst!r} is above "
                         f"{_fmt(cfg.attention_logit_critical if critical else cfg.attention_logit_level)}"
                         + (" (runs past ~1e4 diverged in Wortsman et al. 2023)" if critical else "")),
                evidence={"max_logit": top, "module": worst, "threshold": cfg.attention_logit_level,
                          "critical_threshold": cfg.attention_logit_critical, "trend": trend,
                          "per_module": {m: v for m, v in zip(self.names, per_max) if not math.isnan(v)}},
                remedies=remedies))
        if len(self.history) >= cfg.growth_window:
            past = self.history[-cfg.growth_window][1]
            if top >= cfg.growth_min_logit and past > 0 and top / past >= cfg.attention_growth:
                alerts.append(Alert(
                    rule="stability/attention_logit_growth", severity="warning",
                    message=(f"max attention logit grew {top / past:.3g}x (from {past:.4g} to {top:.4g}) over the "
                             f"last {cfg.growth_window} logging events"),
                    evidence={"max_logit": top, "earlier": past, "growth": top / past,
                              "threshold": cfg.attention_growth, "window": cfg.growth_window,
                              "min_logit": cfg.growth_min_logit, "module": worst, "trend": trend},
                    remedies=remedies))
        if cfg.entropy_floor > 0:
            low = {m: v for m, v in zip(self.names, per_ent) if not math.isnan(v) and v < cfg.entropy_floor}
            if low:
                which = min(low, key=low.get)
                alerts.append(Alert(
                    rule="stability/attention_entropy_collapse", severity="warning",
                    message=f"attention entropy collapsed to {low[which]:.3g} nats in {which!r} "
                            f"(floor {_fmt(cfg.entropy_floor)})",
                    evidence={"entropy_min": low[which], "module": which, "threshold": cfg.entropy_floor,
                              "modules_below": low, "max_logit": top},
                    remedies=["qk-layernorm", "sigma-reparametrisation of the attention weights (Zhai et al. 2023)",
                              _lower_lr(self.settings), "a longer learning-rate warm-up"]))
        self.history = (self.history + [(self.step, top)])[-(cfg.growth_window + 1):]
        return alerts

    def failed_result(self) -> Results:
        return self._nan_result(["stability/attention/max_logit"]
                                + [f"stability/attention/max_logit/{n}" for n in self.names])

    def charts(self) -> list[Chart]:
        return [ChartGroup("stability/attention", "max attention logit",
                           ("stability/attention/max_logit",
                            *(f"stability/attention/max_logit/{n}" for n in self.names))),
                ChartGroup("stability/attention", "attention entropy (min over heads)",
                           tuple(f"stability/attention/entropy_min/{n}" for n in self.names))]

    def carried_state(self) -> dict[str, Any]:
        return {"history": [list(h) for h in self.history]}

    def load_carried_state(self, state: Mapping[str, Any]) -> None:
        self.history = [(None if s is None else int(s), float(v)) for s, v in state.get("history", [])]
