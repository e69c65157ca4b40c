"""Open pages in headless Chromium and report their console errors and images, for the report tests.

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: NUL-terminated JSON
messages, Chromium reads file descriptor 3 and writes 4), so no port and no websocket library are needed.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

CHROMIUM_PATHS = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--remote-debugging-pipe")
ERROR_EVENTS = ("Runtime.exceptionThrown", "Runtime.consoleAPICalled", "Log.entryAdded")


def chromium_path() -> str | None:
    for path in CHROMIUM_PATHS:
        if os.path.exists(path):
            return path
    return shutil.which("chromium")


@dataclass
class PageResult:
    url: str
    title: str = ""
    images: list[dict[str, Any]] = field(default_factory=list)  # src, complete, naturalWidth, naturalHeight
    errors: list[str] = field(default_factory=list)  # console errors, exceptions, failed loads


class _Pipe:
    def __init__(self, proc: subprocess.Popen, to_chromium: int, from_chromium: int) -> None:
        self.proc, self.w, self.r = proc, to_chromium, from_chromium
        self.buffer = b""
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def _receive(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.r], [], [], max(0.0, left))
            if not ready:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self.r, 1 << 16)
            if not chunk:
                raise EOFError(f"Chromium closed its DevTools pipe (exit code {self.proc.poll()})")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 15.0) -> dict[str, Any]:
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.w, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._receive(deadline)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str, session: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        seen = lambda: any(e.get("method") == method and e.get("sessionId") == session  # noqa: E731
                           for e in self.events)
        while not seen():
            self.events.append(self._receive(deadline))


def _error_text(event: dict[str, Any]) -> str | None:
    method, params = event.get("method"), event.get("params", {})
    if method == "Runtime.exceptionThrown":
        details = params.get("exceptionDetails", {})
        return f"exception: {details.get('exception', {}).get('description') or details.get('text')}"
    if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
        return "console.error: " + " ".join(str(a.get("value", a.get("description", ""))) for a in params["args"])
    if method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
        entry = params["entry"]
        return f"{entry.get('source')}: {entry.get('text')} {entry.get('url', '')}".strip()
    return None


_IMAGES_JS = ("JSON.stringify({title: document.title, images: Array.from(document.images).map(i => ({src: i.src, "
              "complete: i.complete, naturalWidth: i.naturalWidth, naturalHeight: i.naturalHeight}))})")


def open_pages(urls: list[str], timeout: float = 30.0) -> list[PageResult]:
    """Load each URL in a fresh tab, wait for its load event, and collect its images and errors."""
    binary = chromium_path()
    if binary is None:
        raise FileNotFoundError("chromium is not installed")
    to_r, to_w = os.pipe()
    from_r, from_w = os.pipe()

    def wire_pipes() -> None:  # in the child: its fd 3 reads our commands, its fd 4 writes replies
        a, b = os.dup(to_r), os.dup(from_w)  # above 4, so the dup2 below never targets a source
        os.dup2(a, 3)
        os.dup2(b, 4)

    profile = tempfile.mkdtemp(prefix="gradwatch-chromium-")
    proc = subprocess.Popen([binary, *FLAGS, f"--user-data-dir={profile}", "about:blank"], preexec_fn=wire_pipes,
                            close_fds=False, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    os.close(to_r)
    os.close(from_w)
    pipe = _Pipe(proc, to_w, from_r)
    results = []
    try:
        deadline = time.monotonic() + timeout
        for url in urls:
            left = lambda: max(1.0, deadline - time.monotonic())  # noqa: E731
            target = pipe.call("Target.createTarget", {"url": "about:blank"}, timeout=left())["targetId"]
            session = pipe.call("Target.attachToTarget", {"targetId": target, "flatten": True},
                                timeout=left())["sessionId"]
            for domain in ("Page.enable", "Runtime.enable", "Log.enable"):
                pipe.call(domain, session=session, timeout=left())
            first = len(pipe.events)
            pipe.call("Page.navigate", {"url": url}, session=session, timeout=left())
            pipe.wait_event("Page.loadEventFired", session, timeout=left())
            value = pipe.call("Runtime.evaluate", {"expression": _IMAGES_JS, "returnByValue": True},
                              session=session, timeout=left())["result"]["value"]
            page = json.loads(value)
            errors = [text for e in pipe.events[first:] if e.get("sessionId") == session
                      for text in [_error_text(e)] if text]
            results.append(PageResult(url, page["title"], page["images"], errors))
        try:
            pipe.call("Browser.close", timeout=5.0)
        except (TimeoutError, EOFError, RuntimeError):
            pass
    finally:
        os.close(to_w)
        os.close(from_r)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        shutil.rmtree(profile, ignore_errors=True)
    return results
