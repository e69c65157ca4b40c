"""Singular-value spectra of many gradient matrices at once, and the statistics built on them.

For a gradient G (m x n) with singular values s_1 >= ... >= s_r >= 0, r = min(m, n):

- nuclear_norm   = sum_i s_i
- spectral_norm  = s_1
- frobenius_norm = sqrt(sum_i s_i^2) = sqrt(sum_jk G_jk^2)   (computed exactly from the entries)
- stable_rank    = sum_i s_i^2 / s_1^2
- effective_rank = exp(-sum_i p_i ln p_i), p_i = s_i / sum_j s_j   (Roy and Vetterli 2007)
- top1_ratio     = s_1 / sum_i s_i

Li et al. 2024, "What happened in LLMs layers when trained for fast vs. slow thinking", compare these
across layers; :func:`cross_layer_mad` is their mean absolute difference along a layer family.

Only singular values are needed, so the default route forms the smaller Gram matrix G G^T or G^T G in
float64 and takes its eigenvalues with one batched ``eigvalsh`` per group of same-shaped gradients
(s_i = sqrt(lambda_i)). Forming the Gram squares the condition number; in float64 that still leaves
singular values accurate to ~1e-8 * s_1 absolutely, far below what these statistics can see. In
float32 (``"gram32"``) it does not: anything below ~3e-4 * s_1 is rounding noise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import torch
from torch import Tensor

SpectrumMethod = Literal["gram", "gram32", "svdvals"]
STATISTICS: tuple[str, ...] = (
    "nuclear_norm",
    "spectral_norm",
    "frobenius_norm",
    "stable_rank",
    "effective_rank",
    "top1_ratio",
)


def as_matrix(tensor: Tensor) -> Tensor:
    """Read a weight-shaped tensor as a matrix: (out, in) for Linear, (out, in*k...) for conv kernels."""
    if tensor.ndim == 2:
        return tensor
    if tensor.ndim < 2:
        raise ValueError(f"gradwatch: expected a tensor with >= 2 dims, got shape {tuple(tensor.shape)}")
    return tensor.reshape(tensor.shape[0], -1)


_POOL: tuple[int, ThreadPoolExecutor] | None = None


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def symmetric_eigenvalues(matrices: Tensor) -> Tensor:
    """Ascending eigenvalues of a stack of symmetric matrices (B, n, n).

    On a multi-core CPU the matrices are solved concurrently, one per core, each single-threaded: LAPACK's
    tridiagonal reduction is memory-bound and scales poorly over threads, so this was 2x to 3.4x faster
    than one batched ``eigvalsh`` (or a loop of them) on 2 cores for 384- and 768-wide Gram matrices.
    Elsewhere (GPU, one thread, one matrix) it is one batched ``torch.linalg.eigvalsh``.
    """
    global _POOL
    workers = torch.get_num_threads()
    if matrices.device.type != "cpu" or workers < 2 or matrices.shape[0] < 2:
        return torch.linalg.eigvalsh(matrices)
    if _POOL is None or _POOL[0] != workers:
        if _POOL is not None:
            _POOL[1].shutdown(wait=False)
        _POOL = (workers, ThreadPoolExecutor(workers, thread_name_prefix="gradwatch-eigvalsh"))
    with _torch_threads(1):
        return torch.stack(list(_POOL[1].map(torch.linalg.eigvalsh, matrices.unbind(0))))


def _gram_eigen_singular_values(stack: Tensor, dtype: torch.dtype) -> Tensor:
    """Descending singular values of each matrix of ``stack`` (B, m, n) via the smaller Gram matrix."""
    a = stack.to(dtype)
    if a.shape[-2] > a.shape[-1]:
        a = a.transpose(-2, -1)
    gram = a @ a.transpose(-2, -1)
    eig = symmetric_eigenvalues(gram)  # ascending
    return eig.clamp_min(0).sqrt().flip(-1)


def batched_singular_values(stack: Tensor, method: SpectrumMethod = "gram") -> Tensor:
    """Singular values (descending, float64) of a stack of same-shaped matrices (B, m, n).

    Args:
        stack: the matrices; any float dtype (bf16/fp16 are promoted).
        method: ``"gram"`` (float64 Gram eigenvalues), ``"gram32"`` (float32 Gram; fast, loses singular
            values below ~3e-4 * s_1) or ``"svdvals"`` (``torch.linalg.svdvals`` in float64, the reference).
    """
    if method == "gram":
        return _gram_eigen_singular_values(stack, torch.float64)
    if method == "gram32":
        return _gram_eigen_singular_values(stack, torch.float32).double()
    if method == "svdvals":
        # float64 even for float32 input: a float32 SVD leaves the small singular values of a rank-deficient
        # gradient with ~eps32 * s_1 error, which moves effective rank by > 1e-5 at 384 x 384
        return torch.linalg.svdvals(stack.double())
    raise ValueError(f"gradwatch: `method` expected one of ['gram', 'gram32', 'svdvals'], got {method!r}")


def spectrum_statistics(singular_values: Tensor, frobenius_sq: Tensor | None = None,
                        stats: Sequence[str] = STATISTICS) -> dict[str, Tensor]:
    """The statistics of one or many spectra.

    Args:
        singular_values: (..., r) singular values in descending order.
        frobenius_sq: (...) exact squared Frobenius norms; defaults to sum_i s_i^2.
        stats: which of :data:`STATISTICS` to return.

    Returns:
        ``{stat: Tensor(...)}``. Ratios of an all-zero gradient (stable rank, effective rank,
        top1 ratio) are NaN: they are undefined, not zero.
    """
    s = singular_values
    nuclear = s.sum(-1)
    top = s[..., 0]
    fro_sq = (s * s).sum(-1) if frobenius_sq is None else frobenius_sq.to(s.dtype)
    out: dict[str, Tensor] = {}
    for name in stats:
        if name == "nuclear_norm":
            out[name] = nuclear
        elif name == "spectral_norm":
            out[name] = top
        elif name == "frobenius_norm":
            out[name] = fro_sq.sqrt()
        elif name == "stable_rank":
            out[name] = fro_sq / top.square()
        elif name == "effective_rank":
            p = s / nuclear.unsqueeze(-1)
            out[name] = torch.exp(-torch.special.xlogy(p, p).sum(-1))
        elif name == "top1_ratio":
            out[name] = top / nuclear
        else:
            raise ValueError(f"gradwatch: unknown statistic {name!r}; valid choices are {list(STATISTICS)}")
    return out


def gradient_spectrum_statistics(matrices: Sequence[Tensor], stats: Sequence[str] = STATISTICS,
                                 method: SpectrumMethod = "gram") -> tuple[dict[str, Tensor], Tensor]:
    """Spectrum statistics of many matrices, grouped by shape and device so each group is one batched solve.

    A non-finite matrix (inf or NaN anywhere) never raises: its statistics are NaN.

    Args:
        matrices: L matrices (2-D; use :func:`as_matrix` for conv kernels), any shapes.
        stats: which of :data:`STATISTICS` to compute.
        method: see :func:`batched_singular_values`.

    Returns:
        ``({stat: Tensor(L) float64}, nonfinite: Tensor(L) bool)``, on the matrices' device (the first
        matrix's device when they are spread over several).
    """
    if not matrices:
        empty = torch.empty(0, dtype=torch.float64)
        return {name: empty for name in stats}, torch.empty(0, dtype=torch.bool)
    device = matrices[0].device
    groups: dict[tuple, list[int]] = {}
    for i, m in enumerate(matrices):
        if m.ndim != 2:
            raise ValueError(f"gradwatch: expected 2-D matrices, got shape {tuple(m.shape)} at index {i}")
        groups.setdefault((tuple(m.shape), m.device, m.dtype), []).append(i)
    out = {name: torch.empty(len(matrices), dtype=torch.float64, device=device) for name in stats}
    nonfinite = torch.empty(len(matrices), dtype=torch.bool, device=device)
    for (_, _, _), idx in groups.items():
        stack = torch.stack([matrices[i] for i in idx])
        bad = ~torch.isfinite(stack).flatten(1).all(-1)
        if stack.device.type != "cpu" or bool(bad.any()):  # on CPU the check is free; on a GPU, no sync
            stack = torch.where(bad[:, None, None], torch.zeros((), dtype=stack.dtype, device=stack.device), stack)
        if method != "gram32":
            stack = stack.double()  # one float64 copy serves the Frobenius norm and the solve
        fro_sq = stack.double().square().sum((-2, -1))
        values = spectrum_statistics(batched_singular_values(stack, method), fro_sq, stats)
        index = torch.tensor(idx, device=device)
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=stack.device)
        for name, v in values.items():
            out[name][index] = torch.where(bad, nan, v).to(device)
        nonfinite[index] = bad.to(device)
    return out, nonfinite


def cross_layer_mad(values: Tensor) -> Tensor:
    """Mean absolute difference between consecutive layers of one layer family.

    MAD = 1/(L-1) * sum_{l=0}^{L-2} |x_{l+1} - x_l| over the last dimension (L >= 2); Li et al. 2024 use it
    to say how much a statistic changes from layer to layer.
    """
    if values.shape[-1] < 2:
        raise ValueError(f"gradwatch: cross-layer MAD needs at least 2 layers, got {values.shape[-1]}")
    return (values[..., 1:] - values[..., :-1]).abs().mean(-1)
