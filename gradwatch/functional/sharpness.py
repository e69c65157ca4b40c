"""Edge-of-stability sharpness from a loss closure: one estimate, the functional half of
:class:`gradwatch.metrics.sharpness.Sharpness`.

lambda_1 is the largest algebraic eigenvalue of the Hessian H of the training loss (Cohen et al. 2021);
for Adam/AdamW also lambda_1(P^-1/2 H P^-1/2) with P Adam's preconditioner (Cohen et al. 2022). Both come
from Lanczos on Hessian-vector products (Pearlmutter 1994), warm-started from the previous top
eigenvector when one is given; the trace from Hutchinson probes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor

from gradwatch.functional.hessian import HessianOperator, hutchinson_trace, lanczos_top_eigenvalues, preconditioned


@dataclass(frozen=True)
class SharpnessEstimate:
    """One sharpness estimate.

    Attributes:
        eigenvalues: the top-k Hessian eigenvalues, largest first.
        eigenvector: the top eigenvector (flat, detached): the next estimate's warm start.
        precond_eigenvalue: lambda_1(D^-1/2 H D^-1/2), or None without a preconditioner.
        precond_eigenvector: its eigenvector, or None.
        trace: the Hutchinson trace estimate, or None.
        converged: whether every Lanczos run met its tolerance.
        hvps: Hessian-vector products used.
    """

    eigenvalues: tuple[float, ...]
    eigenvector: Tensor
    precond_eigenvalue: float | None
    precond_eigenvector: Tensor | None
    trace: float | None
    converged: bool
    hvps: int


def sharpness_estimate(loss_fn: Callable[[], Tensor], params: Sequence[Tensor], *, top_k: int = 1,
                       max_iter: int = 50, tol: float = 1e-3, warm: Tensor | None = None,
                       precond_diag: Callable[[], Tensor | None] | None = None, warm_precond: Tensor | None = None,
                       trace_samples: int = 0) -> SharpnessEstimate:
    """Top Hessian eigenvalue(s) of ``loss_fn()`` in ``params`` (and optionally the preconditioned one and
    the trace). ``precond_diag() -> D`` (flat, positive, or None when unknown) is read inside, once the
    operator's device is known."""
    with HessianOperator(loss_fn, params) as op:
        res = lanczos_top_eigenvalues(op.matvec, op.dim, k=top_k, max_iter=max_iter, tol=tol, init=warm,
                                      device=op.device)
        converged, hvps = res.converged, res.num_matvecs
        p_val = p_vec = None
        diag = precond_diag() if precond_diag is not None else None
        if diag is not None:
            pres = lanczos_top_eigenvalues(preconditioned(op.matvec, diag.to(op.device)), op.dim, k=1,
                                           max_iter=max_iter, tol=tol, init=warm_precond, device=op.device)
            p_val, p_vec = float(pres.eigenvalues[0]), pres.eigenvectors[:, 0].detach()
            converged, hvps = converged and pres.converged, hvps + pres.num_matvecs
        trace = None
        if trace_samples:
            tr = hutchinson_trace(op.matvec, op.dim, num_samples=trace_samples, device=op.device)
            trace, hvps = tr.estimate, hvps + tr.num_matvecs
    return SharpnessEstimate(tuple(float(x) for x in res.eigenvalues), res.eigenvectors[:, 0].detach(), p_val, p_vec,
                             trace, bool(converged), int(hvps))
