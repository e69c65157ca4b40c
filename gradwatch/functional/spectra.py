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
float64 and takes its eigenvalues (s_i = sqrt(lambda_i)): on a GPU with one batched ``eigvalsh`` per group
of same-shaped gradients; on the CPU one matrix per core, with numpy's BLAS for the Gram and SciPy's
LAPACK for the eigenvalues (see :mod:`gradwatch.functional._lapack`). Forming the Gram squares the
condition number; in float64 that still leaves singular values accurate to ~1e-8 * s_1 absolutely, far
below what these statistics can see. In float32 (``"gram32"``) it does not: anything below ~3e-4 * s_1 is
rounding noise.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, TypeVar

import numpy as np
import torch
from threadpoolctl import ThreadpoolController
from torch import Tensor

from gradwatch.functional import _lapack

T = TypeVar("T")
R = TypeVar("R")

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


_POOL: tuple[int, int, ThreadPoolExecutor] | None = None  # (workers, pid, pool)
_BLAS: ThreadpoolController | None = None


def single_threaded_blas() -> Any:
    """A context in which numpy's and SciPy's BLAS run on one thread (the caller's, so its CPU time is the
    work's, and no BLAS worker spins beside torch's threads)."""
    global _BLAS
    if _BLAS is None:
        _lapack.lapack_available()  # load SciPy's BLAS first, so the controller sees it too
        _BLAS = ThreadpoolController()
    return _BLAS.limit(limits=1, user_api="blas")


def _concurrently(fn: Callable[[T], R], items: Sequence[T], cost: Callable[[T], float]) -> list[R]:
    """``[fn(x) for x in items]``, spread over ``torch.get_num_threads()`` worker threads, BLAS single-threaded.

    Each call is a BLAS/LAPACK call that releases the GIL; one call per core beats multi-threaded BLAS
    here because the tridiagonal reduction inside the eigensolver is memory-bound and scales poorly over
    threads. Limiting BLAS to one thread also keeps OpenBLAS workers from spinning beside torch's. Items
    start in order of decreasing ``cost`` so no core is left with a large one at the end.
    """
    global _POOL
    workers = max(1, torch.get_num_threads())
    with single_threaded_blas():
        if workers < 2 or len(items) < 2:
            return [fn(x) for x in items]
        if _POOL is None or _POOL[:2] != (workers, os.getpid()):
            if _POOL is not None and _POOL[1] == os.getpid():
                _POOL[2].shutdown(wait=False)
            # a forked child inherits the pool object but not its threads: it gets its own
            _POOL = (workers, os.getpid(), ThreadPoolExecutor(workers, thread_name_prefix="gradwatch-spectra"))
        order = sorted(range(len(items)), key=lambda i: cost(items[i]), reverse=True)
        results: list[R] = [None] * len(items)  # type: ignore[list-item]
        for i, r in zip(order, _POOL[2].map(fn, [items[i] for i in order])):
            results[i] = r
        return results


def _host_gram_spectrum(matrix: Tensor) -> tuple[np.ndarray | None, float]:
    """Descending singular values of one CPU matrix from its float64 Gram matrix, and ||G||_F^2.

    numpy's OpenBLAS forms the Gram with ``syrk`` and LAPACK's ``dsyevd`` solves it (:mod:`._lapack`, which
    releases the GIL): on a 2-core x86 CPU this was 2.2x (Gram) and 1.5x (eigenvalues) faster than torch's
    float64 kernels, single-threaded, for 768-wide GPT-2 gradients. ||G||_F^2 is the Gram's trace, i.e.
    sum_jk G_jk^2 in float64 (each square of a float32 entry is exact). A non-finite entry makes that trace
    non-finite; the solve is then skipped and the singular values are ``None``.
    """
    t = matrix.detach()
    if t.dtype not in (torch.float32, torch.float64):
        t = t.to(torch.float64)
    a = t.numpy().astype(np.float64, copy=False)
    gram = a.T @ a if a.shape[0] >= a.shape[1] else a @ a.T  # the smaller one; numpy uses syrk for both
    frobenius_sq = float(np.trace(gram))
    if not math.isfinite(frobenius_sq):
        return None, frobenius_sq
    eig = _lapack.eigvalsh(gram, overwrite=True)  # ascending
    return np.sqrt(np.clip(eig[::-1], 0.0, None)), frobenius_sq


