"""The alert rule of the MoE family: ``moe/routing_collapse``.

A router *counts as collapsing* at a logging event when its interval holds at least ``min_assignments``
assignments per expert on average (made, whether kept or dropped) and

- its load CV is above ``cv_limit`` (default 1.0). CV^2 + 1 = E / N_eff, where N_eff = 1 / sum_e f_e^2 is
  the effective number of experts, so CV > 1 says that fewer than half of the experts carry the load
  (top-k routing of every token onto the same k experts has CV = sqrt(E/k - 1): 1.73 for 2 of 8); or
- the entropy of its load is below ``entropy_floor`` (default 0.5) times ln E, the entropy of a balanced
  load: the criterion that still works for few experts, where CV is bounded by sqrt(E - 1) (1 for E = 2).

The alert (a warning) fires when a router has counted as collapsing at ``sustain`` (default 3) logging
events in a row: one interval's load can be skewed by its batches (one domain, one language), while routing
collapse (a few experts winning every token, the others starved of gradient: Shazeer et al. 2017; Fedus et
al. 2022; Zoph et al. 2022) persists. Below ``min_assignments`` (default 10) per expert the shares are
mostly sampling noise (a multinomial count with mean m has CV ~ sqrt(1/m): ~0.3 at m = 10 for a perfectly
balanced router), so such intervals are not judged and do not break a streak.

One alert per logging event at most: it names the router of the highest CV among those that held; its
evidence lists every one (``routers``), with the top experts' shares, the dead experts (share 0) and the
trend of (step, CV, load entropy) over the streak. The thresholds are reasoned from the identities above,
not calibrated on production runs; ``cv_limit`` / ``entropy_floor`` / ``sustain`` tune them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from gradwatch.metrics.base import Alert
from gradwatch.metrics.moe.config import MoEConfig

RULE = "moe/routing_collapse"


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def remedies(settings: Mapping[str, Any]) -> list[str]:
    """What usually helps, quoting the model's own settings (a Hugging Face config's
    ``output_router_logits`` / ``router_aux_loss_coef``) where they are known."""
    coef = settings.get("router_aux_loss_coef")
    if settings.get("output_router_logits") is False:
        first = ("switch the load-balancing loss on: the model's config has output_router_logits=False, so its "
                 f"router_aux_loss_coef ({_fmt(coef) if coef is not None else 'unset'}) is not applied; set "
                 "output_router_logits=True (Switch Transformers' auxiliary loss, Fedus et al. 2022)")
    elif coef is not None:
        first = f"raise router_aux_loss_coef from {_fmt(coef)} (e.g. to {_fmt(coef * 10)})"
    else:
        first = ("add a load-balancing auxiliary loss E * sum_e f_e P_e (Switch Transformers, Fedus et al. 2022), "
                 "coefficient ~1e-2")
    return [first,
            "a router z-loss 1e-3 * mean(logsumexp(router logits)^2) (ST-MoE, Zoph et al. 2022) when moe/<router>/z_loss "
            "grows",
            "a lower learning rate for the router, and the router's softmax in float32",
            "bias-based balancing (DeepSeek-V3's auxiliary-loss-free balancing) or expert capacity with token dropping"]


class CollapseRule:
    """Per-router streaks of collapsing intervals and their recent trend (carried state)."""

    def __init__(self, names: Sequence[str], config: MoEConfig) -> None:
        self.names = tuple(names)
        self.config = config
        self.streak = [0] * len(self.names)
        self.trend: list[list[list[float | int | None]]] = [[] for _ in self.names]
        self._before: tuple[int | None, list[int], list[Any]] | None = None  # state before the last event

    def _begin(self, step: int | None) -> None:
        """A second evaluation at the same step (compute called twice) starts from the same state."""
        if self._before is not None and step is not None and self._before[0] == step:
            self.streak, self.trend = list(self._before[1]), [list(t) for t in self._before[2]]
        else:
            self._before = (step, list(self.streak), [list(t) for t in self.trend])

    def evaluate(self, step: int | None, num_experts: Sequence[int], cv: Sequence[float],
                 load_entropy: Sequence[float], assignments: Sequence[float],
                 shares: Sequence[Sequence[float]], settings: Mapping[str, Any]) -> list[Alert]:
        """Host values of one logging event per router (``assignments``: made in the interval, kept or
        dropped); the alerts it raises (one at most, naming the worst router)."""
        cfg = self.config
        self._begin(step)
        held: dict[str, dict[str, Any]] = {}
        for i, name in enumerate(self.names):
            e = num_experts[i]
            if math.isnan(cv[i]) or assignments[i] < cfg.min_assignments * e:
                continue  # not judged: the streak neither grows nor breaks
            floor = cfg.entropy_floor * math.log(e)
            collapsing = cv[i] > cfg.cv_limit or (cfg.entropy_floor > 0 and load_entropy[i] < floor)
            self.streak[i] = self.streak[i] + 1 if collapsing else 0
            self.trend[i] = (self.trend[i] + [[step, cv[i], load_entropy[i]]])[-cfg.sustain:]
            if self.streak[i] >= cfg.sustain:
                ranked = sorted(range(e), key=lambda j: -shares[i][j])
                held[name] = {"load_cv": cv[i], "load_entropy": load_entropy[i], "max_entropy": math.log(e),
                              "entropy_floor": floor, "num_experts": e, "assignments": assignments[i],
                              "streak": self.streak[i], "top_experts": {str(j): shares[i][j] for j in ranked[:3] if shares[i][j] > 0},
                              "dead_experts": [j for j in range(e) if shares[i][j] == 0], "trend": self.trend[i]}
        if not held:
            return []
        worst = max(held, key=lambda n: held[n]["load_cv"])
        w = held[worst]
        top = sum(w["top_experts"].values())
        message = (f"routing of {worst!r} is collapsing: load CV {w['load_cv']:.3g} (limit {_fmt(cfg.cv_limit)}), "
                   f"load entropy {w['load_entropy']:.3g} of ln {w['num_experts']} = {w['max_entropy']:.3g} nats, for "
                   f"{w['streak']} logging events in a row; experts {[int(j) for j in w['top_experts']]} take "
                   f"{top:.0%} of the assignments" + (f" ({len(held) - 1} more router(s) too)" if len(held) > 1 else ""))
        return [Alert(rule=RULE, severity="warning", message=message,
                      evidence={"router": worst, **w, "cv_limit": cfg.cv_limit, "sustain": cfg.sustain,
                                "routers": held},
                      remedies=remedies(settings))]

    def state_dict(self) -> dict[str, Any]:
        return {"streak": list(self.streak), "trend": [[list(t) for t in tr] for tr in self.trend]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "streak" in state:
            self.streak = [int(s) for s in state["streak"]]
            self.trend = [[list(t) for t in tr] for tr in state.get("trend", [[] for _ in self.names])]


__all__ = ["RULE", "CollapseRule", "remedies"]
