"""One torchmetrics ``Metric`` per diagnostic, and the registry the engine builds them from."""

from gradwatch.metrics.base import Diagnostic, HeatmapSpec, StepContext
from gradwatch.metrics.grad_spectrum import GradSpectrum, PerExampleGradSpectrum
from gradwatch.metrics.sharpness import Sharpness

#: Every diagnostic the engine knows; each builds itself from the WatchConfig (``from_watch``).
DIAGNOSTICS: tuple[type[Diagnostic], ...] = (GradSpectrum, Sharpness)

__all__ = ["DIAGNOSTICS", "Diagnostic", "GradSpectrum", "HeatmapSpec", "PerExampleGradSpectrum", "Sharpness", "StepContext"]
