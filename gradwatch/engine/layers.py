"""Which gradients to watch, and how to read each one as a matrix.

Watched by default: the weights of ``nn.Linear``, ``nn.Conv1d/2d/3d`` (kernel read as (out, in*k)),
GPT-2's ``Conv1D`` (stored as (in, out), read transposed) and ``nn.MultiheadAttention``'s projections.
Fused q/k/v projections (``in_proj_weight``, GPT-2's ``c_attn``) are split into ``.q``, ``.k``, ``.v``.
Embedding tables and the output head are opt-in (``WatchConfig(embeddings=True, output_head=True)``).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

_LAYER_INDEX = re.compile(r"(?<=\.)\d+(?=\.)|^\d+(?=\.)")
_OUTPUT_HEAD_NAMES = ("lm_head", "embed_out", "output_projection")


def layer_family(name: str) -> str:
    """``transformer.h.3.attn.c_attn.weight.q`` -> ``transformer.h.*.attn.c_attn.weight.q``."""
    return _LAYER_INDEX.sub("*", name)


def layer_index(name: str) -> tuple[int, ...]:
    """The numeric path segments of a name, used to order a family's layers."""
    return tuple(int(x) for x in _LAYER_INDEX.findall(name))


@dataclass(frozen=True)
class WatchedMatrix:
    """One gradient matrix to watch: a parameter, or one block of a fused parameter.

    Attributes:
        tag: the name logged (``<param>`` or ``<param>.q`` etc.).
        param_name: the name from ``named_parameters()``.
        kind: ``linear``, ``conv``, ``gpt2_conv1d``, ``mha_in_proj``, ``fused_qkv``, ``embedding``.
        block: (index, count) of the row block of the (out, in) matrix, for fused projections.
        transpose: the parameter is stored (in, out).
    """

    tag: str
    param_name: str
    kind: str
    block: tuple[int, int] | None = None
    transpose: bool = False

    @property
    def family(self) -> str:
        return layer_family(self.tag)

    def matrix(self, grad: Tensor) -> Tensor:
        """The (out, in) matrix of this watched block, as a view of ``grad`` (no copy where possible)."""
        m = grad.t() if self.transpose else (grad if grad.ndim == 2 else grad.reshape(grad.shape[0], -1))
        if self.block is not None:
            i, n = self.block
            rows = m.shape[0] // n
            m = m[i * rows:(i + 1) * rows]
        return m


@dataclass(frozen=True)
class WatchedLayers:
    """The watched gradient matrices of a model (what :func:`discover_matrices` finds), shared by every
    family."""

    matrices: tuple[WatchedMatrix, ...]
    params: dict[str, nn.Parameter]
    frozen: tuple[str, ...]


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _candidates(model: nn.Module, embeddings: bool, output_head: bool) -> list[tuple[str, nn.Parameter, WatchedMatrix | list[WatchedMatrix]]]:
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    found: list = []
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        classes = {c.__name__ for c in type(module).__mro__}  # FSDP2 subclasses each sharded module (FSDPConv1D)
        short = mod_name.rsplit(".", 1)[-1]
        if isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
            name = prefix + "in_proj_weight"
            found.append((name, module.in_proj_weight,
                          [WatchedMatrix(f"{name}.{s}", name, "mha_in_proj", (i, 3)) for i, s in enumerate("qkv")]))
        elif isinstance(module, nn.MultiheadAttention):
            for s in "qkv":
                name = f"{prefix}{s}_proj_weight"
                found.append((name, getattr(module, f"{s}_proj_weight"), WatchedMatrix(name, name, "linear")))
        elif isinstance(module, nn.Linear):
            is_head = id(module.weight) in embedding_weights or short in _OUTPUT_HEAD_NAMES
            if is_head and not output_head:
                continue
            found.append((prefix + "weight", module.weight, WatchedMatrix(prefix + "weight", prefix + "weight", "linear")))
        elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            found.append((prefix + "weight", module.weight, WatchedMatrix(prefix + "weight", prefix + "weight", "conv")))
        elif "Conv1D" in classes and hasattr(module, "nf"):  # GPT-2's transposed linear (transformers.pytorch_utils)
            name = prefix + "weight"
            n_in, n_out = module.weight.shape
            # self-attention c_attn is (E, 3E): q, k, v; cross-attention c_attn is (E, 2E): k, v (q is q_attn)
            parts = "qkv" if n_out == 3 * n_in else "kv" if n_out == 2 * n_in else ""
            if short == "c_attn" and parts:
                found.append((name, module.weight,
                              [WatchedMatrix(f"{name}.{s}", name, "fused_qkv", (i, len(parts)), True)
                               for i, s in enumerate(parts)]))
            else:
                found.append((name, module.weight, WatchedMatrix(name, name, "gpt2_conv1d", None, True)))
        elif isinstance(module, nn.Embedding) and embeddings:
            found.append((prefix + "weight", module.weight, WatchedMatrix(prefix + "weight", prefix + "weight", "embedding")))
    out = []
    for name, p, w in found:
        if p is None or id(p) in seen:
            continue
        seen.add(id(p))
        out.append((name, p, w))
    return out


