"""The role of a transformer's weight matrix from its name (q, k, v, o, mlp), and the layer groups built on roles
and depth, as Li et al. 2024 ("What happened in LLMs layers when trained for fast vs. slow thinking") and Li et al.
2025 ("How instruction and reasoning data shape post-training") aggregate per-layer gradient statistics.

Pure functions of names (``named_parameters()`` names, with fused projections split into ``.q``/``.k``/``.v``: GPT-2's
``c_attn.weight``, ``nn.MultiheadAttention``'s ``in_proj_weight``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

ROLES: tuple[str, ...] = ("q", "k", "v", "o", "mlp")
DEPTHS: tuple[str, ...] = ("early", "middle", "late")

# (role, pattern over the matrix tag); the first that matches wins
_ROLE_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple((role, re.compile(p)) for role, p in (
    ("q", r"[._]weight\.q$|(^|\.)(query|q_proj|q_lin|wq|q)\.weight$"),
    ("k", r"[._]weight\.k$|(^|\.)(key|k_proj|k_lin|wk|k)\.weight$"),
    ("v", r"[._]weight\.v$|(^|\.)(value|v_proj|v_lin|wv|v)\.weight$"),
    ("o", r"(attn|attention|self_attn)\.(c_proj|o_proj|out_proj|out_lin|dense|wo)\.weight$"
          r"|attention\.output\.dense\.weight$"),
    ("mlp", r"(mlp|feed_forward|ffn)\.[\w.]+\.weight$|(intermediate|output)\.dense\.weight$"),
))
_BLOCK = re.compile(r"(?:^|\.)(\d+)\.")


def matrix_role(tag: str) -> str | None:
    """``q``, ``k``, ``v``, ``o``, ``mlp`` or ``None`` (not a transformer block's projection)."""
    for role, pattern in _ROLE_PATTERNS:
        if pattern.search(tag):
            return role
    return None


def block_index(tag: str) -> int | None:
    """The first numeric path segment of a name (``transformer.h.3.attn...`` -> 3), or None."""
    m = _BLOCK.search(tag)
    return int(m.group(1)) if m else None


def role_groups(roles: Sequence[str | None], blocks: Sequence[int | None]) -> dict[str, list[int]]:
    """Group name -> indices, in a fixed order: ``all`` (every index), each role present (over the matrices with
    a role and a block), and ``<role>/early|middle|late`` and ``all/early|...``: the blocks split into thirds
    (``numpy.array_split`` of the sorted block indices; a third with no block left out)."""
    scored = [i for i, (r, b) in enumerate(zip(roles, blocks)) if r is not None and b is not None]
    distinct = sorted({blocks[i] for i in scored})  # type: ignore[type-var]
    thirds = {b: DEPTHS[k] for k, part in enumerate(np.array_split(np.array(distinct), 3)) for b in part.tolist()}
    groups: dict[str, list[int]] = {"all": list(range(len(roles)))}
    for role in ROLES:
        rows = [i for i in scored if roles[i] == role]
        if rows:
            groups[role] = rows
    for role in ("all", *ROLES):
        for depth in DEPTHS:
            rows = [i for i in scored if (role == "all" or roles[i] == role) and thirds[blocks[i]] == depth]
            if rows:
                groups[f"{role}/{depth}"] = rows
    return groups
