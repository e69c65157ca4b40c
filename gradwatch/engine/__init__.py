"""Layer 2, framework-agnostic: layers, probe data, events, cadence, budget, ranks, hooks, hand-off to sinks."""

from gradwatch.engine.alerts import GradWatchAlert, GradWatchError
from gradwatch.engine.context import EngineStepContext, ExtraPass, extra_pass
from gradwatch.engine.layers import WatchedLayers, WatchedMatrix, discover_matrices, layer_family
from gradwatch.engine.probe import ProbeSet, ProbeSource
from gradwatch.engine.sinks import Emission, Sink
from gradwatch.engine.watcher import Watcher

__all__ = ["Emission", "EngineStepContext", "ExtraPass", "GradWatchAlert", "GradWatchError", "ProbeSet",
           "ProbeSource", "Sink", "WatchedLayers", "WatchedMatrix", "Watcher", "discover_matrices", "extra_pass",
           "layer_family"]
