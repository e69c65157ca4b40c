"""One torchmetrics ``Metric`` per diagnostic, and the registry the engine builds them from."""

from gradwatch.metrics.base import Diagnostic, HeatmapSpec, StepContext
from gradwatch.metrics.grad_spectrum import GradSpectrum, PerExampleGradSpectrum

#: Every diagnostic the engine knows; each builds itself from the WatchConfig (``from_watch``).
DIAGNOSTICS: tuple[type[Diagnostic], ...] = (GradSpectrum,)

__all__ = ["DIAGNOSTICS", "Diagnostic", "GradSpectrum", "HeatmapSpec", "PerExampleGradSpectrum", "StepContext"]