def discover_matrices(model: nn.Module, include: Sequence[str] = ("*",), exclude: Sequence[str] = (),
                      *, embeddings: bool = False, output_head: bool = False) -> WatchedLayers:
    """Find the gradient matrices to watch in ``model``.

    Args:
        model: the unwrapped model.
        include: glob patterns over ``named_parameters()`` names (and over split tags such as ``...weight.q``).
        exclude: glob patterns removed after ``include``.
        embeddings: also watch embedding tables.
        output_head: also watch the output head (``lm_head``-like modules and weights tied to an embedding).

    Raises:
        ValueError: a pattern in ``include`` or ``exclude`` matches no parameter of the model.
    """
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    candidates = _candidates(model, embeddings, output_head)
    split_tags = [w.tag for _, _, ws in candidates if isinstance(ws, list) for w in ws]
    for field_name, patterns in (("include", include), ("exclude", exclude)):
        for pattern in patterns:
            if pattern != "*" and not any(fnmatch.fnmatchcase(n, pattern) for n in (*names, *split_tags)):
                shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
                raise ValueError(f"gradwatch: `{field_name}` pattern {pattern!r} matches no parameter of "
                                 f"{type(model).__name__}; parameter names look like: {shown}")
    params: dict[str, nn.Parameter] = {}
    matrices: list[WatchedMatrix] = []
    frozen: list[str] = []
    for name, p, watched in candidates:
        blocks = watched if isinstance(watched, list) else [watched]
        blocks = [b for b in blocks
                  if (_matches(name, include) or _matches(b.tag, include))
                  and not (_matches(name, exclude) or _matches(b.tag, exclude))]
        if not blocks:
            continue
        if not p.requires_grad:
            frozen.append(name)
            continue
        params[name] = p
        matrices.extend(blocks)
    return WatchedLayers(tuple(matrices), params, tuple(frozen))



def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module under DDP/FSDP/compile wrappers (observe it, never its wrapper)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module) and inner is not model:
            model = inner
        else:
            return model


def unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside a host's wrapper (accelerate's ``AcceleratedOptimizer``, Lightning's
    ``LightningOptimizer``), so diagnostics read the real class, param groups and state."""
    for _ in range(4):
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or inner is optimizer:
            break
        optimizer = inner
    return optimizer


def gradient_matrices(discovery: WatchedLayers, scale: float | Tensor | None = None) -> tuple[list[Tensor], list[int]]:
    """The current gradient of each watched matrix (views, or dense copies of sparse gradients; multiplied
    by ``scale`` when given).

    Returns the matrices and the indices (into ``discovery.matrices``) of the ones that have a gradient.
    Reading ``.grad`` is all this does: nothing is written.
    """
    mats, idx = [], []
    for i, w in enumerate(discovery.matrices):
        g = discovery.params[w.param_name].grad
        if g is None:
            continue
        if hasattr(g, "full_tensor"):  # DTensor (FSDP2): the full gradient on every rank
            g = g.full_tensor()
        if g.is_sparse:  # nn.Embedding(sparse=True): rows not looked up are zero
            g = g.to_dense()
        m = w.matrix(g.detach())
        mats.append(m if scale is None else m * scale)
        idx.append(i)
    return mats, idx




@dataclass(frozen=True)
class GradientShard:
    """This rank's part of one watched gradient matrix, read without a collective.

    Attributes:
        stored: the rank's rows of the stored gradient as a 2-D view (conv kernels flattened): the local
            shard of an FSDP2 (row-sharded) DTensor, or the whole gradient; None where this rank has no
            gradient for it.
        stored_rows: how many stored rows this rank holds (from the parameter, gradient or not).
        shape: the stored 2-D shape (a, b) of the whole parameter.
        rows, cols: the watched block's row and column ranges in the stored matrix
            (:func:`gradwatch.functional.gram_shards.watched_block`).
        sharded: the rows are spread over the ranks (in rank order); False: every rank holds them all.
    """

    stored: Tensor | None
    stored_rows: int
    shape: tuple[int, int]
    rows: tuple[int, int]
    cols: tuple[int, int]
    sharded: bool


def _row_sharded(t: Any, world_size: int) -> bool:
    """A DTensor sharded on dim 0 over a 1-D mesh of all ``world_size`` ranks (what FSDP2 makes)."""
    if not hasattr(t, "to_local") or not hasattr(t, "placements"):
        return False
    try:
        from torch.distributed.tensor import Shard
    except ImportError:  # pragma: no cover - torch < 2.4
        return False
    mesh = t.device_mesh
    return (mesh.ndim == 1 and mesh.size() == world_size and len(t.placements) == 1
            and t.placements[0] == Shard(0))


def gradient_shards(discovery: WatchedLayers, world_size: int) -> list[GradientShard]:
    """Each watched matrix's :class:`GradientShard` (in discovery order): a row-sharded DTensor gradient
    stays a local shard (never made whole); any other DTensor layout is made whole with ``full_tensor()``
    (a collective, run for the same parameters on every rank); plain tensors are read as they are."""
    from gradwatch.functional.gram_shards import watched_block

    out: list[GradientShard] = []
    for w in discovery.matrices:
        p = discovery.params[w.param_name]
        g = p.grad
        sharded = _row_sharded(p, world_size)
        if sharded:
            local = p.to_local()
            stored_rows = local.shape[0]
            shape = (p.shape[0], int(torch.Size(p.shape[1:]).numel()))
            stored = None if g is None else g.to_local().detach().reshape(stored_rows, shape[1])
        else:
            if g is not None and hasattr(g, "full_tensor"):
                g = g.full_tensor()
            if g is not None and g.is_sparse:
                g = g.to_dense()
            stored = None if g is None else (g.detach() if g.ndim == 2 else g.detach().reshape(g.shape[0], -1))
            shape = (p.shape[0], int(torch.Size(p.shape[1:]).numel()))
            stored_rows = shape[0]
        rows, cols = watched_block(shape, w.block, w.transpose)
        out.append(GradientShard(stored, stored_rows, shape, rows, cols, sharded))
    return out
