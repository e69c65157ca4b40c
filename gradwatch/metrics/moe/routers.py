"""How gradwatch recognises a router and reads what its forward returns.

A *router* is a module whose forward returns the router logits of the tokens it routes, ``[..., E]``
(leading dims are tokens), alone or in a tuple with what it decided:

- ``logits``: a plain gate (an ``nn.Linear(hidden, E)``); the assignments are taken as the top ``k``
  logits of each token (``k`` from the module's or its parent's ``top_k`` / ``num_experts_per_tok``
  attribute, else ``MoEConfig.top_k``);
- ``(logits, ..., indices, ...)``: logits first, then the chosen expert indices ``[..., k]`` as an integer
  tensor (Hugging Face 5.x ``*TopKRouter``: ``(router_logits, router_scores, router_indices)``; the
  hand-written top-k router of the tests); an index outside ``[0, E)`` is a dropped assignment;
- ``(dispatch_mask, ..., logits)``: an integer 0/1 mask ``[..., E]`` of the kept assignments first, logits
  last (Switch Transformers' ``*Top1Router``: a token over its expert's capacity has an all-zero row);
- a mapping or output object with ``router_logits`` / ``logits`` and optionally ``indices`` /
  ``expert_indices`` / ``router_indices``.

Which modules: with ``MoEConfig.routers`` empty, every module whose class name ends in ``Router`` or whose
own name (the last part of its ``named_modules()`` name) is ``gate`` or ``router``, with a known number of
experts (at least 2); of nested candidates only the outermost is kept (a router holding a ``gate`` Linear). With
patterns, exactly the modules whose names match one of them. The number of experts E is the module's
``num_experts`` / ``num_local_experts`` / ``n_routed_experts`` / ``n_experts`` attribute, else a Linear's
``out_features``, else the first dim of a 2-d ``weight``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

_EXPERTS_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts", "n_experts")
_TOP_K_ATTRS = ("top_k", "num_experts_per_tok", "k")
_ROUTER_NAMES = ("gate", "router")
_INDEX_KEYS = ("indices", "expert_indices", "router_indices", "expert_index")
_LOGIT_KEYS = ("router_logits", "logits")


@dataclass(frozen=True)
class Router:
    """A router found in the model.

    Attributes:
        name: its name in ``named_modules()`` (the ``<router>`` of the tags).
        num_experts: E.
        top_k: experts per token when the router returns logits only (None: unknown).
    """

    name: str
    num_experts: int
    top_k: int | None


@dataclass
class RouterOutput:
    """What one forward of a router returned: logits [..., E] and the assignments, if it reported them."""

    logits: Tensor
    indices: Tensor | None = None
    dispatch_mask: Tensor | None = None


def _int_attr(module: Any, names: Sequence[str]) -> int | None:
    for n in names:
        v = getattr(module, n, None)
        if isinstance(v, int) and not isinstance(v, bool) and v >= 1:
            return v
    return None


def num_experts_of(module: nn.Module) -> int | None:
    e = _int_attr(module, _EXPERTS_ATTRS)
    if e is not None:
        return e
    if isinstance(module, nn.Linear):
        return module.out_features
    w = getattr(module, "weight", None)
    if isinstance(w, Tensor) and w.dim() == 2:
        return int(w.shape[0])
    return None


def _is_candidate(name: str, module: nn.Module) -> bool:
    return type(module).__name__.endswith("Router") or name.rsplit(".", 1)[-1] in _ROUTER_NAMES


def find_routers(model: nn.Module, patterns: Sequence[str] = (), top_k: int | None = None) -> list[Router]:
    """The routers of ``model`` (see the module docstring); ``top_k`` is the fallback for routers that
    name none. A module matched by a pattern but of unknown E raises ValueError (the user asked for it)."""
    modules = dict(model.named_modules())
    if patterns:
        names = [n for n in modules if n and any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    else:
        names = [n for n, m in modules.items() if n and _is_candidate(n, m) and (num_experts_of(m) or 0) >= 2]
        names = [n for n in names if not any(o != n and n.startswith(o + ".") for o in names)]
    out = []
    for n in names:
        m = modules[n]
        e = num_experts_of(m)
        if e is None:
            raise ValueError(f"gradwatch: moe: module {n!r} ({type(m).__name__}) matches MoEConfig.routers but "
                             f"its number of experts is unknown: give it one of the attributes {list(_EXPERTS_ATTRS)}")
        parent = modules.get(n.rsplit(".", 1)[0] if "." in n else "")
        k = _int_attr(m, _TOP_K_ATTRS) or (_int_attr(parent, _TOP_K_ATTRS) if parent is not None else None) or top_k
        out.append(Router(n, e, k))
    return out


def _is_index(t: Any) -> bool:
    return isinstance(t, Tensor) and not t.is_floating_point() and not t.is_complex()


def read_router_output(output: Any, num_experts: int) -> RouterOutput | None:
    """The logits and assignments in a router's ``output`` (None: no logits ``[..., num_experts]`` in it)."""

    def logits_like(t: Any) -> bool:
        return isinstance(t, Tensor) and t.is_floating_point() and t.dim() >= 1 and t.shape[-1] == num_experts

    if logits_like(output):
        return RouterOutput(output)
    if isinstance(output, Mapping) or (not isinstance(output, (tuple, list)) and hasattr(output, "__dict__")):
        get = output.get if isinstance(output, Mapping) else (lambda k: getattr(output, k, None))
        logits = next((get(k) for k in _LOGIT_KEYS if logits_like(get(k))), None)
        if logits is None:
            return None
        indices = next((get(k) for k in _INDEX_KEYS if _is_index(get(k))), None)
        return RouterOutput(logits, indices=indices)
    if not isinstance(output, (tuple, list)) or not output:
        return None
    items = list(output)
    if _is_index(items[0]) and items[0].dim() >= 1 and items[0].shape[-1] == num_experts:  # Switch: mask first
        logits = next((t for t in reversed(items[1:]) if logits_like(t)), None)
        return None if logits is None else RouterOutput(logits, dispatch_mask=items[0])
    first = next((i for i, t in enumerate(items) if logits_like(t)), None)
    if first is None:
        return None
    logits = items[first]
    tokens = logits.numel() // num_experts
    indices = next((t for t in items[first + 1:] if _is_index(t) and t.dim() >= 1
                    and t.numel() % max(tokens, 1) == 0 and t.numel() // max(tokens, 1) >= 1), None)
    return RouterOutput(logits, indices=indices)


__all__ = ["Router", "RouterOutput", "find_routers", "num_experts_of", "read_router_output"]
