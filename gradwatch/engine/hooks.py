"""Forward-activation capture owned by the engine: armed on due steps only, removed after.

For each :class:`gradwatch.metrics.base.ActivationSite` the engine registers a forward pre-hook and a
forward hook (removable handles) and, while any site wants attention inputs, wraps
``torch.nn.functional.scaled_dot_product_attention`` so that a call made inside a site's forward is
reported to that site with the exact tensors the kernel receives (after rotary embeddings, qk-norms and
grouped-query key sharing), then runs the real kernel unchanged. The wrapper is attributed to the
innermost site whose forward is running.

Once per micro-batch: a forward run again by gradient checkpointing happens inside the autograd engine's
backward (``torch._C._current_graph_task_id() != -1``); such re-runs are not reported.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from gradwatch.metrics.base import ActivationSite


def _in_backward() -> bool:
    current = getattr(torch._C, "_current_graph_task_id", None)
    return current is not None and current() != -1


class ActivationCapture:
    """Arms the sites of the due diagnostics for one step and disarms them.

    Attributes:
        calls: forward reports per site name (for tests and the overhead story).
    """

    def __init__(self, on_error: Callable[[Any, Exception], None],
                 on_spent: Callable[[float], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self._on_error = on_error  # (owner, exception): a failing reduction never breaks the user's forward
        self._on_spent = on_spent  # seconds spent in reductions, inside the user's forward: gradwatch's time
        self._clock = clock
        self._owner: dict[int, Any] = {}
        self._handles: list[Any] = []
        self._stack: list[ActivationSite] = []
        self._original_sdpa: Any = None
        self.calls: dict[str, int] = {}
        self.armed = False

    def arm(self, sites: Sequence[tuple[Any, ActivationSite]]) -> None:
        """Hook ``sites``, each given with its owner (what ``on_error`` is told when its reduction raises)."""
        if self.armed:
            self.disarm()
        if not sites:
            return
        self.armed = True
        self._owner = {id(site): owner for owner, site in sites}
        for _, site in sites:
            self._handles.append(site.module.register_forward_pre_hook(self._enter(site)))
            self._handles.append(site.module.register_forward_hook(self._leave(site), with_kwargs=True,
                                                                   always_call=True))
        if any(s.on_attention is not None for _, s in sites):
            self._wrap_sdpa()

    def disarm(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._stack.clear()
        if self._original_sdpa is not None:
            _SDPA.detach(self)
            self._original_sdpa = None
        self.armed = False

    # ---- hooks ------------------------------------------------------------------------------

    # each hook's whole time, from entering it to leaving it, is reported to ``on_spent`` (gradwatch's time)

    def _spent(self, t0: float) -> None:
        if self._on_spent is not None:
            self._on_spent(self._clock() - t0)

    def _enter(self, site: ActivationSite) -> Any:
        def pre_hook(module: Any, args: Any) -> None:
            t0 = self._clock()
            if not _in_backward():
                self._stack.append(site)
            self._spent(t0)

        return pre_hook

    def _leave(self, site: ActivationSite) -> Any:
        def hook(module: Any, args: Any, kwargs: Any, output: Any) -> None:
            t0 = self._clock()
            try:
                if _in_backward():
                    return
                if self._stack and self._stack[-1] is site:
                    self._stack.pop()
                if output is None:  # always_call after an exception in the forward
                    return
                self.calls[site.name] = self.calls.get(site.name, 0) + 1
                if site.on_forward is not None:
                    self._call(site, site.on_forward, module, args, kwargs, output)
            finally:
                self._spent(t0)

        return hook

    def _call(self, site: ActivationSite, fn: Callable[..., None], *args: Any) -> None:
        try:
            with torch.no_grad():
                fn(*args)
        except Exception as exc:  # reported to the engine (warn once, or raise when strict)
            self._on_error(self._owner.get(id(site)), exc)

    def _wrap_sdpa(self) -> None:
        _SDPA.attach(self)
        self._original_sdpa = _SDPA  # marks that disarm must detach

    def _report_attention(self, query: Any, key: Any, attn_mask: Any, is_causal: bool, scale: Any,
                          enable_gqa: bool) -> None:
        t0 = self._clock()
        site = self._stack[-1] if self._stack else None
        if site is not None and site.on_attention is not None and not _in_backward():
            self._call(site, site.on_attention, query.detach(), key.detach(), attn_mask, is_causal, scale, enable_gqa)
        self._spent(t0)


class _SharedSDPAWrapper:
    """One wrapper of ``F.scaled_dot_product_attention`` for every armed capture (two watchers in one process
    arm and disarm in any order): installed when the first capture attaches, removed when the last detaches,
    and only if nobody wrapped the function over it meanwhile (then it stays as a pass-through)."""

    def __init__(self) -> None:
        self.captures: list[ActivationCapture] = []
        self.original: Any = None
        self.wrapper: Any = None

    def attach(self, capture: ActivationCapture) -> None:
        if not self.captures:
            self.original = original = F.scaled_dot_product_attention
            shared = self

            def scaled_dot_product_attention(query: Any, key: Any, value: Any, attn_mask: Any = None,
                                             dropout_p: float = 0.0, is_causal: bool = False, scale: Any = None,
                                             **kwargs: Any) -> Any:
                for c in list(shared.captures):
                    c._report_attention(query, key, attn_mask, is_causal, scale, bool(kwargs.get("enable_gqa", False)))
                return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                scale=scale, **kwargs)

            self.wrapper = scaled_dot_product_attention
            F.scaled_dot_product_attention = scaled_dot_product_attention
        if capture not in self.captures:
            self.captures.append(capture)

    def detach(self, capture: ActivationCapture) -> None:
        if capture in self.captures:
            self.captures.remove(capture)
        if not self.captures and self.wrapper is not None:
            if F.scaled_dot_product_attention is self.wrapper:
                F.scaled_dot_product_attention = self.original
            self.wrapper = self.original = None


_SDPA = _SharedSDPAWrapper()


# ---- micro-batch gradient norms -----------------------------------------------------------------


def batch_examples(batch: Any) -> int | None:
    """Examples in a host batch: the leading size of its first tensor (a tensor, or the first found in a
    mapping's values or a sequence, depth first); None when it holds no tensor with a leading dimension."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else None
    if isinstance(batch, dict):
        items: Any = batch.values()
    elif isinstance(batch, (list, tuple)):
        items = batch
    else:
        items = getattr(batch, "values", lambda: ())()  # BatchEncoding and other mapping-likes
    for item in items:
        found = batch_examples(item)
        if found is not None:
            return found
    return None


class MicroBatchGradients:
    """Squared norms of each micro-batch's gradient contribution, taken inside the user's backward.

    Armed on due steps only, on the watched parameters: ``param.register_hook`` sees, for each backward, the
    gradient ``h_k`` that is about to be added to ``param.grad`` (before DDP reduces it: the hook runs before
    the ``AccumulateGrad`` node that DDP's reducer follows) while ``param.grad`` still holds the sum of the
    earlier micro-batches. Per rank, over the step's ``n`` micro-batches, it keeps (on the device, no sync):

    - ``small = sum_k |h_k|^2`` (all watched parameters), and
    - ``total = |h_1 + ... + h_n|^2``, the squared norm of the rank's accumulated gradient before any
      reduction, from ``|param.grad + h_k|^2`` at the last micro-batch.

    Both are in the backward's units (loss scale, accumulation factor), which B_simple does not depend on.
    The host reports each micro-batch's examples (:meth:`micro_batch`). Nothing is written: the hook returns
    None, so the gradient is unchanged.
    """

    def __init__(self, on_spent: Callable[[float], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self._on_spent = on_spent  # seconds spent in the hooks, inside the user's backward: gradwatch's time
        self._clock = clock
        self._handles: list[Any] = []
        self._small: torch.Tensor | None = None
        self._total: dict[int, torch.Tensor] = {}
        self.examples: list[int] = []
        self.armed = False

    def arm(self, params: Sequence[torch.nn.Parameter]) -> None:
        self.disarm()
        self.armed = True
        seen: set[int] = set()
        for p in params:
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            self._handles.append(p.register_hook(self._hook(p)))

    def disarm(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.armed = False

    def clear(self) -> None:
        self._small, self._total, self.examples = None, {}, []

    def micro_batch(self, examples: int | None) -> None:
        if self.armed:
            self.examples.append(-1 if examples is None else int(examples))

    def _hook(self, p: torch.nn.Parameter) -> Any:
        def hook(grad: torch.Tensor) -> None:
            t0 = self._clock()
            with torch.no_grad():  # float32 norms (a cast only for half precision), squared in float64
                g = grad.detach()
                sq = torch.linalg.vector_norm(g, dtype=torch.float32).double().square()
                self._small = sq if self._small is None else self._small + sq.to(self._small.device)
                prev = p.grad
                self._total[id(p)] = sq if prev is None else torch.linalg.vector_norm(
                    prev.detach() + g, dtype=torch.float32).double().square()
            if self._on_spent is not None:
                self._on_spent(self._clock() - t0)

        return hook

    def sums(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(small, total) of this step on this rank, or None when no backward reached a watched parameter."""
        if self._small is None:
            return None
        dev = self._small.device
        return self._small, torch.stack([t.to(dev) for t in self._total.values()]).sum()
