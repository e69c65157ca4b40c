"""Heatmaps drawn with matplotlib: the image, its labels, NaN cells, and the fallback without matplotlib."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from gradwatch.integrations import figures

pytest.importorskip("matplotlib")

MAGENTA = (255, 0, 255)
LABELS = [f"model.layers.{i}.attn.q_proj.weight" for i in range(4)]
STEPS = [1, 10, 20, 30, 40]


def values(nan: bool = False) -> np.ndarray:
    v = np.arange(1.0, 21.0).reshape(4, 5)
    if nan:
        v[1, 2] = np.nan
    return v


def magenta_pixels(img: np.ndarray) -> int:
    return int(np.all(img == MAGENTA, axis=-1).sum())


def test_heatmap_figure_is_an_rgb_image() -> None:
    img = figures.heatmap_figure(values(), LABELS, STEPS, title="nuclear_norm", log_scale=True,
                                 colorbar_label="nuclear_norm")
    assert img is not None and img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert img.shape[0] > 200 and img.shape[1] > 400
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 20  # a drawn figure, not a flat colour
    assert magenta_pixels(img) == 0  # no NaN, no magenta


def test_nan_cells_render_magenta() -> None:
    img = figures.heatmap_figure(values(nan=True), LABELS, STEPS, title="t", log_scale=False, colorbar_label="v")
    assert magenta_pixels(img) > 400  # one cell of a ~600x300 px map, plus the "NaN/inf" note
    log = figures.heatmap_figure(np.array([[1.0, -2.0], [0.0, 4.0]]), ["a", "b"], [1, 2], log_scale=True)
    assert magenta_pixels(log) > 400  # values <= 0 have no log: shown like NaN


def test_heatmap_plot_labels_axes_and_colour_bar() -> None:
    from matplotlib.colors import LogNorm

    fig = figures.heatmap_plot(values(nan=True), LABELS, STEPS, title="nuclear_norm · layers.*.q",
                               log_scale=True, colorbar_label="nuclear norm")
    ax, bar = fig.axes
    fig.canvas.draw()
    assert [t.get_text() for t in ax.get_yticklabels()] == LABELS
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(s) for s in STEPS]
    assert ax.get_xlabel() == "optimizer step" and ax.get_ylabel() == "layer"
    assert ax.get_title() == "nuclear_norm · layers.*.q"
    assert bar.get_ylabel() == "nuclear norm (log scale)"
    assert "NaN" in bar.get_xlabel()  # says what the colour outside the map means
    labelled = figures.heatmap_plot(values(), LABELS, STEPS, log_scale=True, colorbar_label="norm, log axis")
    assert labelled.axes[1].get_ylabel() == "norm, log axis"  # already says log: nothing appended
    image = ax.get_images()[0]
    assert isinstance(image.norm, LogNorm) and image.norm.vmin == 1.0 and image.norm.vmax == 20.0
    assert image.get_array().mask[1, 2]  # the NaN cell is masked, drawn in the "bad" colour
    rgba = image.cmap(np.ma.masked_invalid([np.nan]))[0]
    assert tuple(round(255 * c) for c in rgba[:3]) == MAGENTA


def test_many_layers_and_steps_keep_labels_legible() -> None:
    n_rows, n_cols = 120, 300
    fig = figures.heatmap_plot(np.random.default_rng(0).random((n_rows, n_cols)), [f"l.{i}.w" for i in range(n_rows)],
                               list(range(1, n_cols + 1)), title="", log_scale=False, colorbar_label="x")
    ax = fig.axes[0]
    assert len(ax.get_yticks()) <= figures.MAX_ROW_LABELS and ax.get_yticklabels()[0].get_text() == "l.0.w"
    assert len(ax.get_xticks()) <= figures.MAX_STEP_TICKS
    assert fig.get_size_inches()[1] <= 16.0


def test_degenerate_inputs() -> None:
    assert figures.heatmap_figure(np.full((2, 3), np.nan), ["a", "b"], [1, 2, 3], log_scale=True) is not None
    assert figures.heatmap_figure(np.ones((1, 1)), ["a"], [5]) is not None  # one value: the range is widened
    with pytest.raises(ValueError, match="expected 2 row labels and 3 steps"):
        figures.heatmap_figure(np.ones((2, 3)), ["a"], [1, 2, 3])
    with pytest.raises(ValueError, match="2-D array"):
        figures.heatmap_figure(np.ones(3), ["a"], [1, 2, 3])


def test_without_matplotlib_returns_none(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert not figures.matplotlib_available()
    assert figures.heatmap_figure(values(), LABELS, STEPS, title="t", log_scale=True, colorbar_label="v") is None
