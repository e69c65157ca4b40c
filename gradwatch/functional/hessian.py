"""Hessian-vector products and matrix-free spectral estimators.

Everything here works on a ``matvec`` callable ``v -> A v`` for a symmetric operator ``A`` acting on
flat vectors, so the estimators are checked against dense matrices and reused on the loss Hessian
through :class:`HessianOperator`. Nothing here registers hooks, writes ``.grad`` or calls
``.backward()``.

References:
    Pearlmutter 1994, "Fast exact multiplication by the Hessian" (Hessian-vector products).
    Lanczos 1950; Parlett 1998, "The Symmetric Eigenvalue Problem" (Lanczos with reorthogonalisation).
    Cohen et al. 2021 / 2022, "Gradient descent on neural networks typically occurs at the edge of
    stability" / "Adaptive gradient methods at the edge of stability" (sharpness, preconditioned sharpness).
    Yao et al. 2020, "PyHessian" (power iteration with a relative-change stopping rule).
    Hutchinson 1989; Meyer, Musco, Musco and Woodruff 2021, "Hutch++: optimal stochastic trace estimation".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

Matvec = Callable[[Tensor], Tensor]

__all__ = ["HessianOperator", "preconditioned", "LanczosResult", "PowerIterationResult", "TraceEstimate", "flatten",
           "hutchinson_trace", "hutchpp_trace", "lanczos_top_eigenvalues", "power_iteration", "unflatten"]


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenates ``tensors`` into one flat vector (in the order given)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vector: Tensor, like: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """Splits a flat ``vector`` into views shaped (and cast) like the tensors in ``like``."""
    pieces = torch.split(vector, [t.numel() for t in like])
    return tuple(p.view_as(t).to(t.dtype) for p, t in zip(pieces, like))


def preconditioned(matvec: Matvec, diag: Tensor) -> Matvec:
    """``v -> D^-1/2 A D^-1/2 v`` for a flat positive ``diag`` D: symmetric, with the eigenvalues of D^-1 A
    (Cohen et al. 2022's preconditioned sharpness when A is the Hessian and D Adam's preconditioner)."""
    inv_sqrt = diag.rsqrt()

    def product(v: Tensor) -> Tensor:
        return inv_sqrt * matvec(inv_sqrt.to(v.dtype) * v)

    return product


class HessianOperator:
    """The loss Hessian ``H = d^2 loss / d params^2`` as a matrix-free operator on flat vectors.

    The gradient ``g = d loss / d params`` is built once with ``create_graph=True``; each product is
    then ``H v = d (g . v) / d params`` (Pearlmutter 1994), computed with ``torch.autograd.grad`` so
    that no ``.grad`` attribute is ever written. With ``diag`` (a flat positive vector ``D``) the
    operator is the symmetrically preconditioned ``D^-1/2 H D^-1/2``, whose eigenvalues are those of
    ``D^-1 H``; for Adam, ``D`` is the preconditioner ``P`` of Cohen et al. 2022 (see
    :func:`gradwatch.functional.thresholds.adam_preconditioner`).

    The operator keeps the double-backward graph alive until :meth:`close` (or the end of a ``with``
    block). Double backward through attention needs the math SDPA kernel
    (``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``) around the construction.

    Args:
        loss_fn: Closure returning the scalar loss; called once, in the constructor.
        params: Tensors that require grad; the flat vector order is this order.
        diag: Optional flat positive vector ``D`` of length ``dim`` for ``D^-1/2 H D^-1/2``.

    Attributes:
        loss: The detached loss value the Hessian is taken at.
        dim: Number of scalar parameters.
        dtype: Dtype of the flat vectors (that of ``params[0]``).
        num_matvecs: Number of Hessian-vector products computed so far.
    """

    def __init__(self, loss_fn: Callable[[], Tensor], params: Sequence[Tensor], *,
                 diag: Tensor | None = None) -> None:
        self.params: tuple[Tensor, ...] = tuple(params)
        if not self.params:
            raise ValueError("HessianOperator needs at least one parameter, got an empty sequence.")
        self.dim = sum(p.numel() for p in self.params)
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        self.num_matvecs = 0
        self._inv_sqrt_diag: Tensor | None = None
        if diag is not None:
            if diag.shape != (self.dim,):
                raise ValueError(f"diag must have shape ({self.dim},), got {tuple(diag.shape)}.")
            if not bool((diag > 0).all()):
                raise ValueError("diag must be strictly positive.")
            self._inv_sqrt_diag = diag.detach().to(self.device, self.dtype).rsqrt()
        loss = loss_fn()
        grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        self.loss = loss.detach()
        # Gradients that do not depend on any parameter contribute nothing to H v.
        self._grads: list[tuple[int, Tensor]] | None = [
            (i, g) for i, g in enumerate(grads) if g is not None and g.requires_grad]

    def matvec(self, v: Tensor) -> Tensor:
        """Returns ``H v`` (or ``D^-1/2 H D^-1/2 v``) as a flat vector of dtype ``self.dtype``.

        ``v`` may have any floating dtype; it is cast to the operator's dtype and device.
        """
        if self._grads is None:
            raise RuntimeError("HessianOperator was closed; build a new one.")
        v = v.detach().to(self.device, self.dtype)
        if self._inv_sqrt_diag is not None:
            v = v * self._inv_sqrt_diag
        self.num_matvecs += 1
        hv: Sequence[Tensor | None] = [None] * len(self.params)
        if self._grads:
            vs = unflatten(v, self.params)
            hv = torch.autograd.grad([g for _, g in self._grads], self.params,
                                     grad_outputs=[vs[i] for i, _ in self._grads],
                                     retain_graph=True, allow_unused=True)
        flat = flatten([h.detach() if h is not None else torch.zeros_like(p)
                        for h, p in zip(hv, self.params)]).to(self.dtype)
        return flat * self._inv_sqrt_diag if self._inv_sqrt_diag is not None else flat

    __call__ = matvec
    __matmul__ = matvec

    def close(self) -> None:
        """Frees the double-backward graph; the operator cannot be used afterwards."""
        self._grads = None

    def __enter__(self) -> HessianOperator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class LanczosResult:
    """Top Ritz pairs from :func:`lanczos_top_eigenvalues`.

    Attributes:
        eigenvalues: ``(k,)`` largest algebraic Ritz values, descending.
        eigenvectors: ``(dim, k)`` unit Ritz vectors, column ``i`` for ``eigenvalues[i]``.
        residuals: ``(k,)`` residual norms ``||A x_i - theta_i x_i||``.
        num_matvecs: Operator applications used.
        converged: Whether ``residuals[i] <= tol * |eigenvalues[i]|`` for every ``i``.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    num_matvecs: int
    converged: bool


