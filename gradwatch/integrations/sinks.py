"""The one place sinks are built: TensorBoard (the host's writer when it has one) plus JSONL records, both
in the same run directory."""

from __future__ import annotations

from typing import Any

from gradwatch.engine.sinks import Sink
from gradwatch.integrations.jsonl import JsonlSink
from gradwatch.integrations.tensorboard import TensorBoardSink


def build_sinks(*, writer: Any = None, log_dir: str | None = None) -> tuple[list[Sink], str]:
    """Sinks writing with the host's ``writer`` (its run directory) or into ``log_dir``; returns them and the
    run directory."""
    tb = TensorBoardSink(writer=writer) if writer is not None else TensorBoardSink(log_dir=log_dir)
    run_dir = tb.log_dir
    return [tb, JsonlSink(run_dir)], run_dir
