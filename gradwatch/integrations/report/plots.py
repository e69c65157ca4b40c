"""Drawing the report's figures (matplotlib's Agg canvas, :mod:`gradwatch.integrations.figures`) and saving
them as PNGs beside the page."""

from __future__ import annotations

import html
import math
import re
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gradwatch.integrations.report.compare import Comparison
from gradwatch.integrations.report.runs import _LAYER_INDEX, Run

LOG_SCALE_STATS = ("nuclear_norm", "spectral_norm", "frobenius_norm")  # norms span decades across layers




class _Figures:
    """Saves figures as PNGs under ``out/figures`` and hands back their ``<img>`` tags."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.dir = out / "figures"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.count = 0

    def save(self, fig: Any, stem: str, alt: str) -> str:
        self.count += 1
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("_")[:80] or "figure"
        name = f"{self.count:03d}_{slug}.png"
        fig.savefig(self.dir / name, format="png", dpi=fig.dpi)
        width, height = (int(round(x)) for x in fig.get_size_inches() * fig.dpi)
        return (f'<img src="figures/{html.escape(name)}" alt="{html.escape(alt)}" width="{width}" '
                f'height="{height}">')


    def save_png(self, png: bytes, stem: str, alt: str) -> str:
        """An already encoded PNG (a logged TensorBoard image), shown at twice its size, pixels kept sharp."""
        self.count += 1
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("_")[:80] or "figure"
        name = f"{self.count:03d}_{slug}.png"
        (self.dir / name).write_bytes(png)
        width, height = struct.unpack(">II", png[16:24]) if png[:8] == b"\x89PNG\r\n\x1a\n" else (0, 0)
        size = f' width="{2 * width}" height="{2 * height}"' if width else ""
        return (f'<img src="figures/{html.escape(name)}" alt="{html.escape(alt)}"{size} '
                'style="image-rendering: pixelated">')


def _finite_positive(values: Iterable[np.ndarray]) -> bool:
    return all(bool(np.all(v[np.isfinite(v)] > 0)) for v in values)


def _line_figure(lines: Sequence[tuple[str, np.ndarray, np.ndarray, dict]], title: str, ylabel: str,
                 log_y: bool = False, xlabel: str = "optimizer step", width: float = 8.0, height: float = 3.4) -> Any:
    from gradwatch.integrations.figures import new_figure

    fig = new_figure(width, height)
    ax = fig.add_subplot()
    for label, x, y, style in lines:
        ax.plot(x, y, label=label, marker="o" if len(x) < 30 else None, markersize=3, **style)
    if log_y and _finite_positive([y for _, _, y, _ in lines]):
        ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if len(lines) > 1 or lines and lines[0][0]:
        ax.legend(fontsize=7, loc="best")
    return fig


def _small_multiples(run: Run, tags: Sequence[str], title: str, strip: str = "") -> Any:
    """One panel per tag, sharing the step axis."""
    from gradwatch.integrations.figures import new_figure

    fig = new_figure(8.0, 0.4 + 1.6 * len(tags))
    axes = fig.subplots(len(tags), 1, sharex=True, squeeze=False)[:, 0]
    for ax, tag in zip(axes, tags):
        s = run.scalars[tag]
        ax.plot(s.steps, s.values, marker="o" if len(s.steps) < 30 else None, markersize=3)
        ax.set_ylabel(tag.removeprefix(strip), fontsize=8, rotation=0, ha="right", va="center")
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("optimizer step")
    fig.suptitle(title, fontsize=10)
    return fig


def _fmt(value: Any) -> str:
    """A number as the report writes it, in figure titles and the pages' tables (4 significant digits)."""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _layer_axis(params: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    labels = []
    for p in params:
        idx = _LAYER_INDEX.findall(p)
        labels.append(".".join(idx) if idx else p.rsplit(".", 2)[0][-12:])
    return np.arange(len(params)), labels


def _layer_profile_figure(c: Comparison, name_a: str, name_b: str) -> Any:
    """Both runs' per-layer averages of one statistic and layer family, layer by layer, with their RD."""
    from gradwatch.integrations.figures import new_figure

    x, labels = _layer_axis(c.params)
    fig = new_figure(8.0, 3.2)
    ax = fig.add_subplot()
    ax.plot(x, c.a, marker="o", markersize=4, label=f"A: {name_a}")
    ax.plot(x, c.b, marker="s", markersize=4, label=f"B: {name_b}")
    if c.statistic.split("/")[-1] in LOG_SCALE_STATS and _finite_positive([c.a, c.b]):
        ax.set_yscale("log")
    step = max(1, len(x) // 24)
    ax.set_xticks(x[::step], labels[::step], fontsize=7)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"{c.statistic} (mean over steps)")
    ax.set_title(f"{c.statistic}  ·  {c.family}   RD = {_fmt(c.rd)}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return fig
