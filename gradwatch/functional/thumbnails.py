"""Small pictures of probe examples, for the signals pairs table (pure tensor code)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

IMAGE_KEYS = ("pixel_values", "image", "images", "img")
MIN_SIDE = 4


def _chw(t: Tensor) -> Tensor | None:
    if t.ndim == 3 and t.shape[0] in (1, 3) and min(t.shape[1:]) >= MIN_SIDE:
        return t
    if t.ndim == 3 and t.shape[-1] in (1, 3) and min(t.shape[:2]) >= MIN_SIDE:
        return t.permute(2, 0, 1)
    return None


def as_image(example: Any) -> Tensor | None:
    """The picture in a probe example as a (C, H, W) tensor (C = 1 or 3), or None.

    Read as pictures: a tensor of shape (C, H, W) or (H, W, C) with C = 1 or 3 and both sides at least 4; in
    an ``(input, target)`` pair, the input; in a mapping, its ``pixel_values``/``image``/``images``/``img``
    entry, where a 2-D (H, W) tensor is a grey picture too. Anything else (token ids, feature vectors) is not.
    """
    if isinstance(example, Mapping):
        for key in IMAGE_KEYS:
            value = example.get(key)
            if isinstance(value, Tensor):
                if value.ndim == 2 and min(value.shape) >= MIN_SIDE:
                    return value[None]
                return _chw(value)
        return None
    if isinstance(example, (tuple, list)) and example:
        example = example[0]
    if isinstance(example, Tensor) and (example.is_floating_point() or example.dtype == torch.uint8):
        return _chw(example)
    return None


def thumbnail(image: Tensor, size: int) -> Tensor:
    """``image`` (C, H, W) as a (3, size, size) float picture in [0, 1]: its own min-max range (a flat picture is
    mid grey), the longer side scaled to ``size`` (nearest-neighbour when enlarging, so pixels stay sharp;
    area averaging when shrinking), centred on a black square."""
    x = image.detach().to("cpu", torch.float32)
    lo, hi = x.min(), x.max()
    x = (x - lo) / (hi - lo) if hi > lo else torch.full_like(x, 0.5)
    x = x.expand(3, -1, -1) if x.shape[0] == 1 else x
    h, w = x.shape[1:]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    mode = "nearest" if scale >= 1 else "area"
    x = F.interpolate(x[None], size=(nh, nw), mode=mode)[0]
    out = torch.zeros(3, size, size)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[:, top:top + nh, left:left + nw] = x
    return out


def thumbnail_grid(rows: Sequence[Sequence[Tensor]], size: int = 32, pad: int = 2) -> Tensor:
    """A (3, H, W) picture in [0, 1]: one row of :func:`thumbnail` per entry of ``rows`` (left-aligned, rows of
    different lengths allowed), ``pad`` pixels of white between and around them."""
    columns = max((len(r) for r in rows), default=0)
    height = pad + len(rows) * (size + pad)
    width = pad + columns * (size + pad)
    grid = torch.ones(3, height, width)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            top, left = pad + i * (size + pad), pad + j * (size + pad)
            grid[:, top:top + size, left:left + size] = thumbnail(image, size)
    return grid


__all__ = ["as_image", "thumbnail", "thumbnail_grid"]
