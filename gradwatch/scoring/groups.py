"""Which gradient matrices are scored, and the layer groups the statistics are aggregated over.

Li et al. 2024 ("What happened in LLMs layers when trained for fast vs. slow thinking: a gradient perspective")
and Li et al. 2025 ("How instruction and reasoning data shape post-training") report the statistics of each
transformer block's attention projections (q, k, v, o) per layer and averaged over layers, and compare early,
middle and late layers. Here every block's q, k, v, o and MLP matrices are scored; an example's value for a group
is the mean over the group's matrices of that matrix's statistic. Groups:

- ``all``: every scored matrix;
- ``q``, ``k``, ``v``, ``o``, ``mlp``: one role over all blocks (``mlp`` holds the up/gate and down projections);
- ``<role>/early``, ``<role>/middle``, ``<role>/late`` and ``all/early`` ...: the blocks split into thirds by depth
  (``numpy.array_split`` of the block indices 0..L-1 into three; a third with no block is left out).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from torch import nn

from gradwatch.engine.layers import WatchedMatrix, discover_matrices, layer_index

ROLES: tuple[str, ...] = ("q", "k", "v", "o", "mlp")
DEPTHS: tuple[str, ...] = ("early", "middle", "late")

# (role, pattern over the matrix tag); the first that matches wins. Tags are names from named_parameters(),
# with GPT-2's fused c_attn split into .q/.k/.v by gradwatch.engine.layers.
_ROLE_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple((role, re.compile(p)) for role, p in (
    ("q", r"\.weight\.q$|(^|\.)(query|q_proj|q_lin|wq|q)\.weight$"),
    ("k", r"\.weight\.k$|(^|\.)(key|k_proj|k_lin|wk|k)\.weight$"),
    ("v", r"\.weight\.v$|(^|\.)(value|v_proj|v_lin|wv|v)\.weight$"),
    ("o", r"(attn|attention|self_attn)\.(c_proj|o_proj|out_proj|out_lin|dense|wo)\.weight$"
          r"|attention\.output\.dense\.weight$"),
    ("mlp", r"(mlp|feed_forward|ffn)\.[\w.]+\.weight$|(intermediate|output)\.dense\.weight$"),
))


@dataclass(frozen=True)
class ScoredMatrix:
    """One scored gradient matrix: what :mod:`gradwatch.engine.layers` found, with its role and block."""

    watched: WatchedMatrix
    role: str
    block: int

    @property
    def tag(self) -> str:
        return self.watched.tag

    @property
    def param_name(self) -> str:
        return self.watched.param_name


def matrix_role(tag: str) -> str | None:
    """``q``, ``k``, ``v``, ``o``, ``mlp`` or ``None`` (not a transformer block's projection)."""
    for role, pattern in _ROLE_PATTERNS:
        if pattern.search(tag):
            return role
    return None


def scored_matrices(model: nn.Module) -> list[ScoredMatrix]:
    """The q/k/v/o and MLP matrices of every transformer block of ``model``, in model order.

    Raises:
        ValueError: no such matrix was found (the message lists a few parameter names).
    """
    found = discover_matrices(model)
    out = []
    for w in found.matrices:
        role = matrix_role(w.tag)
        index = layer_index(w.tag)
        if role is not None and index:
            out.append(ScoredMatrix(w, role, index[0]))
    if not out:
        names = [n for n, _ in model.named_parameters()][:8]
        raise ValueError(f"gradwatch score-data: found no attention (q/k/v/o) or MLP weight inside numbered "
                         f"transformer blocks of {type(model).__name__}; its parameters look like: {', '.join(names)}")
    return out


def layer_groups(matrices: Sequence[ScoredMatrix]) -> dict[str, list[int]]:
    """Group name -> indices into ``matrices`` (see the module docstring), in a fixed order."""
    blocks = sorted({m.block for m in matrices})
    thirds = {b: DEPTHS[k] for k, part in enumerate(np.array_split(np.array(blocks), 3)) for b in part.tolist()}
    groups: dict[str, list[int]] = {"all": list(range(len(matrices)))}
    for role in ROLES:
        rows = [i for i, m in enumerate(matrices) if m.role == role]
        if rows:
            groups[role] = rows
    for role in ("all", *ROLES):
        for depth in DEPTHS:
            rows = [i for i, m in enumerate(matrices) if (role == "all" or m.role == role) and thirds[m.block] == depth]
            if rows:
                groups[f"{role}/{depth}"] = rows
    return groups
