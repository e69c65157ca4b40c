"""Framework-agnostic engine: layer discovery, probe data, cadence, budget, hand-off to sinks."""

from gradwatch.engine.layers import Discovery, WatchedMatrix, discover_matrices, layer_family
from gradwatch.engine.probe import ProbeSet
from gradwatch.engine.watcher import GradWatchError, Sink, Watcher, extra_pass

__all__ = ["Discovery", "GradWatchError", "ProbeSet", "Sink", "WatchedMatrix", "Watcher", "discover_matrices",
           "extra_pass", "layer_family"]
