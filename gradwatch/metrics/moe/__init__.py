"""Mixture-of-experts routing health (family ``moe``): see a router collapse before the loss shows it.

Per router (a module found by the convention of :mod:`gradwatch.metrics.moe.routers`; ``<router>`` is its
name in ``named_modules()``), over every micro-batch forward of the interval's due steps and every rank
(the math and its papers: :mod:`gradwatch.functional.moe`):

=================================  ========================================================================
tag                                what
=================================  ========================================================================
``moe/<router>/load/<e>``          share of the kept token-to-expert assignments that went to expert ``e``
                                   (``e`` = 0 .. E-1; sums to 1; with ``per_expert``, the default)
``moe/<router>/load_cv``           coefficient of variation of the per-expert counts (population std over
                                   mean): 0 balanced, sqrt(E/k - 1) when every token picks the same k
``moe/<router>/load_max``          E x the largest share: 1 balanced, E/k at most
``moe/<router>/load_entropy``      entropy of the shares, -sum_e f_e ln f_e (nats; ln E balanced)
``moe/<router>/entropy``           mean over tokens of the routing softmax's entropy (nats)
``moe/<router>/z_loss``            mean over tokens of logsumexp(router logits)^2: ST-MoE's router z-loss
                                   (Zoph et al. 2022) before its coefficient
``moe/<router>/log_z``             mean over tokens of logsumexp(router logits)
``moe/<router>/dropped``           share of the assignments the router made but dropped (expert capacity);
                                   only for routers that return their assignments (indices or a mask)
``moe/alert``                      1 when ``moe/routing_collapse`` held at this logging event (said or held
                                   back by the engine's cooldown), else 0
=================================  ========================================================================

Routers with logits only (a plain ``nn.Linear`` gate) are taken to assign each token to its top-k logits.
Every token a router sees counts, padding included (a router is called on flattened hidden states).

Alert ``moe/routing_collapse`` (:mod:`gradwatch.metrics.moe.alerts`): a router whose load CV is above
``cv_limit`` (1.0) or whose load entropy is below ``entropy_floor`` (0.5) x ln E, at ``sustain`` (3)
logging events in a row, judged only with at least ``min_assignments`` (10) assignments per expert in the
interval. One alert names the worst router; the evidence lists every one that held. The remedies quote the
model's ``output_router_logits`` / ``router_aux_loss_coef`` when it is a Hugging Face model.

Observe-only: the hooks read the router's output under ``no_grad`` and change nothing; the user's training
ends with bitwise the same weights (``tests/callbacks/test_moe_hosts.py``).
"""

from __future__ import annotations

from typing import Any

from gradwatch.metrics.base import Diagnostic
from gradwatch.metrics.moe.alerts import RULE, CollapseRule
from gradwatch.metrics.moe.config import MoEConfig
from gradwatch.metrics.moe.routers import Router, find_routers, read_router_output
from gradwatch.metrics.moe.routing import ROUTER_STATS, MoERouting
from gradwatch.registry import BuildInputs, Family

_SETTINGS = ("output_router_logits", "router_aux_loss_coef", "router_z_loss_coef")


def model_settings(model: Any) -> dict[str, Any]:
    """The routing settings of the first Hugging Face config in the module tree (for the remedies)."""
    for m in model.modules() if model is not None else ():
        config = getattr(m, "config", None)
        if config is not None and any(hasattr(config, k) for k in _SETTINGS):
            return {k: getattr(config, k) for k in _SETTINGS if isinstance(getattr(config, k, None), (bool, int, float))}
    return {}


def build(config: MoEConfig, inputs: BuildInputs) -> list[Diagnostic]:
    """One :class:`MoERouting` over every router of ``inputs.model`` (on a model without routers it says so once
    and logs only ``moe/alert``)."""
    model = inputs.model
    routers = find_routers(model, config.routers, config.top_k) if model is not None else []
    return [MoERouting(routers, config, model_settings(model))]


FAMILY = Family(key="moe", stem="moe", config_class=MoEConfig, default_on=False, build=build,
                summary="mixture-of-experts routing: expert load and its CV, router entropy, router z-loss, dropped "
                        "tokens, with a routing-collapse alert",
                knobs=("per_expert", "precision", "cv_limit", "entropy_floor", "sustain", "min_assignments"))

__all__ = ["FAMILY", "ROUTER_STATS", "RULE", "CollapseRule", "MoEConfig", "MoERouting", "Router", "build",
           "find_routers", "model_settings", "read_router_output"]