def _host_gram_spectra(matrices: Sequence[Tensor]) -> tuple[list[Tensor], Tensor, Tensor]:
    """Per CPU matrix: float64 descending singular values (NaN when non-finite), ||G||_F^2, non-finite flag."""
    def cost(m: Tensor) -> float:  # Gram m*n*r plus eigensolver ~r^3 flops, r = min(m, n)
        return min(m.shape) ** 2 * (max(m.shape) + min(m.shape))

    results = _concurrently(_host_gram_spectrum, matrices, cost)
    values, fro_sq, bad = [], [], []
    for m, (s, f) in zip(matrices, results):
        bad.append(s is None)
        fro_sq.append(f)
        values.append(torch.full((min(m.shape),), math.nan, dtype=torch.float64) if s is None
                      else torch.from_numpy(s.copy()))
    return values, torch.tensor(fro_sq, dtype=torch.float64), torch.tensor(bad, dtype=torch.bool)


def _gram_eigen_singular_values(stack: Tensor, dtype: torch.dtype) -> Tensor:
    """Descending singular values of each matrix of ``stack`` (B, m, n) via the smaller Gram matrix (torch)."""
    a = stack.to(dtype)
    if a.shape[-2] > a.shape[-1]:
        a = a.transpose(-2, -1)
    gram = a @ a.transpose(-2, -1)
    eig = torch.linalg.eigvalsh(gram)  # ascending
    return eig.clamp_min(0).sqrt().flip(-1)


def batched_singular_values(stack: Tensor, method: SpectrumMethod = "gram") -> Tensor:
    """Singular values (descending, float64) of a stack of same-shaped matrices (B, m, n).

    Args:
        stack: the matrices; any float dtype (bf16/fp16 are promoted).
        method: ``"gram"`` (float64 Gram eigenvalues), ``"gram32"`` (float32 Gram, torch; loses singular
            values below ~3e-4 * s_1) or ``"svdvals"`` (``torch.linalg.svdvals`` in float64, the reference).
    """
    if method == "gram":
        if stack.device.type == "cpu" and len(stack):
            return torch.stack(_host_gram_spectra(stack.unbind(0))[0])
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

    A non-finite matrix (inf or NaN anywhere) never raises: its statistics are NaN, as are those of a 0-size
    matrix (no singular values; not counted as non-finite).

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
    for i, m in enumerate(matrices):
        if m.ndim != 2:
            raise ValueError(f"gradwatch: expected 2-D matrices, got shape {tuple(m.shape)} at index {i}")
    out = {name: torch.full((len(matrices),), math.nan, dtype=torch.float64, device=device) for name in stats}
    nonfinite = torch.zeros(len(matrices), dtype=torch.bool, device=device)
    empty = {i for i, m in enumerate(matrices) if m.numel() == 0}  # a 0 x n matrix has no spectrum: NaN

    def store(idx: list[int], values: dict[str, Tensor], bad: Tensor) -> None:
        index = torch.tensor(idx, device=device)
        for name, v in values.items():
            out[name][index] = torch.where(bad, math.nan, v).to(device)
        nonfinite[index] = bad.to(device)

    host = [i for i, m in enumerate(matrices) if method == "gram" and m.device.type == "cpu" and i not in empty]
    if host:  # one matrix per task, spread over the cores; then statistics per group of equal rank
        values_, fro_sq_, bad_ = _host_gram_spectra([matrices[i] for i in host])
        by_rank: dict[int, list[int]] = {}
        for j, v in enumerate(values_):
            by_rank.setdefault(len(v), []).append(j)
        for js in by_rank.values():
            store([host[j] for j in js],
                  spectrum_statistics(torch.stack([values_[j] for j in js]), fro_sq_[js], stats), bad_[js])
    groups: dict[tuple, list[int]] = {}
    hosted = set(host) | empty
    for i, m in enumerate(matrices):
        if i not in hosted:
            groups.setdefault((tuple(m.shape), m.device, m.dtype), []).append(i)
    for idx in groups.values():  # GPU (or gram32/svdvals): one batched solve per group of equal shape
        stack = torch.stack([matrices[i] for i in idx])
        bad = ~torch.isfinite(stack).flatten(1).all(-1)
        if stack.device.type != "cpu" or bool(bad.any()):  # on CPU the check is free; on a GPU, no sync
            stack = torch.where(bad[:, None, None], torch.zeros((), dtype=stack.dtype, device=stack.device), stack)
        if method != "gram32":
            stack = stack.double()  # one float64 copy serves the Frobenius norm and the solve
        fro_sq = stack.double().square().sum((-2, -1))
        store(idx, spectrum_statistics(batched_singular_values(stack, method), fro_sq, stats), bad)
    return out, nonfinite


