"""Screenshots of the real TensorBoard UI over real gradwatch runs, for docs/tour.md (docs/img/*.png).

    python docs/screenshots.py                      # runs both examples (~3 minutes on 2 CPU cores), then shoots
    python docs/screenshots.py --minilm-run DIR --transformer-run DIR   # reuse runs made earlier

It starts ``tensorboard --logdir RUN --host 127.0.0.1 --port 0`` for each run, drives Debian's headless
``chromium`` over its DevTools pipe (``--remote-debugging-pipe``: no port, no websocket library), waits for the
charts to load, ticks "Show actual image size" on the Images tab, and saves each page as a PNG, reduced to a
palette image if it is over 300 KB. Needs ``apt-get install chromium`` and Pillow (a matplotlib dependency).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MAX_BYTES = 300_000
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-extensions", "--disable-dev-shm-usage", "--hide-scrollbars", "--remote-debugging-pipe")

# The top-left-most element matching a selector and holding a text, found through open shadow roots
# (TensorBoard's dashboards are Polymer elements).
DEEP_FIND_JS = """
(function deepFind(selector, text) {
  const found = [], stack = [document];
  while (stack.length) {
    const root = stack.pop();
    for (const el of root.querySelectorAll('*')) {
      if (el.matches(selector) && (!text || (el.textContent || '').includes(text))) found.push(el);
      if (el.shadowRoot) stack.push(el.shadowRoot);
    }
  }
  const box = el => el.getBoundingClientRect();
  found.sort((a, b) => (box(a).top - box(b).top) || (box(a).left - box(b).left));
  return found.length ? found[0] : null;
})
"""


@contextmanager
def tensorboard(logdir: Path, timeout: float = 60.0) -> Iterator[str]:
    """A TensorBoard server on loopback over ``logdir``; yields its base URL."""
    proc = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
                             "--port", "0", "--load_fast", "false"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline, url = time.monotonic() + timeout, None
        assert proc.stderr is not None
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                raise RuntimeError(f"tensorboard exited with {proc.returncode}")
            match = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
            url = match.group(1) if match else None
        if url is None:
            raise TimeoutError("tensorboard did not start")
        wait_loaded(url, deadline=time.monotonic() + timeout)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return json.loads(reply.read())


def wait_loaded(url: str, deadline: float) -> None:
    """Until the server has read the whole run: its tags and the length of every run's ``gradwatch/overhead``
    series are the same in two polls a second apart (TensorBoard reads event files in the background)."""
    previous = None
    while time.monotonic() < deadline:
        runs = _get(url + "data/runs")
        scalar_tags = _get(url + "data/plugin/scalars/tags")
        lengths = [len(_get(url + "data/plugin/scalars/scalars?" + urllib.parse.urlencode(
            {"run": run, "tag": "gradwatch/overhead"}))) for run in runs
            if "gradwatch/overhead" in scalar_tags.get(run, {})]
        try:
            image_tags = _get(url + "data/plugin/images/tags")
        except urllib.error.HTTPError:  # no images in these runs
            image_tags = {}
        state = (runs, scalar_tags, lengths, image_tags)
        if runs and lengths and state == previous:
            return
        previous = state
        time.sleep(1.0)
    raise TimeoutError("tensorboard did not finish reading the run")


class Browser:
    """Headless Chromium over the DevTools pipe: Chromium reads commands on fd 3 and writes replies on fd 4,
    as NUL-terminated JSON."""

    def __init__(self) -> None:
        binary = shutil.which("chromium") or shutil.which("chromium-browser")
        if binary is None:
            raise SystemExit("chromium is not installed: apt-get install -y chromium")
        to_r, self._w = os.pipe()
        self._r, from_w = os.pipe()

        def wire() -> None:
            a, b = os.dup(to_r), os.dup(from_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self._profile = tempfile.mkdtemp(prefix="gradwatch-shots-")
        self.proc = subprocess.Popen([binary, *CHROMIUM_FLAGS, f"--user-data-dir={self._profile}", "about:blank"],
                                     preexec_fn=wire, close_fds=False, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_r)
        os.close(from_w)
        self._buffer, self._id = b"", 0

    def call(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 30.0) -> dict[str, Any]:
        self._id += 1
        message: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._w, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" not in self._buffer:
                ready, _, _ = select.select([self._r], [], [], max(0.0, deadline - time.monotonic()))
                if not ready:
                    raise TimeoutError(f"chromium did not answer {method}")
                chunk = os.read(self._r, 1 << 20)
                if not chunk:
                    raise EOFError("chromium closed its DevTools pipe")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def evaluate(self, session: str, expression: str) -> Any:
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True}, session)
        return result.get("result", {}).get("value")

    def page(self, url: str, width: int, height: int, settle: float = 6.0) -> str:
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.call("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                         "mobile": False}, session)
        self.call("Page.enable", {}, session)
        self.call("Page.navigate", {"url": url}, session)
        time.sleep(settle)  # TensorBoard loads its data after the page: give the charts time to draw
        return session

    def screenshot(self, session: str, path: Path) -> int:
        data = base64.b64decode(self.call("Page.captureScreenshot", {"format": "png"}, session)["data"])
        if len(data) > MAX_BYTES:
            from PIL import Image

            buffer = io.BytesIO()
            Image.open(io.BytesIO(data)).convert("RGB").quantize(colors=128).save(buffer, "PNG", optimize=True)
            data = buffer.getvalue()
        path.write_bytes(data)
        return len(data)

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5.0)
        except (TimeoutError, EOFError, RuntimeError):
            pass
        os.close(self._w)
        os.close(self._r)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self._profile, ignore_errors=True)


def click(browser: Browser, session: str, selector: str, text: str, inside_parent: str | None = None) -> bool:
    """Click, with a real mouse press and release at its centre, the top-left-most element matching ``selector``
    that holds ``text`` (or, with ``inside_parent``, the element matching that selector beside it); returns
    whether there was one."""
    pick = f"el.parentElement.querySelector({json.dumps(inside_parent)})" if inside_parent else "el"
    box = browser.evaluate(session, f"""(() => {{
        const el = {DEEP_FIND_JS}({json.dumps(selector)}, {json.dumps(text)});
        const target = el && {pick};
        if (!target) return null;
        target.scrollIntoView({{block: 'nearest'}});
        const r = target.getBoundingClientRect();
        return [r.left + r.width / 2, r.top + r.height / 2];
    }})()""")
    if not box:
        return False
    for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
        browser.call("Input.dispatchMouseEvent", {"type": kind, "x": box[0], "y": box[1], "button": "left",
                                                  "clickCount": 1}, session)
    return True


def hover(browser: Browser, session: str, selector: str, text: str, at: tuple[float, float]) -> bool:
    """Move the mouse over the top-left-most element matching ``selector`` that holds ``text``, at the fractions
    ``at`` of its width and height (TensorBoard then shows the chart's tooltip)."""
    box = browser.evaluate(session, f"""(() => {{
        const el = {DEEP_FIND_JS}({json.dumps(selector)}, {json.dumps(text)});
        if (!el) return null;
        const r = el.getBoundingClientRect();
        return [r.left + {at[0]} * r.width, r.top + {at[1]} * r.height];
    }})()""")
    if not box:
        return False
    for dx in (-8.0, 0.0):  # two moves, so the chart sees the pointer arrive
        browser.call("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": box[0] + dx, "y": box[1]}, session)
    return True


