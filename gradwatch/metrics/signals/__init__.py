"""The ``signals`` family: outliers with opposing signals on the probe set (Rosenfeld and Risteski 2023).

``config`` (the options), ``diagnostic`` (the metric: bursts of probe losses, the window, the report),
``representation`` (the model's input representation, the last layer, the labels), ``rows`` (a probe step as numbers),
``display`` (the pairs table, thumbnails and the alert). The math is in :mod:`gradwatch.functional.signals`.
"""

from __future__ import annotations

from gradwatch.metrics.base import Diagnostic
from gradwatch.metrics.signals.config import SignalsConfig
from gradwatch.metrics.signals.diagnostic import TAGS, OpposingSignals
from gradwatch.registry import BuildInputs, Family


def _build(config: SignalsConfig, inputs: BuildInputs) -> list[Diagnostic]:
    return [OpposingSignals(config)]


FAMILY = Family(key="signals", stem="signals", config_class=SignalsConfig, default_on=False, build=_build,
                report="gradwatch.integrations.report.page:signals_section",
                summary="per-example loss changes over one optimizer step on the probe set, in bursts: outliers "
                        "and pairs of groups with opposing signals (Rosenfeld and Risteski 2023)",
                knobs=("window", "alarm", "probe_size", "burst"))

__all__ = ["FAMILY", "TAGS", "OpposingSignals", "SignalsConfig"]
