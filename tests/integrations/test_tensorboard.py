"""The TensorBoard sink: heatmap images, scalars, images and text read back from the event files."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

from gradwatch.engine.sinks import Emission  # noqa: E402
from gradwatch.integrations.tensorboard import TensorBoardSink, heatmap_image  # noqa: E402
from gradwatch.metrics.base import Alert, ChartGroup  # noqa: E402

DARK = (68, 1, 84)  # low end of the ramp
YELLOW = (253, 231, 37)  # high end
MAGENTA = (255, 0, 255)  # NaN / inf / non-positive under log scale
MIDDLE = (33, 145, 140)  # the ramp's middle anchor


def cell_colour(img: np.ndarray, row: int, col: int, cell: int) -> tuple[int, ...]:
    block = img[:, row * cell:(row + 1) * cell, col * cell:(col + 1) * cell]
    first = block[:, 0, 0]
    assert (block == first[:, None, None]).all(), "a cell is not one flat colour"
    return tuple(int(c) for c in first)


KNOWN = np.array([[1.0, 10.0, 100.0, np.nan],
                  [1e4, 1e2, 1.0, 1e3],
                  [1e2, 1e2, 1e2, 1e1]])


@pytest.mark.parametrize("cell", [1, 6])
def test_heatmap_known_array_log_scale(cell: int) -> None:
    img = heatmap_image(KNOWN, log_scale=True, cell=cell)
    assert img.shape == (3, 3 * cell, 4 * cell) and img.dtype == np.uint8
    assert cell_colour(img, 0, 3, cell) == MAGENTA  # NaN
    assert cell_colour(img, 0, 0, cell) == DARK  # min (1) is dark
    assert cell_colour(img, 1, 2, cell) == DARK
    assert cell_colour(img, 1, 0, cell) == YELLOW  # max (1e4) is yellow
    # log scale: 100 is half way between 1 and 1e4, so it takes the middle anchor exactly
    for col in range(3):
        assert cell_colour(img, 2, col, cell) == MIDDLE
    # order along the ramp follows the value: 10 is darker (smaller green) than 100, 1e3 brighter
    g = {v: cell_colour(img, r, c, cell)[1] for (r, c), v in np.ndenumerate(KNOWN) if np.isfinite(v)}
    assert g[1.0] < g[10.0] < g[100.0] < g[1e3] < g[1e4]


def test_heatmap_linear_scale_differs_and_nonpositive() -> None:
    lin = heatmap_image(KNOWN, log_scale=False, cell=1)
    # linear: 100 is ~1% of the way to 1e4, close to the dark end, not the middle
    r, g, b = cell_colour(lin, 2, 0, 1)
    assert np.allclose((r, g, b), DARK, atol=6)
    assert cell_colour(lin, 1, 0, 1) == YELLOW and cell_colour(lin, 0, 3, 1) == MAGENTA
    values = np.array([[-1.0, 0.0, 2.0], [np.inf, 4.0, 8.0]])
    log = heatmap_image(values, log_scale=True, cell=2)
    assert cell_colour(log, 0, 0, 2) == MAGENTA and cell_colour(log, 0, 1, 2) == MAGENTA  # log of <= 0
    assert cell_colour(log, 1, 0, 2) == MAGENTA  # inf
    assert cell_colour(log, 0, 2, 2) == DARK and cell_colour(log, 1, 2, 2) == YELLOW
    assert cell_colour(log, 1, 1, 2) == MIDDLE  # log2(4) is half way between log2(2) and log2(8)
    lin = heatmap_image(values, log_scale=False, cell=2)
    assert cell_colour(lin, 0, 0, 2) == DARK and cell_colour(lin, 0, 1, 2) != MAGENTA


def test_heatmap_degenerate_inputs() -> None:
    all_nan = heatmap_image(np.full((2, 2), np.nan), log_scale=True, cell=3)
    assert all_nan.shape == (3, 6, 6) and (all_nan.transpose(1, 2, 0) == MAGENTA).all()
    constant = heatmap_image(np.full((2, 3), 5.0), log_scale=True, cell=1)
    assert (constant.transpose(1, 2, 0) == DARK).all()  # no division by zero, one colour


def _accumulator(log_dir: str) -> EventAccumulator:
    ea = EventAccumulator(log_dir, size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    ea.Reload()
    return ea


def test_sink_with_own_writer_writes_scalars_image_text(tmp_path: Any) -> None:
    from tbparse import SummaryReader

    log_dir = str(tmp_path / "run")
    sink = TensorBoardSink(log_dir=log_dir)
    assert sink.log_dir == log_dir
    pattern = "^grad_spectrum/nuclear_norm/a\\.0\\.w$"
    sink.open([ChartGroup("gradwatch", "overhead", ("gradwatch/overhead",)),
               ChartGroup("grad_spectrum/nuclear_norm", "nuclear_norm | a.*.w", ("grad_spectrum/nuclear_norm/a.0.w",))])
    sink.write(1, Emission(scalars={"grad_spectrum/nuclear_norm/a.0.w": 1.5, "gradwatch/overhead": 0.01}))
    alert = Alert("toy/rule", "warning", "something grew", {"value": 3.5}, ["lower lr from 1e-2"], step=3)
    picture = np.linspace(0.0, 1.0, 3 * 4 * 5).reshape(3, 4, 5)
    sink.write(3, Emission(scalars={"grad_spectrum/nuclear_norm/a.0.w": 2.25}, texts={"gradwatch/note": "hello"},
                           vectors={"toy/losses": np.array([1.0, 2.0, np.nan])}, alerts=[alert],
                           images={"toy/picture": picture}))
    values = np.array([[1.0, 10.0], [100.0, np.nan]])
    import gradwatch.integrations.figures as figures
    real = figures.heatmap_figure
    figures.heatmap_figure = lambda *a, **k: None  # matplotlib absent: the plain image and its text
    try:
        sink.log_heatmap("grad_spectrum/heatmap/nuclear_norm", 3, values, ["a.0.w", "a.1.w"], [1, 3], log_scale=True)
    finally:
        figures.heatmap_figure = real
    sink.log_heatmap("grad_spectrum/heatmap/stable_rank", 3, values, ["a.0.w", "a.1.w"], [1, 3], log_scale=False)
    sink.close()

    scalars = SummaryReader(log_dir).scalars
    got = {(t, int(s)): float(v) for t, s, v in zip(scalars["tag"], scalars["step"], scalars["value"])}
    assert got == pytest.approx({("grad_spectrum/nuclear_norm/a.0.w", 1): 1.5, ("gradwatch/overhead", 1): 0.01,
                                 ("grad_spectrum/nuclear_norm/a.0.w", 3): 2.25})

    ea = _accumulator(log_dir)
    images = ea.Images("grad_spectrum/heatmap/nuclear_norm")
    assert len(images) == 1 and images[0].step == 3
    assert (images[0].height, images[0].width) == (2 * 6, 2 * 6)
    from io import BytesIO

    from PIL import Image

    decoded = np.asarray(Image.open(BytesIO(images[0].encoded_image_string)).convert("RGB")).transpose(2, 0, 1)
    np.testing.assert_array_equal(decoded, heatmap_image(values, log_scale=True))  # lossless PNG of our image
    (pic,) = ea.Images("toy/picture")  # an Emission's images: (C, H, W) in [0, 1], as 8-bit PNG
    assert (pic.step, pic.height, pic.width) == (3, 4, 5)
    decoded = np.asarray(Image.open(BytesIO(pic.encoded_image_string)).convert("RGB")).transpose(2, 0, 1)
    assert np.abs(decoded / 255.0 - picture).max() <= 1 / 255 + 1e-9
    texts = {t: ea.Tensors(t) for t in ea.Tags()["tensors"]}
    heat_text = texts["grad_spectrum/heatmap/nuclear_norm/text_summary"][0].tensor_proto.string_val[0].decode()
    assert "a.1.w" in heat_text and "1..3" in heat_text and "log10" in heat_text
    assert texts["gradwatch/note/text_summary"][0].tensor_proto.string_val[0].decode() == "hello"
    alert_text = texts["gradwatch/alerts/text_summary"][0].tensor_proto.string_val[0].decode()
    assert "toy/rule" in alert_text and "| value | 3.5 |" in alert_text and "lower lr from 1e-2" in alert_text
    assert ea.Histograms("toy/losses")[0].histogram_value.num == 2  # the NaN is left out
    figure = ea.Images("grad_spectrum/heatmap/stable_rank")[0]  # matplotlib's labelled figure
    assert figure.width > 200 and figure.height > 100
    from tensorboard.plugins.custom_scalar import layout_pb2

    layout = layout_pb2.Layout()
    layout.ParseFromString(ea.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    assert [c.title for c in layout.category] == ["grad_spectrum/nuclear_norm", "gradwatch"]  # diagnostics first
    chart = layout.category[0].chart[0]
    assert chart.title == "nuclear_norm | a.*.w" and list(chart.multiline.tag) == [pattern]


class RecordingWriter:
    """A stand-in writer that records what the sink asks of it (tensorboardX-style ``get_logdir``)."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.scalars: list[tuple[str, float, int]] = []

    def get_logdir(self) -> str:
        return "/somewhere/run"

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))

    def flush(self) -> None:
        self.calls.append("flush")

    def close(self) -> None:
        self.calls.append("close")