@dataclass(frozen=True)
class PowerIterationResult:
    """Result of :func:`power_iteration`: the eigenvalue of largest MAGNITUDE (with its sign)."""

    value: float
    vector: Tensor
    num_matvecs: int
    converged: bool


@dataclass(frozen=True)
class TraceEstimate:
    """A stochastic trace estimate with its standard error (``nan`` where not defined)."""

    estimate: float
    stderr: float
    num_matvecs: int


def _device(device: torch.device | str | None, init: Tensor | None, matvec: Matvec) -> torch.device:
    if device is not None:
        return torch.device(device)
    owner = getattr(matvec, "__self__", matvec)  # a bound HessianOperator.matvec or the operator
    return init.device if init is not None else torch.device(getattr(owner, "device", "cpu"))


def _generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator:
    # A private seeded generator keeps results reproducible and leaves the global RNG untouched.
    return generator if generator is not None else torch.Generator(device).manual_seed(0)


def _apply(matvec: Matvec, v: Tensor) -> Tensor:
    return matvec(v).detach().to(v.device, v.dtype).reshape(-1)


def _start_vector(init: Tensor | None, dim: int, gen: torch.Generator, dtype: torch.dtype,
                  device: torch.device) -> Tensor:
    q = None
    if init is not None:
        q = init.detach().to(device, dtype)
        q = q.sum(dim=1) if q.dim() == 2 else q.reshape(-1)  # (dim, k) warm start: span of columns
        if q.shape != (dim,):
            raise ValueError(f"init must have {dim} entries, got shape {tuple(init.shape)}.")
    if q is None or not bool(torch.isfinite(q).all()) or float(q.norm()) == 0.0:
        q = torch.randn(dim, generator=gen, dtype=dtype, device=gen.device).to(device)
    return q / q.norm()


