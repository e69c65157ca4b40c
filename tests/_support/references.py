"""Independent float64 references for what gradwatch logs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


def svd_statistics(matrix: Tensor | np.ndarray) -> dict[str, float]:
    """The six spectrum statistics of a gradient matrix from a float64 NumPy SVD (conv kernels flattened to
    (out, in*k))."""
    g = matrix.detach().double().cpu().numpy() if isinstance(matrix, Tensor) else np.asarray(matrix, np.float64)
    g = g.reshape(g.shape[0], -1)
    s = np.linalg.svd(g, compute_uv=False)
    fro = float(np.sqrt((g * g).sum()))
    p = s / s.sum()
    p = p[p > 0]
    return {"nuclear_norm": float(s.sum()), "spectral_norm": float(s[0]), "frobenius_norm": fro,
            "stable_rank": fro ** 2 / float(s[0]) ** 2, "effective_rank": float(np.exp(-(p * np.log(p)).sum())),
            "top1_ratio": float(s[0] / s.sum())}


def scaled_backward_gradients(loss: Tensor, params: Sequence[Tensor], scale: float) -> list[Tensor]:
    """The true gradients as fp16 loss scaling computes them: the backward of ``loss * scale`` (what
    ``GradScaler.scale(loss).backward()`` runs, so the same rounding and the same fp16 subnormals), divided by
    ``scale`` (a power of two: exact). Nothing is written to ``.grad``."""
    scaled = loss * torch.tensor(scale, dtype=torch.float32, device=loss.device)
    return [g / scale for g in torch.autograd.grad(scaled, list(params))]
