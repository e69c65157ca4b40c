"""Extra passes through FSDP2-sharded modules (``torch.distributed.fsdp.fully_shard``).

Which pass does what, and its memory per rank (P: the model's full parameter bytes; p_i: FSDP module i's):

- forward only, no grad (signals' probe losses and representations, any loss-only evaluation):
  :func:`sharded_forward`, FSDP2's own forward, module by module as training does it, every module resharded
  after its forward: at most the root module's own unsharded parameters plus the largest other module's
  (plus any forward prefetch the user set up), never P. Every forward is then a collective (one all-gather
  per module), so every rank must run the same number of forwards (``ExtraPass.collective``).
- with gradients (Hessian-vector products with ``create_graph=True``, per-example gradients, signals'
  gradient confirmation): the graph holds every unsharded parameter at once, so :func:`unsharded` unshards
  the whole model: P per rank for the pass. Refused (:class:`~gradwatch.metrics.base.PassRefused`, the
  family switched off, training goes on) when P exceeds ``max_unshard_gb`` (:func:`pass_scope`).

What FSDP2 does, and why a plain extra pass fails (torch 2.13, measured on 2 CPU ranks with gloo; see
``notes/fsdp2_fp16.md``):

- Between steps every module holds *sharded* ``DTensor`` parameters. A module's pre-forward hook
  all-gathers them and swaps separate, *unsharded* ``nn.Parameter`` leaves into the module, so the sharded
  parameters are not in the forward's graph: ``autograd.grad(loss, sharded_params)`` raises "appears to
  not have been used in the graph" (with ``allow_unused=True`` it silently gives ``None``), and so does a
  reparametrisation with ``torch.func.functional_call`` (the pre-forward overrides the swapped tensors).
- The default post-backward reshards and frees the unsharded storage, which the ``create_graph=True``
  graph of a Hessian-vector product still needs ("setStorage ... out of bounds for storage of size 0"),
  and reduce-scatters into the training ``.grad`` shards.
- Every all-gather is a collective: it needs every rank of the mesh, in the same order.

The recipe :func:`unsharded` applies: on every FSDP module, no reshard after forward or backward and no
gradient sync (public setters); ``unshard()`` every FSDP module (the only collective, so every rank must
enter, in the same order); then the modules hold plain unsharded parameters, which the caller must re-read
from ``model.named_parameters()`` (they are new objects) and differentiate with respect to; forward,
``autograd.grad`` and Hessian-vector products are then local. On exit, ``reshard()`` every module (local)
and put the settings back. The full model is materialised on every rank for the duration.

FSDP2 has setters but no getters for those settings, and the root's reshard-after-forward is specially
``False`` (so "set it back to True" would be wrong); the exact previous values are therefore read from and
restored to these private fields:

- ``FSDPState._auto_reshard_after_forward`` (``set_reshard_after_forward`` clears it; while true, the lazy
  init of the root turns the root's reshard-after-forward off);
- on each ``FSDPParamGroup`` of the state: ``post_forward_mesh_info`` (reshard after forward),
  ``reshard_after_backward``, ``reduce_grads`` and ``all_reduce_grads`` (gradient sync).

A forward inside the block still runs FSDP's post-forward hook, which appends to the per-iteration records
of forward order that the next backward's prefetching reads: ``FSDPCommContext.post_forward_order`` (the
state's ``_comm_ctx``) and each param group's ``_post_forward_indices``; only a backward's final callback
clears them. Left behind, they make the next training backward issue an extra all-gather on the ranks that
ran an extra forward, and a rank that ran none (an empty probe block, a confirmation pass it sat out) waits
in a different collective: a deadlock (seen on 2 gloo ranks). So both records are saved on entry and put back
exactly on exit.

If the block raises mid-forward, the modules entered are left in FSDP's "forward" state, where ``reshard()``
returns without resharding (reshard-after-forward is off inside the block): the next training forward would
then run on the stale unsharded parameters while the optimizer steps the sharded ones, and one rank would skip
the all-gathers the others make (a collective mismatch, seen on 2 gloo ranks). So after an exception the
public ``reset_iter_state()`` of each root FSDP module (torch versions that have it; 2.13 does) puts the
sharded parameters back and clears FSDP's per-iteration state first. The reductions it discards are the extra
pass's own (with gradient sync off there are none); the training ``.grad`` shards are left as they are.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn

from gradwatch.metrics.base import PassRefused


def _fsdp_module_class() -> type | None:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        try:  # torch 2.4-2.5
            from torch.distributed._composable.fsdp import FSDPModule  # type: ignore[no-redef]
        except ImportError:
            return None
    return FSDPModule


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """Every ``FSDPModule`` in ``model`` (itself included), in ``modules()`` order; empty without FSDP2."""
    cls = _fsdp_module_class()
    if cls is None:
        return []
    return [m for m in model.modules() if isinstance(m, cls)]


def is_fsdp2(model: nn.Module) -> bool:
    """Whether ``model`` holds any FSDP2 (``fully_shard``) module."""
    return bool(fsdp_modules(model))


def _roots(model: nn.Module) -> list[nn.Module]:
    """The FSDP modules of ``model`` with no FSDP module above them."""
    cls = _fsdp_module_class()
    out: list[nn.Module] = []
    if cls is None:
        return out

    def walk(m: nn.Module) -> None:
        if isinstance(m, cls):
            out.append(m)
            return
        for child in m.children():
            walk(child)

    walk(model)
    return out


def _param_groups(state: Any) -> list[Any]:
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:  # older torch: at most one group per state
        group = getattr(state, "_fsdp_param_group", None)
        groups = [group] if group is not None else []
    return list(groups)


_GROUP_FIELDS = ("post_forward_mesh_info", "reshard_after_backward", "reduce_grads", "all_reduce_grads")


def _save_settings(mods: list[nn.Module]) -> list[tuple[Any, dict[str, Any], list[tuple[Any, dict[str, Any]]]]]:
    saved = []
    for m in mods:
        state = m._get_fsdp_state()  # type: ignore[operator]
        own = {k: getattr(state, k) for k in ("_auto_reshard_after_forward",) if hasattr(state, k)}
        groups = [(pg, {k: getattr(pg, k) for k in _GROUP_FIELDS if hasattr(pg, k)}) for pg in _param_groups(state)]
        saved.append((state, own, groups))
    return saved


def _save_forward_order(mods: list[nn.Module]) -> list[tuple[list[Any], list[Any]]]:
    """The per-iteration forward-order records (see the module docstring), each with a copy of its contents."""
    records: dict[int, list[Any]] = {}
    for m in mods:
        state = m._get_fsdp_state()  # type: ignore[operator]
        order = getattr(getattr(state, "_comm_ctx", None), "post_forward_order", None)
        if isinstance(order, list):
            records[id(order)] = order
        for pg in _param_groups(state):
            indices = getattr(pg, "_post_forward_indices", None)
            if isinstance(indices, list):
                records[id(indices)] = indices
    return [(record, list(record)) for record in records.values()]


def _restore_forward_order(saved: list[tuple[list[Any], list[Any]]]) -> None:
    for record, contents in saved:
        record[:] = contents


def _restore_settings(saved: list[tuple[Any, dict[str, Any], list[tuple[Any, dict[str, Any]]]]]) -> None:
    for state, own, groups in saved:
        for k, v in own.items():
            setattr(state, k, v)
        for pg, fields in groups:
            for k, v in fields.items():
                setattr(pg, k, v)


@contextlib.contextmanager
def unsharded(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, every FSDP2 module of ``model`` holds its full, plain (non-DTensor) parameters,
    and forwards and backwards through ``model`` are local: no all-gather, no reshard, no gradient sync.

    A no-op (yields ``model`` unchanged) when ``model`` holds no ``FSDPModule``. Otherwise entering is a
    collective (one all-gather per FSDP module): call it on every rank, in the same order. Read the
    parameters to differentiate *inside* the block, from ``model.named_parameters()``: they are the
    unsharded ``nn.Parameter`` objects, not the sharded ones the optimizer holds (whose ``.grad`` shards
    are left untouched: nothing is reduced into them). On exit, also after an exception, the modules are
    resharded and FSDP's settings restored exactly (see the module docstring for the fields read).

    Yields:
        ``model``.
    """
    mods = fsdp_modules(model)
    if not mods:
        yield model
        return
    saved = _save_settings(mods)
    order = _save_forward_order(mods)
    failed = False
    try:
        for m in mods:  # each setter with recurse=False: covers every module, also with several roots
            m.set_reshard_after_forward(False, recurse=False)  # type: ignore[operator]
            m.set_reshard_after_backward(False, recurse=False)  # type: ignore[operator]
            m.set_requires_gradient_sync(False, recurse=False)  # type: ignore[operator]
        for m in mods:
            m.unshard()  # type: ignore[operator]  # an all-gather: every rank, same order; not recursive
        yield model
    except BaseException:
        failed = True
        raise
    finally:
        try:
            if failed:
                _reset_after_failure(model)
            for m in mods:
                m.reshard()  # type: ignore[operator]  # local
        finally:
            _restore_settings(saved)
            _restore_forward_order(order)


