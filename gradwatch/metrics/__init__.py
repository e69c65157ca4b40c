"""One torchmetrics ``Metric`` per diagnostic, and the registration of the built-in families."""

from gradwatch.metrics import grad_spectrum, sharpness
from gradwatch.metrics.base import ActivationSite, Alert, ChartGroup, Diagnostic, Heatmap, Results, StepContext
from gradwatch.metrics.grad_spectrum import GradSpectrum, PerExampleGradSpectrum, SpectraConfig
from gradwatch.metrics.sharpness import Sharpness, SharpnessConfig
from gradwatch.registry import register

#: The built-in families, one line each.
BUILTIN_FAMILIES = tuple(register(m.FAMILY) for m in (grad_spectrum, sharpness))

__all__ = ["BUILTIN_FAMILIES", "ActivationSite", "Alert", "ChartGroup", "Diagnostic", "GradSpectrum", "Heatmap",
           "PerExampleGradSpectrum", "Results", "Sharpness", "SharpnessConfig", "SpectraConfig", "StepContext"]