def _orthogonalize(w: Tensor, basis: Sequence[Tensor]) -> Tensor:
    # Modified Gram-Schmidt, twice: "twice is enough" (Kahan; Parlett 1998).
    for _ in range(2):
        for b in basis:
            w = w - (b @ w) * b
    return w


def lanczos_top_eigenvalues(matvec: Matvec, dim: int, *, k: int = 1, max_iter: int = 100,
                            tol: float = 1e-4, init: Tensor | None = None,
                            generator: torch.Generator | None = None,
                            dtype: torch.dtype = torch.float64,
                            device: torch.device | str | None = None,
                            verify: bool = False) -> LanczosResult:
    """Largest algebraic eigenvalues of a symmetric operator by Lanczos with full reorthogonalisation.

    Builds an orthonormal Krylov basis ``Q_m`` of ``span{q, A q, ..., A^{m-1} q}`` with
    ``A Q_m = Q_m T_m + beta_m q_{m+1} e_m^T`` (``T_m`` tridiagonal), reorthogonalising each new
    vector twice against the whole basis (Parlett 1998). The Ritz pairs ``(theta_i, Q_m s_i)`` from
    ``T_m s_i = theta_i s_i`` have residual ``||A x_i - theta_i x_i|| = beta_m |s_i[m]|``; the
    iteration stops as soon as the ``k`` largest Ritz values all satisfy
    ``residual <= tol * |theta|`` (eigenvalue error is then about ``residual^2 / gap``). If
    ``beta`` vanishes (an invariant subspace) before ``k`` pairs exist, it restarts with a random
    vector orthogonal to the basis. Unlike power iteration this returns the largest *algebraic*
    eigenvalues, which is the sharpness of Cohen et al. 2021 even when the Hessian has a larger
    negative eigenvalue. Single-vector Lanczos finds one copy of a repeated eigenvalue.

    Args:
        matvec: ``v -> A v`` on flat vectors; receives vectors of ``dtype``, may return any dtype.
        dim: Dimension of the operator.
        k: Number of top eigenvalues.
        max_iter: Maximum Krylov dimension (= operator applications, without ``verify``).
        tol: Relative residual tolerance.
        init: Warm start, e.g. the previous top eigenvector (``(dim,)``, or ``(dim, k)`` whose
            columns are summed); a random Gaussian vector if None.
        generator: Random source for the start and restart vectors; a fixed-seed private generator
            if None (the global RNG is never used).
        dtype: Precision of the Krylov basis and of the results.
        device: Device of the basis; defaults to that of ``init``, else ``matvec.device`` if the
            operator has one (:class:`HessianOperator` does), else CPU.
        verify: Recompute the residuals with ``k`` extra products as ``||A x - theta x||``.

    Returns:
        A :class:`LanczosResult`; check ``converged``, never assume it.
    """
    if not 1 <= k <= dim:
        raise ValueError(f"k must be between 1 and dim={dim}, got {k}.")
    if max_iter < k:
        raise ValueError(f"max_iter must be at least k={k}, got {max_iter}.")
    device = _device(device, init, matvec)
    gen = _generator(generator, device)
    m_max = min(max_iter, dim)
    basis: list[Tensor] = []  # grown as needed: memory is (iterations used) x dim x itemsize
    alphas: list[float] = []
    betas: list[float] = []  # betas[j] couples basis[j] and basis[j + 1]
    q = _start_vector(init, dim, gen, dtype, device)
    norm_estimate, num_matvecs, converged = 0.0, 0, False
    for j in range(m_max):
        basis.append(q)
        w = _apply(matvec, q)
        num_matvecs += 1
        norm_estimate = max(norm_estimate, float(w.norm()))
        alphas.append(float(q @ w))
        w = _orthogonalize(w, basis)
        beta = float(w.norm())
        tri = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            tri += torch.diag(off, 1) + torch.diag(off, -1)
        theta, s = torch.linalg.eigh(tri)
        top = torch.arange(j, max(j - k, -1), -1)
        residuals = beta * s[-1, top].abs()
        breakdown = beta <= 1e-12 * max(norm_estimate, 1e-300)
        if j + 1 >= k and (breakdown or bool((residuals <= tol * theta[top].abs()).all())):
            converged = True
            break
        if j + 1 == m_max:
            break
        if breakdown:
            beta = 0.0
            w = _orthogonalize(torch.randn(dim, generator=gen, dtype=dtype, device=gen.device).to(device),
                               basis)
        betas.append(beta)
        q = w / w.norm()
    ritz = s[:, top].to(dtype=dtype, device=device)
    vectors = torch.zeros(dim, len(top), dtype=dtype, device=device)
    for b, coefficients in zip(basis, ritz):
        vectors.addr_(b, coefficients)
    vectors = vectors / vectors.norm(dim=0, keepdim=True)
    values = theta[top].to(dtype=dtype, device=device)
    residuals = residuals.to(dtype=dtype, device=device)
    if verify:
        residuals = torch.stack([(_apply(matvec, vectors[:, i]) - values[i] * vectors[:, i]).norm()
                                 for i in range(len(top))])
        num_matvecs += len(top)
        converged = bool((residuals <= tol * values.abs()).all())
    return LanczosResult(values, vectors, residuals, num_matvecs, converged)


def power_iteration(matvec: Matvec, dim: int, *, max_iter: int = 100, tol: float = 1e-3,
                    init: Tensor | None = None, generator: torch.Generator | None = None,
                    dtype: torch.dtype = torch.float64,
                    device: torch.device | str | None = None) -> PowerIterationResult:
    """Dominant eigenvalue by power iteration; a reference for :func:`lanczos_top_eigenvalues`.

    Iterates ``v <- A v / ||A v||`` and tracks the Rayleigh quotient ``theta = v^T A v``, stopping as
    PyHessian (Yao et al. 2020) does when ``|theta_t - theta_{t-1}| / (|theta_{t-1}| + 1e-6) < tol``.
    It converges to the eigenvalue of largest MAGNITUDE (returned with its sign), which can be a
    negative eigenvalue rather than the sharpness, and slowly when the top two magnitudes are close.

    Args:
        matvec: ``v -> A v`` on flat vectors.
        dim: Dimension of the operator.
        max_iter: Maximum number of products.
        tol: Relative change of the Rayleigh quotient that stops the iteration.
        init: Start vector; random Gaussian if None.
        generator: Random source; a fixed-seed private generator if None.
        dtype: Working precision.
        device: Working device; defaults to that of ``init``, else ``matvec.device``, else CPU.
    """
    device = _device(device, init, matvec)
    v = _start_vector(init, dim, _generator(generator, device), dtype, device)
    value, converged, n = math.nan, False, 0
    for n in range(1, max_iter + 1):
        w = _apply(matvec, v)
        previous, value = value, float(v @ w)
        norm = w.norm()
        if float(norm) == 0.0:
            converged = True
            break
        v = w / norm
        if abs(value - previous) / (abs(previous) + 1e-6) < tol:
            converged = True
            break
    return PowerIterationResult(value, v, n, converged)


def _rademacher(shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype,
                device: torch.device) -> Tensor:
    signs = torch.randint(0, 2, shape, generator=gen, device=gen.device).to(device, dtype)
    return 2.0 * signs - 1.0


def _mean_and_stderr(samples: Tensor) -> tuple[float, float]:
    n = samples.numel()
    stderr = float(samples.std(correction=1)) / math.sqrt(n) if n > 1 else math.nan
    return float(samples.mean()), stderr


def hutchinson_trace(matvec: Matvec, dim: int, *, num_samples: int,
                     generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64,
                     device: torch.device | str | None = None) -> TraceEstimate:
    """Hutchinson's trace estimate ``tr(A) ~ (1/n) sum_i z_i^T A z_i`` with Rademacher ``z_i``.

    Unbiased, with variance ``2 sum_{i != j} A_ij^2 / n`` (Hutchinson 1989). The standard error is the
    sample standard deviation over ``sqrt(n)`` (``nan`` for ``n = 1``).

    Args:
        matvec: ``v -> A v`` on flat vectors.
        dim: Dimension of the operator.
        num_samples: Number of probes (= operator applications).
        generator: Random source; a fixed-seed private generator if None.
        dtype: Working precision.
        device: Working device; defaults to ``matvec.device`` if present, else CPU.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}.")
    device = _device(device, None, matvec)
    probes = _rademacher((num_samples, dim), _generator(generator, device), dtype, device)
    samples = torch.stack([z @ _apply(matvec, z) for z in probes])
    return TraceEstimate(*_mean_and_stderr(samples), num_matvecs=num_samples)


def hutchpp_trace(matvec: Matvec, dim: int, *, num_matvecs: int,
                  generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64,
                  device: torch.device | str | None = None) -> TraceEstimate:
    """Hutch++ trace estimate (Meyer, Musco, Musco and Woodruff 2021).

    With ``s = num_matvecs // 3`` Rademacher sketch vectors ``S`` and ``Q = orth(A S)``,
    ``tr(A) ~ tr(Q^T A Q) + (1/r) sum_i g_i^T (I - QQ^T) A (I - QQ^T) g_i`` over the remaining
    ``r = num_matvecs - 2 s`` Rademacher probes ``g_i``. The first term captures the top of the
    spectrum exactly, so the error falls as ``1/num_matvecs`` instead of ``1/sqrt(num_matvecs)``.
    Because the conditional mean given ``Q`` is exactly ``tr(A)``, the reported standard error is that
    of the residual Hutchinson term (``nan`` if ``r = 1``). With ``num_matvecs < 3`` this is plain
    Hutchinson; with ``s >= dim`` the sketch spans everything and the estimate is exact.

    Args:
        matvec: ``v -> A v`` on flat vectors.
        dim: Dimension of the operator.
        num_matvecs: Budget of operator applications (all used unless ``3 * dim <= num_matvecs``).
        generator: Random source; a fixed-seed private generator if None.
        dtype: Working precision.
        device: Working device; defaults to ``matvec.device`` if present, else CPU.
    """
    if num_matvecs < 1:
        raise ValueError(f"num_matvecs must be at least 1, got {num_matvecs}.")
    s = min(num_matvecs // 3, dim)
    if s == 0:
        return hutchinson_trace(matvec, dim, num_samples=num_matvecs, generator=generator,
                                dtype=dtype, device=device)
    device = _device(device, None, matvec)
    gen = _generator(generator, device)
    sketch = _rademacher((s, dim), gen, dtype, device)
    q, _ = torch.linalg.qr(torch.stack([_apply(matvec, x) for x in sketch], dim=1))
    low_rank = sum(float(x @ _apply(matvec, x)) for x in q.T)
    r = num_matvecs - 2 * s
    if s == dim:  # Q spans the space; spend nothing more
        return TraceEstimate(low_rank, 0.0, 2 * s)
    probes = _rademacher((r, dim), gen, dtype, device)
    probes = probes - (probes @ q) @ q.T
    samples = torch.stack([g @ _apply(matvec, g) for g in probes])
    mean, stderr = _mean_and_stderr(samples)
    return TraceEstimate(low_rank + mean, stderr, num_matvecs)