def _reset_after_failure(model: nn.Module) -> None:
    for root in _roots(model):
        reset = getattr(root, "reset_iter_state", None)
        if reset is not None and getattr(root._get_fsdp_state(), "_is_root", None) is not False:
            reset()


@contextlib.contextmanager
def sharded_forward(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, forwards through ``model`` are FSDP2's own sharded forwards, each module all-gathered
    in its pre-forward and resharded in its post-forward (the root too, unlike training's default), so a
    forward holds about one module's unsharded parameters beside the root's. For forwards without grad.

    A no-op without FSDP2 modules. Otherwise each forward is a collective: every rank must run the same
    forwards in the same order (a rank with no batch of its own runs a stand-in). Entering is local. On exit,
    also after an exception (then first ``reset_iter_state()`` of each root, as in :func:`unsharded`), every
    module is resharded and FSDP's settings and per-iteration forward-order records are put back exactly.
    """
    mods = fsdp_modules(model)
    if not mods:
        yield model
        return
    saved = _save_settings(mods)
    order = _save_forward_order(mods)
    failed = False
    try:
        for m in mods:
            m.set_reshard_after_forward(True, recurse=False)  # type: ignore[operator]
        yield model
    except BaseException:
        failed = True
        raise
    finally:
        try:
            if failed:
                _reset_after_failure(model)
            for m in mods:
                m.reshard()  # type: ignore[operator]  # local; a no-op for a sharded module
        finally:
            _restore_settings(saved)
            _restore_forward_order(order)


def full_parameter_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters at their full size (a DTensor counts its global shape): what every rank
    holds while :func:`unsharded` is entered."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


REFUSED = ("gradwatch: this extra pass needs gradients through the whole model, so under FSDP2 every FSDP module "
           "is unsharded on every rank for it: {need:.3g} GiB of parameters per rank, over max_unshard_gb={limit:g}. "
           "Forward-only probe passes run sharded; this one cannot. Raise max_unshard_gb if the full parameters "
           "fit on each device beside training's own memory, or turn the family off")


@contextlib.contextmanager
def pass_scope(model: nn.Module, *, grad: bool, max_unshard_gb: float | None = None) -> Iterator[bool]:
    """The FSDP2 side of an extra pass: :func:`sharded_forward` without grad, :func:`unsharded` with grad
    (refused with :class:`PassRefused` when the full parameter bytes exceed ``max_unshard_gb`` GiB; the same
    decision on every rank, from global shapes, before any collective). Yields whether each forward is a
    collective (FSDP2 without grad); a no-op yielding False without FSDP2."""
    if not is_fsdp2(model):
        yield False
        return
    if not grad:
        with sharded_forward(model):
            yield True
        return
    need = full_parameter_bytes(model) / 2**30
    if max_unshard_gb is not None and need > max_unshard_gb:
        raise PassRefused(REFUSED.format(need=need, limit=max_unshard_gb))
    with unsharded(model):
        yield False


__all__ = ["REFUSED", "fsdp_modules", "full_parameter_bytes", "is_fsdp2", "pass_scope", "sharded_forward",
           "unsharded"]
