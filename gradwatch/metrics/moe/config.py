"""The options of the MoE routing-health family (``WatchConfig(moe=...)``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from gradwatch.cadence import Cadence, as_cadence
from gradwatch.checks import check_bool, check_choice, check_float, check_int, fail


@dataclass(frozen=True)
class MoEConfig:
    """Mixture-of-experts routing health (family ``moe``; off by default).

    Attributes:
        every: cadence at which the routers' forwards are read (every micro-batch of a due step) and logged.
        routers: glob patterns over module names (``named_modules()``) of the routers to watch; empty (the
            default): every module found by the convention of :mod:`gradwatch.metrics.moe.routers`.
        top_k: experts per token for a router that returns logits only and names no ``top_k`` (its own or its
            parent's ``top_k`` / ``num_experts_per_tok`` attribute); None: such a router's load is not logged.
        per_expert: log each expert's share of the load (``moe/<router>/load/<e>``); off for many experts.
        precision: dtype of the per-token softmax, entropy and logsumexp (sums are float64).
        cv_limit: a router whose load CV is above this (1.0: fewer than half of the experts carry the load
            effectively, see :mod:`gradwatch.functional.moe`) counts as collapsing.
        entropy_floor: a router whose load entropy is below this fraction of ln(num_experts) counts as
            collapsing (0 turns this criterion off).
        sustain: consecutive logging events a router must count as collapsing to raise the alert.
        min_assignments: the rule judges an interval only when the router made at least this many
            assignments per expert on average in it (fewer: the load is mostly sampling noise).
    """

    every: int | Cadence = 10
    routers: tuple[str, ...] = ()
    top_k: int | None = None
    per_expert: bool = True
    precision: Literal["float32", "float64"] = "float32"
    cv_limit: float = 1.0
    entropy_floor: float = 0.5
    sustain: int = 3
    min_assignments: float = 10.0

    def __post_init__(self) -> None:
        name = "MoEConfig"
        object.__setattr__(self, "every", as_cadence(f"{name}.every", self.every))
        routers = (self.routers,) if isinstance(self.routers, str) else self.routers
        if not isinstance(routers, (tuple, list)) or not all(isinstance(p, str) and p for p in routers):
            raise fail(f"{name}.routers", self.routers, "a list of non-empty glob patterns over module names (str)")
        object.__setattr__(self, "routers", tuple(routers))
        if self.top_k is not None:
            check_int(f"{name}.top_k", self.top_k, minimum=1)
        check_bool(f"{name}.per_expert", self.per_expert)
        check_choice(f"{name}.precision", self.precision, ("float32", "float64"))
        object.__setattr__(self, "cv_limit", check_float(f"{name}.cv_limit", self.cv_limit, low=0.0, high=1e6))
        object.__setattr__(self, "entropy_floor", check_float(f"{name}.entropy_floor", self.entropy_floor, low=0.0,
                                                              high=1.0, open_low=False))
        check_int(f"{name}.sustain", self.sustain, minimum=1)
        object.__setattr__(self, "min_assignments", check_float(f"{name}.min_assignments", self.min_assignments,
                                                                low=0.0, high=1e12, open_low=False))


__all__ = ["MoEConfig"]
