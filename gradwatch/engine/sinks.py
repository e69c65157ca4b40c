"""What the engine hands its sinks (on rank zero only): one :class:`Emission` per logging step."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from gradwatch.metrics.base import Alert, Chart


@dataclass(frozen=True)
class Emission:
    """Everything logged at one step, on the host.

    Attributes:
        scalars: tag -> value (one device-to-host transfer made them floats).
        vectors: tag -> values (histograms).
        records: file stem -> rows (``<stem>.jsonl`` in the run directory).
        texts: tag -> markdown.
        alerts: the alerts that passed the once-per-rule policy at this step.
        images: tag -> (C, H, W) float array in [0, 1].
    """

    scalars: Mapping[str, float] = field(default_factory=dict)
    vectors: Mapping[str, np.ndarray] = field(default_factory=dict)
    records: Mapping[str, Sequence[Mapping[str, Any]]] = field(default_factory=dict)
    texts: Mapping[str, str] = field(default_factory=dict)
    alerts: Sequence[Alert] = ()
    images: Mapping[str, np.ndarray] = field(default_factory=dict)


class Sink(Protocol):
    """Where results go; built in one place (``gradwatch.integrations.sinks.build_sinks``)."""

    def open(self, charts: Sequence[Chart]) -> None:
        """Called once at attach with every diagnostic's chart hints."""

    def write(self, step: int, emission: Emission) -> None:
        """Called at each logging step."""

    def flush(self) -> None: ...

    def close(self) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        """What the sink must remember across a resume (the heatmap history)."""

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...