def make_runs(work: Path) -> tuple[Path, Path]:
    """Both examples, at their full size: the MiniLM fine-tune (HF, report_to alone) and Lightning's demo
    transformer (with heatmaps every 100 steps)."""
    sys.path.insert(0, str(REPO / "examples"))
    import lightning_transformer
    import minilm_finetune

    minilm = minilm_finetune.main(["--output-dir", str(work / "minilm")])
    transformer = lightning_transformer.main(["--log-dir", str(work / "lt")])
    return Path(minilm["log_dir"]), Path(transformer["log_dir"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minilm-run", type=Path, help="a run directory of examples/minilm_finetune.py")
    parser.add_argument("--transformer-run", type=Path, help="a run directory of examples/lightning_transformer.py")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "img")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gradwatch-tour-"))
    if args.minilm_run is None or args.transformer_run is None:
        args.minilm_run, args.transformer_run = make_runs(work)

    browser = Browser()
    try:
        with tensorboard(args.minilm_run) as url:
            session = browser.page(url + "#custom_scalars", 1400, 900)
            print("custom_scalars_minilm.png", browser.screenshot(session, args.out / "custom_scalars_minilm.png"))
            # the same tab with the pointer on the query chart: the tooltip names each layer and its value
            session = browser.page(url + "#custom_scalars", 1400, 900)
            if hover(browser, session, "vz-line-chart2", "", at=(0.62, 0.45)):
                time.sleep(1.5)
                print("custom_scalars_tooltip.png",
                      browser.screenshot(session, args.out / "custom_scalars_tooltip.png"))
        with tensorboard(args.transformer_run) as url:
            session = browser.page(url + "#images&tagFilter=heatmap/effective_rank", 1480, 1140)
            ticked = click(browser, session, "paper-checkbox", "Show actual image size")
            time.sleep(2.0)
            print("images_heatmap.png", browser.screenshot(session, args.out / "images_heatmap.png"),
                  "(actual size)" if ticked else "(the checkbox was not found: shrunk images)")
            session = browser.page(url + "#custom_scalars", 1400, 900)
            print("custom_scalars_transformer.png",
                  browser.screenshot(session, args.out / "custom_scalars_transformer.png"))
    finally:
        browser.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
