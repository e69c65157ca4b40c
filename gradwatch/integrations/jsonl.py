"""JSONL sink: records (``signals.jsonl``, ...) and alerts (``alerts.jsonl``), one JSON object per line, in the
run directory. Appends, so a resumed run continues the same files."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from gradwatch.engine.sinks import Emission
from gradwatch.metrics.base import Chart


def _plain(value: Any) -> Any:
    """JSON-safe: tensors and numpy values as Python numbers or lists, non-finite floats as null."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class JsonlSink:
    """Writes ``<stem>.jsonl`` files under ``run_dir``."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir
        self._files: dict[str, TextIO] = {}

    def _file(self, stem: str) -> TextIO:
        if stem not in self._files:
            os.makedirs(self.run_dir, exist_ok=True)
            self._files[stem] = open(os.path.join(self.run_dir, f"{stem}.jsonl"), "a", encoding="utf-8")
        return self._files[stem]

    def path(self, stem: str) -> str:
        return os.path.join(self.run_dir, f"{stem}.jsonl")

    def open(self, charts: Sequence[Chart]) -> None:
        pass

    def write(self, step: int, emission: Emission) -> None:
        for stem, rows in emission.records.items():
            f = self._file(stem)
            for row in rows:
                f.write(json.dumps(_plain(row)) + "\n")
        if emission.alerts:
            f = self._file("alerts")
            for alert in emission.alerts:
                f.write(json.dumps(_plain(alert.as_record())) + "\n")

    def flush(self) -> None:
        for f in self._files.values():
            f.flush()

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass
