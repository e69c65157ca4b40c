"""Independent float64 references for what gradwatch logs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

# ---- gradient spectra ----------------------------------------------------------------------------------


def statistics_from_singular_values(s: Sequence[float] | np.ndarray, frobenius: float | None = None) -> dict[str, float]:
    """The six spectrum statistics from singular values, in float64 (effective rank: natural log, all values,
    p_i = s_i / sum s_j). ``frobenius`` (from the entries) replaces sqrt(sum s_i^2) where given."""
    s = np.sort(np.asarray(s, dtype=np.float64))[::-1]
    nuclear, top = float(s.sum()), float(s[0])
    fro = float(np.sqrt((s * s).sum())) if frobenius is None else frobenius
    p = s / nuclear
    p = p[p > 0]
    return {"nuclear_norm": nuclear, "spectral_norm": top, "frobenius_norm": fro, "stable_rank": fro ** 2 / top ** 2,
            "effective_rank": float(np.exp(-(p * np.log(p)).sum())), "top1_ratio": top / nuclear}


def svd_statistics(matrix: Tensor | np.ndarray) -> dict[str, float]:
    """The six spectrum statistics of a gradient matrix from a float64 NumPy SVD (conv kernels flattened to
    (out, in*k); the Frobenius norm from the entries)."""
    g = matrix.detach().double().cpu().numpy() if isinstance(matrix, Tensor) else np.asarray(matrix, np.float64)
    g = g.reshape(g.shape[0], -1)
    return statistics_from_singular_values(np.linalg.svd(g, compute_uv=False), float(np.sqrt((g * g).sum())))


# ---- Hessians ------------------------------------------------------------------------------------------


def dense_hessian(model: nn.Module, loss_of_params: Callable[[dict[str, Tensor]], Tensor], *, func: bool = False,
                  check: bool = False) -> Tensor:
    """The float64 dense Hessian of ``loss_of_params({name: tensor})`` over ``model``'s trainable parameters at
    their current values, flattened in ``named_parameters()`` order.

    ``func=True`` differentiates with ``torch.func.hessian``, else ``torch.autograd.functional.hessian`` (needed
    for LayerNorm: torch.func's jacfwd/jacrev Hessian through an affine LayerNorm whose input depends on the
    parameters is wrong in torch 2.13). ``check=True`` also checks the result against central differences of
    the gradient along a random direction (an independent check of the reference itself).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    sizes = [p.numel() for _, p in named]
    flat0 = torch.cat([p.detach().reshape(-1) for _, p in named]).double()

    def loss_of_flat(flat: Tensor) -> Tensor:
        pieces = torch.split(flat, sizes)
        return loss_of_params({n: piece.view(p.shape) for (n, p), piece in zip(named, pieces)})

    if func:
        return torch.func.hessian(loss_of_flat)(flat0)
    dense = torch.autograd.functional.hessian(loss_of_flat, flat0)
    if check:
        v = torch.randn(flat0.numel(), generator=torch.Generator().manual_seed(99), dtype=torch.float64)
        grad = torch.func.grad(loss_of_flat)
        fd = (grad(flat0 + 1e-5 * v) - grad(flat0 - 1e-5 * v)) / 2e-5
        assert torch.allclose(dense @ v, fd, rtol=1e-6, atol=1e-8)
    return dense


def dense_hessian_of_forward(model: nn.Module, loss_of_forward: Callable[[Callable[..., Any]], Tensor],
                             **options: Any) -> Tensor:
    """:func:`dense_hessian` of a loss written with the model's forward: ``loss_of_forward(forward)``, where
    ``forward(*inputs)`` runs ``model`` (its buffers and mode as they are) at the parameters differentiated."""
    return dense_hessian(model, lambda params: loss_of_forward(lambda *inputs: functional_call(model, params, inputs)),
                         **options)


def top_eigenvalue(matrix: Tensor) -> float:
    """The largest (algebraic) eigenvalue of a symmetric matrix."""
    return float(torch.linalg.eigvalsh(matrix)[-1])


# ---- fp16 ----------------------------------------------------------------------------------------------


def scaled_backward_gradients(loss: Tensor, params: Sequence[Tensor], scale: float) -> list[Tensor]:
    """The true gradients as fp16 loss scaling computes them: the backward of ``loss * scale`` (what
    ``GradScaler.scale(loss).backward()`` runs, so the same rounding and the same fp16 subnormals), divided by
    ``scale`` (a power of two: exact). Nothing is written to ``.grad``."""
    scaled = loss * torch.tensor(scale, dtype=torch.float32, device=loss.device)
    return [g / scale for g in torch.autograd.grad(scaled, list(params))]
