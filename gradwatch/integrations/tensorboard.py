"""TensorBoard sink: scalars under plain tags, a custom-scalars layout, layer-by-step heatmap images.

Plain tags plus ``add_custom_scalars`` multiline charts (one chart per statistic and layer family, every
layer on it) rather than ``add_scalars``, which makes one sub-run per key and clutters the run list.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

# A perceptually uniform ramp (viridis anchor points), so heatmaps need no matplotlib.
_RAMP = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)
_NAN_COLOR = np.array([255, 0, 255], dtype=np.float64)


def heatmap_image(values: np.ndarray, log_scale: bool, cell: int = 6) -> np.ndarray:
    """RGB image (3, H, W) uint8 of a (layers x steps) array; NaN/inf cells in magenta.

    Rows are layers in model order (top = first layer), columns are logging events, left to right.
    Colours span the finite range (log10 of it for norms).
    """
    v = np.asarray(values, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        v = np.log10(np.where(v > 0, v, np.nan)) if log_scale else v
    finite = np.isfinite(v)
    lo, hi = (np.nanmin(v[finite]), np.nanmax(v[finite])) if finite.any() else (0.0, 1.0)
    t = np.clip((v - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    pos = np.where(finite, t, 0) * (len(_RAMP) - 1)
    i = np.clip(np.floor(pos).astype(int), 0, len(_RAMP) - 2)
    frac = (pos - i)[..., None]
    rgb = _RAMP[i] * (1 - frac) + _RAMP[i + 1] * frac
    rgb[~finite] = _NAN_COLOR
    rgb = np.repeat(np.repeat(rgb, cell, axis=0), cell, axis=1)
    return rgb.round().astype(np.uint8).transpose(2, 0, 1)


class TensorBoardSink:
    """Writes gradwatch results with a ``SummaryWriter``.

    Args:
        writer: an open ``torch.utils.tensorboard.SummaryWriter`` (or tensorboardX's) to share with the
            host; it is flushed, never closed, by this sink.
        log_dir: open a writer of our own here instead (closed by :meth:`close`).
    """

    def __init__(self, writer: Any = None, log_dir: str | None = None) -> None:
        if (writer is None) == (log_dir is None):
            raise ValueError("gradwatch: TensorBoardSink expected exactly one of `writer` or `log_dir`, got "
                             f"writer={writer!r}, log_dir={log_dir!r}")
        self._owns = writer is None
        if writer is None:
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(str(log_dir), exist_ok=True)
            writer = SummaryWriter(log_dir=str(log_dir))
        self.writer = writer

    @property
    def log_dir(self) -> str:
        return str(getattr(self.writer, "log_dir", None) or self.writer.get_logdir())

    def write_layout(self, layout: dict[str, dict[str, list]]) -> None:
        if layout:
            self.writer.add_custom_scalars(layout)

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)

    def log_heatmap(self, name: str, step: int, values: np.ndarray, labels: Sequence[str],
                    steps: Sequence[int], log_scale: bool) -> None:
        self.writer.add_image(name, heatmap_image(values, log_scale), step, dataformats="CHW")
        rows = "\n".join(f"| {i} | `{label}` |" for i, label in enumerate(labels))
        scale = "log10 of the value" if log_scale else "the value"
        self.writer.add_text(name, f"Rows (top to bottom) are layers, columns are steps {steps[0]}..{steps[-1]} "
                                   f"({len(steps)} points); colour is {scale}, dark = low, yellow = high, "
                                   f"magenta = NaN.\n\n| row | layer |\n|---|---|\n{rows}", step)

    def log_text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        if self._owns:
            self.writer.close()
        else:
            self.writer.flush()
