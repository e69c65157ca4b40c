"""The one place sinks are built: TensorBoard (the host's writer when it has one) plus JSONL records, both
in the same run directory, behind one :class:`_WriteGuard`: an I/O error of the surroundings (an unwritable
or vanished run directory, a full disk, a file-size limit) warns once and stops gradwatch's writing, so it
never stops training."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from gradwatch.engine.sinks import Emission, Sink
from gradwatch.integrations.jsonl import JsonlSink
from gradwatch.integrations.tensorboard import TensorBoardSink
from gradwatch.metrics.base import Chart


class _WriteGuard:
    """Shared by the sinks of one run: the first ``OSError`` warns (naming the run directory and the error)
    and switches every one of them off."""

    def __init__(self, run_dir: str | None) -> None:
        self.run_dir, self.broken = run_dir, False

    def failed(self, what: str, exc: OSError) -> None:
        if not self.broken:
            self.broken = True
            warnings.warn(f"gradwatch: {what} in {self.run_dir} failed: {exc!r}; gradwatch writes nothing more "
                          "there, and training goes on (said once)", RuntimeWarning, stacklevel=4)


class GuardedSink:
    """``sink`` whose calls are dropped once its run's :class:`_WriteGuard` saw an ``OSError`` (other
    attributes, e.g. the heatmap history, are the wrapped sink's, read or set)."""

    def __init__(self, sink: Sink, guard: _WriteGuard) -> None:
        self.sink, self.guard = sink, guard

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["sink"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("sink", "guard"):
            object.__setattr__(self, name, value)
        else:  # transparent both ways: a set attribute lands on the wrapped sink
            setattr(self.sink, name, value)

    def _call(self, method: str, *args: Any) -> Any:
        if self.guard.broken:
            return None
        try:
            return getattr(self.sink, method)(*args)
        except OSError as exc:
            self.guard.failed(f"writing {type(self.sink).__name__}'s files", exc)
            return None

    def open(self, charts: Sequence[Chart]) -> None:
        self._call("open", charts)

    def write(self, step: int, emission: Emission) -> None:
        self._call("write", step, emission)

    def resume(self, step: int) -> None:
        self._call("resume", step)

    def flush(self) -> None:
        self._call("flush")

    def close(self) -> None:
        self._call("close")

    def state_dict(self) -> dict[str, Any]:
        return self.sink.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.sink.load_state_dict(state)


def build_sinks(*, writer: Any = None, log_dir: str | None = None, resumed_at: int = 0) -> tuple[list[Sink], str]:
    """Sinks writing with the host's ``writer`` (its run directory) or into ``log_dir``; returns them and the
    run directory. A ``log_dir`` that cannot be created (a path under a file, no permission) warns and gives
    no sinks. ``resumed_at``: the host's step when it resumed from a checkpoint (0: a fresh run); each sink's
    ``resume`` then lets what the interrupted run wrote past it give way to the resumed run's."""
    try:
        tb = TensorBoardSink(writer=writer) if writer is not None else TensorBoardSink(log_dir=log_dir)
    except OSError as exc:
        _WriteGuard(log_dir).failed("creating the TensorBoard writer", exc)
        return [], log_dir  # type: ignore[return-value]
    run_dir = tb.log_dir
    guard = _WriteGuard(run_dir)
    sinks = [GuardedSink(tb, guard), GuardedSink(JsonlSink(run_dir), guard)]
    if resumed_at:
        for sink in sinks:
            sink.resume(resumed_at)
    return sinks, run_dir
