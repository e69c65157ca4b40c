"""Test helpers for the stability family: arm ActivationSites the way the engine does, and capture what
``scaled_dot_product_attention`` receives for an independent float64 reference.

``armed(sites)``: a forward hook (with kwargs) per site calling ``on_forward(module, args, kwargs, output)``,
and, while a site's forward runs, a wrapper of ``torch.nn.functional.scaled_dot_product_attention`` calling
``on_attention(query, key, attn_mask, is_causal, scale, enable_gqa)`` before the real kernel.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


def sdpa_arguments(args: tuple, kwargs: dict) -> dict[str, Any]:
    bound = dict(_SDPA_DEFAULTS)
    bound.update(zip(_SDPA_PARAMS, args))
    bound.update(kwargs)
    return bound


@contextlib.contextmanager
def armed(sites: Sequence[Any]) -> Iterator[None]:
    active: list[Any] = []
    inner = F.scaled_dot_product_attention

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        a = sdpa_arguments(args, kwargs)
        for site in list(active):
            if site.on_attention is not None:
                site.on_attention(a["query"], a["key"], a["attn_mask"], a["is_causal"], a["scale"], a["enable_gqa"])
        return inner(*args, **kwargs)

    handles = []
    for site in sites:
        def pre(module: Any, args: tuple, kwargs: dict, _site: Any = site) -> None:
            active.append(_site)

        def post(module: Any, args: tuple, kwargs: dict, output: Any, _site: Any = site) -> None:
            active.remove(_site)
            if _site.on_forward is not None:
                _site.on_forward(module, args, kwargs, output)

        handles.append(site.module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(site.module.register_forward_hook(post, with_kwargs=True))
    F.scaled_dot_product_attention = wrapper
    try:
        yield
    finally:
        F.scaled_dot_product_attention = inner
        for h in handles:
            h.remove()


@contextlib.contextmanager
def captured_sdpa(calls: list[dict[str, Any]]) -> Iterator[None]:
    """Record (detached clones of) every SDPA call's query, key, mask, is_causal, scale, enable_gqa."""
    inner = F.scaled_dot_product_attention

    def capture(*args: Any, **kwargs: Any) -> Any:
        a = sdpa_arguments(args, kwargs)
        calls.append({k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in a.items()
                      if k != "value"})
        return inner(*args, **kwargs)

    F.scaled_dot_product_attention = capture
    try:
        yield
    finally:
        F.scaled_dot_product_attention = inner


def reference_statistics(call: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense float64 (max logit, entropy) per query head of one SDPA call, written from torch's documented
    math: S = Q K^T * scale (keys repeated for grouped heads), mask: bool True = keep, float = added and its
    finfo.min / -inf entries masked, causal = lower-triangular; A = softmax(S + M); entropy averaged over
    the (batch, query) rows that attend anything."""
    q = call["query"].to(torch.float64)
    k = call["key"].to(torch.float64)
    if k.shape[-3] != q.shape[-3]:
        k = torch.repeat_interleave(k, q.shape[-3] // k.shape[-3], dim=-3)
    scale = call["scale"] if call["scale"] is not None else 1 / math.sqrt(q.shape[-1])
    s = torch.einsum("...hld,...hsd->...hls", q, k) * scale
    L, S = s.shape[-2:]
    keep = torch.ones_like(s, dtype=torch.bool)
    add = torch.zeros_like(s)
    m = call["attn_mask"]
    if m is not None:
        if m.dtype == torch.bool:
            keep = keep & m
        else:
            lowest = torch.finfo(m.dtype).min
            keep = keep & (m > lowest) & torch.isfinite(m)
            add = add + m.to(torch.float64)
    if call["is_causal"]:
        keep = keep & torch.ones(L, S, dtype=torch.bool).tril()
    max_logit = torch.where(keep, s, torch.tensor(-math.inf, dtype=torch.float64))
    heads = q.shape[-3]
    max_logit = (max_logit.transpose(0, -3) if q.dim() > 3 else max_logit).reshape(heads, -1).amax(-1)
    logits = torch.where(keep, s + add, torch.tensor(-math.inf, dtype=torch.float64))
    attends = keep.any(-1)
    probs = torch.softmax(torch.where(attends[..., None], logits, torch.zeros_like(logits)), dim=-1)
    plogp = torch.where(probs > 0, probs * torch.log(probs), torch.zeros_like(probs))
    row_h = -plogp.sum(-1)
    row_h = torch.where(attends, row_h, torch.zeros_like(row_h))
    dims = tuple(d for d in range(row_h.dim()) if d != row_h.dim() - 2)
    entropy = row_h.sum(dims) / attends.to(torch.float64).sum(dims)
    return max_logit, entropy