def _gram_spectrum(gram: Tensor) -> tuple[Tensor | None, float]:
    """Descending singular values from one float64 Gram matrix (s_i = sqrt(lambda_i)), and tr G = ||X||_F^2;
    None when the trace is not finite. The Gram is overwritten (it is scratch for the caller)."""
    frobenius_sq = float(torch.diagonal(gram).sum())
    if not math.isfinite(frobenius_sq):
        return None, frobenius_sq
    if gram.device.type == "cpu":
        eig = torch.from_numpy(_lapack.eigvalsh(gram.numpy(), overwrite=True).copy())
    else:
        eig = torch.linalg.eigvalsh(gram).cpu()
    return eig.flip(0).clamp_min(0).sqrt(), frobenius_sq


def gram_spectrum_statistics(grams: Sequence[Tensor],
                             stats: Sequence[str] = STATISTICS) -> tuple[dict[str, Tensor], Tensor]:
    """Spectrum statistics of matrices X given by their float64 Gram matrices (X^T X or X X^T, either: the
    nonzero eigenvalues are the same), as :func:`gradient_spectrum_statistics` returns them for X.

    s_i = sqrt(max(lambda_i(G), 0)) and ||X||_F^2 = tr G (exact in float64). For Grams assembled without the
    matrix, e.g. from row shards (:mod:`gradwatch.functional.gram_shards`). A non-finite Gram gives NaN
    statistics and a True flag. The Grams are used as scratch (overwritten). Returns CPU tensors.
    """
    if not grams:
        empty = torch.empty(0, dtype=torch.float64)
        return {name: empty for name in stats}, torch.empty(0, dtype=torch.bool)
    results = _concurrently(_gram_spectrum, list(grams), lambda g: float(g.shape[0]) ** 3)
    out = {name: torch.full((len(grams),), math.nan, dtype=torch.float64) for name in stats}
    bad = torch.tensor([s is None for s, _ in results], dtype=torch.bool)
    by_rank: dict[int, list[int]] = {}
    for j, (s, _) in enumerate(results):
        if s is not None:
            by_rank.setdefault(len(s), []).append(j)
    for js in by_rank.values():
        values = spectrum_statistics(torch.stack([results[j][0] for j in js]),  # type: ignore[misc]
                                     torch.tensor([results[j][1] for j in js], dtype=torch.float64), stats)
        for name, v in values.items():
            out[name][js] = v
    return out, bad


def cross_layer_mad(values: Tensor) -> Tensor:
    """Mean absolute difference between consecutive layers of one layer family.

    MAD = 1/(L-1) * sum_{l=0}^{L-2} |x_{l+1} - x_l| over the last dimension (L >= 2); Li et al. 2024 use it
    to say how much a statistic changes from layer to layer.
    """
    if values.shape[-1] < 2:
        raise ValueError(f"gradwatch: cross-layer MAD needs at least 2 layers, got {values.shape[-1]}")
    return (values[..., 1:] - values[..., :-1]).abs().mean(-1)
