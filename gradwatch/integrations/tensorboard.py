"""TensorBoard sink: scalars under plain tags, a custom-scalars layout from the chart hints, histograms,
text (tables, alerts) and layer-by-step heatmap images, whose column history this sink keeps.

Plain tags plus ``add_custom_scalars`` multiline charts (one chart per statistic and layer family, every
layer on it) rather than ``add_scalars``, which makes one sub-run per key and clutters the run list.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gradwatch.engine.sinks import Emission
from gradwatch.metrics.base import Alert, Chart, ChartGroup, Heatmap

MAX_HEATMAP_COLUMNS = 512

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


def custom_scalar_layout(charts: Sequence[Chart]) -> dict[str, dict[str, list]]:
    """TensorBoard's custom-scalars schema ``{category: {title: ["Multiline", [regex, ...]]}}`` from the chart
    hints, categories in the order the diagnostics gave them (the engine's ``gradwatch`` one last)."""
    layout: dict[str, dict[str, list]] = {}
    for c in charts:
        if isinstance(c, ChartGroup):
            layout.setdefault(c.category, {})[c.title] = ["Multiline", ["^" + re.escape(t) + "$" for t in c.tags]]
    if "gradwatch" in layout:
        layout["gradwatch"] = layout.pop("gradwatch")
    return layout


def alert_markdown(alert: Alert) -> str:
    """An alert as a TensorBoard text entry: what was seen, the evidence, what usually helps."""
    evidence = "\n".join(f"| {k} | {v} |" for k, v in alert.evidence.items())
    remedies = "\n".join(f"- {r}" for r in alert.remedies)
    return (f"**{alert.severity}** `{alert.rule}` at step {alert.step}: {alert.message}\n\n"
            + (f"| evidence | value |\n|---|---|\n{evidence}\n\n" if evidence else "")
            + (f"What usually helps:\n{remedies}" if remedies else ""))


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
        self.heatmaps: list[Heatmap] = []
        self._history: dict[str, tuple[list[int], list[np.ndarray]]] = {}
        self._heatmap_due: set[str] = set()
        self._last_step = 0

    @property
    def log_dir(self) -> str:
        return str(getattr(self.writer, "log_dir", None) or self.writer.get_logdir())

    def open(self, charts: Sequence[Chart]) -> None:
        layout = custom_scalar_layout(charts)
        if layout:
            self.writer.add_custom_scalars(layout)
        self.heatmaps = [c for c in charts if isinstance(c, Heatmap)]

    def write(self, step: int, emission: Emission) -> None:
        for tag, value in emission.scalars.items():
            self.writer.add_scalar(tag, value, step)
        for tag, values in emission.vectors.items():
            finite = values[np.isfinite(values)]
            if finite.size:
                self.writer.add_histogram(tag, finite, step)
        for tag, text in emission.texts.items():
            self.writer.add_text(tag, text, step)
        for tag, image in emission.images.items():
            self.writer.add_image(tag, image, step, dataformats="CHW")
        for alert in emission.alerts:
            self.writer.add_text("gradwatch/alerts", alert_markdown(alert), step)
        self._record_heatmaps(step, emission.scalars)

    # ---- heatmaps: the sink keeps the columns ---------------------------------------------------

    def _record_heatmaps(self, step: int, scalars: Mapping[str, float]) -> None:
        for hm in self.heatmaps:
            # due at any step since the last write: drawn now (a heatmap due while work was postponed waits)
            if any(hm.every.is_due(s) for s in range(self._last_step + 1, step + 1)):
                self._heatmap_due.add(hm.name)
            if not any(t in scalars for t in hm.rows):
                continue
            steps, cols = self._history.setdefault(hm.name, ([], []))
            steps.append(step)
            cols.append(np.array([scalars.get(t, np.nan) for t in hm.rows], dtype=np.float64))
            del steps[:-MAX_HEATMAP_COLUMNS], cols[:-MAX_HEATMAP_COLUMNS]
            if hm.name in self._heatmap_due:
                self._heatmap_due.discard(hm.name)  # one column is not yet a picture: wait for the next due step
                if len(steps) >= 2:
                    self.log_heatmap(hm.name, step, np.stack(cols, axis=1), hm.labels, list(steps), hm.log_scale)
        self._last_step = step

    def log_heatmap(self, name: str, step: int, values: np.ndarray, labels: Sequence[str],
                    steps: Sequence[int], log_scale: bool) -> None:
        """One heatmap image: matplotlib's labelled figure where it is installed, else the plain image plus a
        text entry naming the rows."""
        from gradwatch.integrations.figures import heatmap_figure

        scale = "log10 of the value" if log_scale else "the value"
        picture = heatmap_figure(values, labels, steps, title=name, log_scale=log_scale,
                                 colorbar_label=f"{name.rsplit('/', 1)[-1]} ({scale})")
        if picture is not None:
            self.writer.add_image(name, picture, step, dataformats="HWC")
            return
        self.writer.add_image(name, heatmap_image(values, log_scale), step, dataformats="CHW")
        rows = "\n".join(f"| {i} | `{label}` |" for i, label in enumerate(labels))
        self.writer.add_text(name, f"Rows (top to bottom) are layers, columns are steps {steps[0]}..{steps[-1]} "
                                   f"({len(steps)} points); colour is {scale}, dark = low, yellow = high, "
                                   f"magenta = NaN.\n\n| row | layer |\n|---|---|\n{rows}", step)

    def resume(self, step: int) -> None:
        """The run resumes at ``step``. A writer of our own (``log_dir``) writes what ``SummaryWriter(purge_step=
        step + 1)`` writes, a session start at ``step + 1``: TensorBoard then drops the events at and past it
        that the interrupted run wrote after its checkpoint. A host's writer is the host's to purge (Lightning
        and the Hugging Face Trainer do not): its event files keep both values of such a step, and gradwatch's
        readers (``gradwatch report``, ``compare``) take the last written, the resumed run's."""
        if not self._owns:
            return
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog

        self.writer._get_file_writer().add_event(Event(step=step + 1, session_log=SessionLog(status=SessionLog.START)))

    def state_dict(self) -> dict[str, Any]:
        return {"heatmaps": {k: (list(s), [c.tolist() for c in cols]) for k, (s, cols) in self._history.items()},
                "heatmap_due": sorted(self._heatmap_due), "last_step": self._last_step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._history = {k: (list(s), [np.asarray(c, dtype=np.float64) for c in cols])
                         for k, (s, cols) in state.get("heatmaps", {}).items()}
        self._heatmap_due = set(state.get("heatmap_due", []))
        self._last_step = int(state.get("last_step", 0))

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        if self._owns:
            self.writer.close()
        else:
            self.writer.flush()
