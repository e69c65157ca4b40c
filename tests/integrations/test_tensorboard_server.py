"""The real TensorBoard server over a gradwatch-style run: scalars (with their values), the custom-scalars
layout and the heatmap images are served through its HTTP data API.

The server is ``python -m tensorboard.main`` bound to 127.0.0.1 on a port the OS picks (``--port 0``; the
port is read from its start-up line), killed at the end; every wait is bounded.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorboard")

from gradwatch.integrations.figures import heatmap_figure, matplotlib_available  # noqa: E402
from gradwatch.integrations.tensorboard import heatmap_image  # noqa: E402

START_TIMEOUT_S = 40.0
LOAD_TIMEOUT_S = 30.0
PARAMS = [f"model.layers.{i}.attn.q_proj.weight" for i in range(3)]
STEPS = (1, 2, 3, 4)
LAYOUT_TITLE = "grad_spectrum/nuclear_norm"
CHART_TITLE = "model.layers.*.attn.q_proj.weight"
IMAGE_TAG = "grad_spectrum/heatmap/nuclear_norm"
FIGURE_TAG = "grad_spectrum/heatmap_figure/nuclear_norm"


def value(layer: int, step: int) -> float:
    return 10.0 * (layer + 1) + step / 4


def write_run(log_dir: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(log_dir))
    writer.add_custom_scalars({LAYOUT_TITLE: {CHART_TITLE: ["Multiline", [f"grad_spectrum/nuclear_norm/{p}"
                                                                         for p in PARAMS]]}})
    for step in STEPS:
        for layer, param in enumerate(PARAMS):
            writer.add_scalar(f"grad_spectrum/nuclear_norm/{param}", value(layer, step), step)
        writer.add_scalar("gradwatch/overhead", 0.01 * step, step)
    heat = np.array([[value(layer, s) for s in STEPS] for layer in range(len(PARAMS))])
    writer.add_image(IMAGE_TAG, heatmap_image(heat, log_scale=True, cell=4), STEPS[-1], dataformats="CHW")
    figure = heatmap_figure(heat, PARAMS, STEPS, title=CHART_TITLE, log_scale=True, colorbar_label="nuclear_norm")
    if figure is not None:  # matplotlib installed
        writer.add_image(FIGURE_TAG, figure, STEPS[-1], dataformats="HWC")
    writer.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL of a TensorBoard server over a fresh run directory (one server for this module)."""
    tmp_path = tmp_path_factory.mktemp("tb_server")
    write_run(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(tmp_path / "run"),
                             "--host", "127.0.0.1", "--port", "0", "--load_fast", "false",
                             "--reload_interval", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = None
        deadline = time.monotonic() + START_TIMEOUT_S
        assert proc.stderr is not None
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()  # the server prints its URL on stderr once it listens
            if not line and proc.poll() is not None:
                break
            match = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
            url = match.group(1) if match else None
        if url is None:
            pytest.fail(f"TensorBoard did not start within {START_TIMEOUT_S:.0f} s (exit code {proc.poll()})")
        yield url
    finally:
        proc.kill()
        proc.wait(timeout=10)
        if proc.stderr is not None:
            proc.stderr.close()


def png_size(png: bytes) -> tuple[int, int]:
    """(height, width) from a PNG's IHDR chunk."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(png[20:24], "big"), int.from_bytes(png[16:20], "big")


def image_served(url: str, run: str, tag: str) -> bytes:
    entries = get_json(url, "data/plugin/images/images", run=run, tag=tag, sample="0")
    assert [e["step"] for e in entries] == [STEPS[-1]]
    return get(url, "data/plugin/images/individualImage?" + entries[0]["query"])


def get(url: str, path: str, **params: str) -> bytes:
    query = ("?" + urllib.parse.urlencode(params)) if params else ""
    with urllib.request.urlopen(url + path.lstrip("/") + query, timeout=10) as response:
        assert response.status == 200, path
        return response.read()


def get_json(url: str, path: str, **params: str) -> object:
    return json.loads(get(url, path, **params))


def wait_for_run(url: str) -> str:
    """The run's name once the server has loaded its scalars (bounded)."""
    deadline = time.monotonic() + LOAD_TIMEOUT_S
    while time.monotonic() < deadline:
        tags = get_json(url, "data/plugin/scalars/tags")
        for run, run_tags in tags.items():
            if "gradwatch/overhead" in run_tags:
                return run
        time.sleep(0.2)
    pytest.fail(f"TensorBoard served no scalars within {LOAD_TIMEOUT_S:.0f} s")


def test_server_serves_scalars_layout_and_images(server: str) -> None:
    run = wait_for_run(server)

    tags = get_json(server, "data/plugin/scalars/tags")[run]
    expected = {f"grad_spectrum/nuclear_norm/{p}" for p in PARAMS} | {"gradwatch/overhead"}
    assert expected <= set(tags)
    for layer, param in enumerate(PARAMS):
        points = get_json(server, "data/plugin/scalars/scalars", run=run, tag=f"grad_spectrum/nuclear_norm/{param}")
        assert [p[1] for p in points] == list(STEPS)  # [wall_time, step, value]
        np.testing.assert_allclose([p[2] for p in points], [value(layer, s) for s in STEPS], rtol=1e-6)

    layout = get_json(server, "data/plugin/custom_scalars/layout")
    categories = {c["title"]: c for c in layout["category"]}
    assert LAYOUT_TITLE in categories
    chart = categories[LAYOUT_TITLE]["chart"][0]
    assert chart["title"] == CHART_TITLE
    assert set(chart["multiline"]["tag"]) == {f"grad_spectrum/nuclear_norm/{p}" for p in PARAMS}

    image_tags = get_json(server, "data/plugin/images/tags")[run]
    assert IMAGE_TAG in image_tags
    assert png_size(image_served(server, run, IMAGE_TAG)) == (len(PARAMS) * 4, len(STEPS) * 4)
    if matplotlib_available():
        assert FIGURE_TAG in image_tags
        height, width = png_size(image_served(server, run, FIGURE_TAG))
        assert height > 200 and width > 400  # a drawn figure, not a strip of cells


def test_server_rejects_unknown_run(server: str) -> None:
    wait_for_run(server)
    with pytest.raises(urllib.error.HTTPError):
        get(server, "data/plugin/scalars/scalars", run="no-such-run", tag="gradwatch/overhead")
