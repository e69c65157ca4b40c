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

The role and group rules are :mod:`gradwatch.functional.layer_roles`, shared with the live ``example_quality`` family.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from gradwatch.engine.layers import WatchedMatrix, discover_matrices, layer_index
from gradwatch.functional.layer_roles import DEPTHS, ROLES, matrix_role, role_groups

__all__ = ["DEPTHS", "ROLES", "ScoredMatrix", "layer_groups", "matrix_role", "scored_matrices"]


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
    return role_groups([m.role for m in matrices], [m.block for m in matrices])
