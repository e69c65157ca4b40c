"""A sink for engine tests: it keeps everything the watcher hands it."""

from __future__ import annotations

from typing import Any


class RecordingSink:
    """Keeps the charts given at ``open``, each step's emission (``emissions``) and its scalars (``scalars``,
    merged where a step was written twice), and the state it was restored with (``restored``).

    ``one_emission_per_step``: a second emission at the same step fails the test.
    """

    def __init__(self, *, one_emission_per_step: bool = False) -> None:
        self.one_emission_per_step = one_emission_per_step
        self.scalars: dict[int, dict[str, float]] = {}
        self.emissions: dict[int, Any] = {}
        self.charts: list = []
        self.restored: dict | None = None

    def open(self, charts: Any) -> None:
        self.charts = list(charts)

    def write(self, step: int, emission: Any) -> None:
        if self.one_emission_per_step:
            assert step not in self.emissions, f"two emissions at step {step}"
        self.scalars.setdefault(step, {}).update(emission.scalars)
        self.emissions[step] = emission

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"steps": sorted(self.scalars)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.restored = dict(state)
