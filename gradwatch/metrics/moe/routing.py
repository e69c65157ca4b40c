"""The MoE routing-health diagnostic: every watched router's forwards on a due step, reduced in the hook."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gradwatch.cadence import Cadence
from gradwatch.functional.moe import SUM_FIELDS, RouterStatistics, load_statistics, router_statistics
from gradwatch.metrics.base import ActivationSite, Chart, ChartGroup, Diagnostic, Results, StepContext
from gradwatch.metrics.moe.alerts import CollapseRule
from gradwatch.metrics.moe.config import MoEConfig
from gradwatch.metrics.moe.routers import Router, read_router_output

_COL = {name: i for i, name in enumerate(SUM_FIELDS)}
#: Per-router tags, ``moe/<router>/<stat>`` (``load/<e>`` with ``per_expert``, ``dropped`` where reported).
ROUTER_STATS: tuple[str, ...] = ("load_cv", "load_max", "load_entropy", "entropy", "z_loss", "log_z")


class MoERouting(Diagnostic):
    """Expert load, its balance, router entropy, router log Z and dropped assignments per router.

    Interval state: per router, the kept assignments per expert (``counts``, (R, E_max), E_max the most
    experts of any router) and the sums of :data:`gradwatch.functional.moe.SUM_FIELDS` (``sums``, (R, 6)),
    over every micro-batch forward of the interval's due steps and every rank. Carried state: which routers
    reported their assignments (``dropped`` is logged for those) and the collapse rule's streaks.
    ``update(counts, sums)`` takes one observation's (R, E_max) and (R, 6) tensors.
    """

    stem = "moe"
    needs = frozenset({"activations"})
    runs_on = "all_ranks"  # every rank routes its own batch: the sums are all-reduced
    phase = "gradients_ready"

    def __init__(self, routers: Sequence[Router], config: MoEConfig | None = None,
                 settings: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.config = config if config is not None else MoEConfig()
        self.routers = tuple(routers)
        self.settings = dict(settings or {})
        n, e_max = len(self.routers), max((r.num_experts for r in self.routers), default=1)
        self.add_state("counts", torch.zeros(n, e_max, dtype=torch.float64), dist_reduce_fx="sum", persistent=True)
        self.add_state("sums", torch.zeros(n, len(SUM_FIELDS), dtype=torch.float64), dist_reduce_fx="sum",
                       persistent=True)
        self.reports = [False] * n  # carried: the router returned its assignments at least once
        self.rule = CollapseRule([r.name for r in self.routers], self.config)
        self.step: int | None = None
        self._precision = torch.float64 if self.config.precision == "float64" else torch.float32  # not _dtype: torchmetrics owns that name
        self._pending: dict[int, RouterStatistics] = {}
        self._said: set[str] = set()
        self._to_say: list[tuple[str, str]] = []

    def observe_cadence(self) -> Cadence:
        return self.config.every  # type: ignore[return-value]

    # hooks ---------------------------------------------------------------------------------------

    def _say_later(self, key: str, message: str) -> None:
        if key not in self._said:
            self._said.add(key)
            self._to_say.append((key, message))

    def _on_forward(self, i: int):
        router = self.routers[i]

        def on_forward(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            out = read_router_output(output, router.num_experts)
            if out is None:
                self._say_later(f"unreadable/{router.name}",
                                f"gradwatch: moe: router {router.name!r} ({type(module).__name__}) returned no logits "
                                f"[..., {router.num_experts}]; it is not measured")
                return
            if out.indices is None and out.dispatch_mask is None and router.top_k is None:
                self._say_later(f"top_k/{router.name}",
                                f"gradwatch: moe: router {router.name!r} returns logits only and names no top_k: "
                                "its load is not logged (set MoEConfig(top_k=...))")
            if out.indices is not None or out.dispatch_mask is not None:
                self.reports[i] = True
            stats = router_statistics(out.logits, indices=out.indices, dispatch_mask=out.dispatch_mask,
                                      top_k=router.top_k, dtype=self._precision)
            prev = self._pending.get(i)
            self._pending[i] = stats if prev is None else prev + stats
        return on_forward

    def activation_sites(self, model: nn.Module) -> list[ActivationSite]:
        return [ActivationSite(name=r.name, module=model.get_submodule(r.name), on_forward=self._on_forward(i))
                for i, r in enumerate(self.routers)]

    # metric --------------------------------------------------------------------------------------

    def observe(self, ctx: StepContext) -> None:
        self.step = ctx.step
        say = getattr(ctx, "say_once", None)
        if not self.routers:
            self._say_later("no_routers", "gradwatch: moe: no router found in the model (see "
                            "gradwatch.metrics.moe.routers for the convention, or set MoEConfig(routers=[...])); "
                            "only moe/alert is logged")
        for key, message in self._to_say:
            if say is not None:
                say(f"moe/{key}", message)
            else:
                warnings.warn(message, RuntimeWarning, stacklevel=2)
        self._to_say.clear()
        pending, self._pending = self._pending, {}
        device = next(iter(pending.values())).counts.device if pending else self.counts.device
        counts = torch.zeros(self.counts.shape, dtype=torch.float64, device=device)
        sums = torch.zeros(self.sums.shape, dtype=torch.float64, device=device)
        for i, stats in pending.items():
            counts[i, :stats.counts.numel()] = stats.counts
            sums[i] = stats.sums()
        if getattr(ctx, "world_size", 1) > 1:
            both = ctx.all_reduce(torch.cat([counts, sums], dim=1), "sum")
            counts, sums = both[:, :counts.shape[1]], both[:, counts.shape[1]:]
        self.update(counts, sums)

    def update(self, counts: Tensor, sums: Tensor) -> None:  # type: ignore[override]
        self.counts = self.counts + counts.to(self.counts.device, self.counts.dtype)
        self.sums = self.sums + sums.to(self.sums.device, self.sums.dtype)

    def compute(self) -> Results:
        scalars: dict[str, Tensor] = {}
        cvs, entropies, shares = [], [], []
        for i, r in enumerate(self.routers):
            load = load_statistics(self.counts[i, :r.num_experts])
            s = self.sums[i]
            tokens = s[_COL["tokens"]]
            values = {"load_cv": load.cv, "load_max": load.max_ratio, "load_entropy": load.entropy,
                      "entropy": s[_COL["entropy_sum"]] / tokens, "z_loss": s[_COL["log_z_sq_sum"]] / tokens,
                      "log_z": s[_COL["log_z_sum"]] / tokens}
            if self.reports[i]:
                values["dropped"] = s[_COL["dropped"]] / s[_COL["slots"]]
            scalars.update({f"moe/{r.name}/{k}": v for k, v in values.items()})
            if self.config.per_expert:
                scalars.update({f"moe/{r.name}/load/{e}": load.share[e] for e in range(r.num_experts)})
            cvs.append(load.cv)
            entropies.append(load.entropy)
            shares.append(torch.nn.functional.pad(load.share, (0, self.counts.shape[1] - r.num_experts)))
        alerts = []
        if self.routers:
            n = len(self.routers)
            host = torch.cat([torch.stack(cvs), torch.stack(entropies), self.sums[:, _COL["slots"]],
                              torch.stack(shares).reshape(-1)]).tolist()  # the one host transfer
            rows = [host[3 * n + i * self.counts.shape[1]:3 * n + (i + 1) * self.counts.shape[1]] for i in range(n)]
            alerts = self.rule.evaluate(self.step, [r.num_experts for r in self.routers], host[:n], host[n:2 * n],
                                        host[2 * n:3 * n], rows, self.settings)
        scalars["moe/alert"] = torch.tensor(float(bool(alerts)), dtype=torch.float64, device=self.sums.device)
        return Results(scalars=scalars, alerts=tuple(alerts))

    def failed_result(self) -> Results:
        nan = torch.tensor(math.nan, dtype=torch.float64)
        scalars = {f"moe/{r.name}/{k}": nan for r in self.routers for k in ROUTER_STATS}
        scalars["moe/alert"] = torch.zeros((), dtype=torch.float64)
        return Results(scalars=scalars)

    def charts(self) -> list[Chart]:
        names = [r.name for r in self.routers]
        out: list[Chart] = [
            ChartGroup("moe", "expert load CV", tuple(f"moe/{n}/load_cv" for n in names)),
            ChartGroup("moe", "expert load entropy (nats; ln E when balanced)",
                       tuple(f"moe/{n}/load_entropy" for n in names)),
            ChartGroup("moe", "router entropy (nats, mean over tokens)", tuple(f"moe/{n}/entropy" for n in names)),
            ChartGroup("moe", "router z-loss (mean logsumexp^2)", tuple(f"moe/{n}/z_loss" for n in names)),
            ChartGroup("moe", "dropped assignments", tuple(f"moe/{n}/dropped" for n in names))]
        if self.config.per_expert:
            out += [ChartGroup("moe/load", f"expert load: {r.name}",
                               tuple(f"moe/{r.name}/load/{e}" for e in range(r.num_experts))) for r in self.routers]
        return out

    def carried_state(self) -> dict[str, Any]:
        return {"reports": list(self.reports), "rule": self.rule.state_dict()}

    def load_carried_state(self, state: Mapping[str, Any]) -> None:
        if "reports" in state:
            self.reports = [bool(x) for x in state["reports"]]
        self.rule.load_state_dict(state.get("rule", {}))


__all__ = ["ROUTER_STATS", "MoERouting"]
