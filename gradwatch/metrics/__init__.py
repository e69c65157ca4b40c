"""One torchmetrics ``Metric`` per diagnostic, and the registration of the built-in families.

Adding a built-in family is one word below: its module's stem. Each module declares its ``FAMILY``.
"""

import importlib

from gradwatch.metrics.base import ActivationSite, Alert, ChartGroup, Diagnostic, Heatmap, Results, StepContext
from gradwatch.registry import register

BUILTIN_STEMS = ("grad_spectrum", "sharpness", "signals", "stability", "moe")

#: The built-in families, in registration order.
BUILTIN_FAMILIES = tuple(register(importlib.import_module(f"gradwatch.metrics.{stem}").FAMILY) for stem in BUILTIN_STEMS)

# live data quality (issue 18; off by default), registered after the families above
BUILTIN_FAMILIES += (register(importlib.import_module("gradwatch.metrics.example_quality").FAMILY),)

from gradwatch.metrics.grad_spectrum import GradSpectrum, PerExampleGradSpectrum, SpectraConfig  # noqa: E402
from gradwatch.metrics.sharpness import Sharpness, SharpnessConfig  # noqa: E402

__all__ = ["BUILTIN_FAMILIES", "ActivationSite", "Alert", "ChartGroup", "Diagnostic", "GradSpectrum", "Heatmap",
           "PerExampleGradSpectrum", "Results", "Sharpness", "SharpnessConfig", "SpectraConfig", "StepContext"]