def test_sink_with_external_writer_never_closes_it(tmp_path: Any) -> None:
    fake = RecordingWriter()
    sink = TensorBoardSink(writer=fake)
    assert sink.log_dir == "/somewhere/run"
    sink.write(2, Emission(scalars={"a": 1.0}))
    sink.close()
    assert fake.scalars == [("a", 1.0, 2)]
    assert "close" not in fake.calls and "flush" in fake.calls

    writer = SummaryWriter(log_dir=str(tmp_path / "shared"))
    sink = TensorBoardSink(writer=writer)
    assert sink.log_dir == str(tmp_path / "shared")
    sink.write(1, Emission(scalars={"ours": 1.0}))
    sink.close()
    assert writer.file_writer is not None  # still open: the host keeps writing to it
    writer.add_scalar("host", 2.0, 5)
    writer.close()
    ea = _accumulator(str(tmp_path / "shared"))
    assert [e.value for e in ea.Scalars("ours")] == [1.0]
    assert [(e.step, e.value) for e in ea.Scalars("host")] == [(5, 2.0)]


@pytest.mark.parametrize("kwargs", [{}, {"writer": RecordingWriter(), "log_dir": "/tmp/x"}])
def test_sink_needs_exactly_one_of_writer_and_log_dir(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="exactly one of `writer` or `log_dir`"):
        TensorBoardSink(**kwargs)
