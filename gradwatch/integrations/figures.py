"""Figures drawn with matplotlib (an optional dependency) for the TensorBoard sink and the HTML report.

Everything here draws on a :class:`matplotlib.figure.Figure` with its own Agg canvas: pyplot is never
imported, so the user's matplotlib backend and global figure state are left alone, and drawing works
without a display. Where matplotlib is not installed, :func:`heatmap_figure` returns ``None`` and the
caller falls back to the plain image (``gradwatch.integrations.tensorboard.heatmap_image``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

NAN_COLOR = "#ff00ff"  # magenta, as in the plain heatmap image: NaN, inf, and values <= 0 on a log scale
CMAP = "viridis"
MAX_ROW_LABELS = 48  # beyond this, label every k-th row so the labels stay legible
MAX_STEP_TICKS = 10


def matplotlib_available() -> bool:
    """Whether matplotlib can be imported (the figures need it; callers fall back to plain images)."""
    try:
        import matplotlib  # noqa: F401
        import matplotlib.backends.backend_agg  # noqa: F401
        import matplotlib.figure  # noqa: F401
    except ImportError:
        return False
    return True


def new_figure(width: float, height: float, dpi: int = 100) -> Any:
    """A ``Figure`` of ``width`` x ``height`` inches on an Agg canvas, outside pyplot."""
    import matplotlib  # noqa: F401  (first, so a missing matplotlib fails here with ImportError)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_to_rgb(fig: Any) -> np.ndarray:
    """Rasterise a figure: uint8 RGB, shape (H, W, 3)."""
    fig.canvas.draw()
    return np.array(fig.canvas.buffer_rgba(), dtype=np.uint8)[..., :3].copy()


def _label_positions(n: int, most: int) -> list[int]:
    if n <= most:
        return list(range(n))
    stride = int(np.ceil(n / most))
    return list(range(0, n, stride))


def heatmap_plot(values: np.ndarray, row_labels: Sequence[str], steps: Sequence[int], title: str = "",
                 log_scale: bool = False, colorbar_label: str = "") -> Any:
    """The layer-by-step heatmap as a matplotlib ``Figure`` (see :func:`heatmap_figure`)."""
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm, Normalize

    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2:
        raise ValueError(f"gradwatch: heatmap values expected a 2-D array (layers x steps), got shape {v.shape}")
    if len(row_labels) != v.shape[0] or len(steps) != v.shape[1]:
        raise ValueError(f"gradwatch: heatmap of shape {v.shape} expected {v.shape[0]} row labels and "
                         f"{v.shape[1]} steps, got {len(row_labels)} and {len(steps)}")
    shown = v > 0 if log_scale else np.ones(v.shape, dtype=bool)
    finite = np.isfinite(v) & shown
    masked = np.ma.masked_array(v, mask=~finite)
    lo, hi = (float(v[finite].min()), float(v[finite].max())) if finite.any() else (1.0, 10.0)
    if hi <= lo:  # one value everywhere: widen the range so the colour bar has an extent
        lo, hi = (lo / 2, hi * 2) if log_scale else (lo - 0.5, hi + 0.5)
    norm = LogNorm(vmin=lo, vmax=hi) if log_scale else Normalize(vmin=lo, vmax=hi)
    cmap = colormaps[CMAP].with_extremes(bad=NAN_COLOR)

    n_rows, n_cols = v.shape
    longest = max((len(str(label)) for label in row_labels), default=4)
    label_rows = _label_positions(n_rows, MAX_ROW_LABELS)
    width = min(16.0, 6.5 + 0.065 * longest)
    height = min(16.0, 1.6 + 0.2 * len(label_rows))
    fig = new_figure(width, max(height, 2.8))
    ax = fig.add_subplot()
    image = ax.imshow(masked, aspect="auto", interpolation="nearest", cmap=cmap, norm=norm)
    ax.set_yticks(label_rows, [str(row_labels[i]) for i in label_rows], fontsize=7)
    cols = _label_positions(n_cols, MAX_STEP_TICKS)
    ax.set_xticks(cols, [str(int(steps[i])) for i in cols], fontsize=8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("layer")
    if title:
        ax.set_title(title, fontsize=10)
    bar = fig.colorbar(image, ax=ax, extend="neither")
    says_log = "log" in colorbar_label.lower()
    bar.set_label(colorbar_label + (" (log scale)" if log_scale and colorbar_label and not says_log else ""))
    if (~finite).any():  # the colour outside the map, named under the colour bar
        bar.ax.set_xlabel("NaN/inf\nor <= 0" if log_scale else "NaN/inf", color=NAN_COLOR, fontsize=7,
                          fontweight="bold")
    return fig


def heatmap_figure(values: np.ndarray, row_labels: Sequence[str], steps: Sequence[int], title: str = "",
                   log_scale: bool = False, colorbar_label: str = "") -> np.ndarray | None:
    """A layer-by-step heatmap a person can read, as an image for ``SummaryWriter.add_image``.

    Rows are layers (``row_labels`` on the y axis, top = first), columns are logging events (their optimizer
    step on the x axis), colour is the value on a linear or log scale with a labelled colour bar; NaN and inf
    cells (and values <= 0 on a log scale) are magenta, outside the colour map.

    Args:
        values: array (layers x steps).
        row_labels: one name per row.
        steps: one optimizer step per column.
        title: drawn above the map.
        log_scale: colour by log10 of the value (for norms spanning decades).
        colorbar_label: what the colour means (e.g. the statistic's name); " (log scale)" is appended on a
            log scale unless the label already says "log". The colour bar's ticks are the values themselves
            (on a log axis when ``log_scale``), not their log10.

    Returns:
        uint8 RGB array of shape (H, W, 3) (``add_image(..., dataformats="HWC")``), or ``None`` when
        matplotlib is not installed (then use the plain ``heatmap_image``).
    """
    if not matplotlib_available():
        return None
    fig = heatmap_plot(values, row_labels, steps, title, log_scale, colorbar_label)
    return figure_to_rgb(fig)
