"""Pure functions on tensors and matvec callables: no hooks, no logging, no framework."""

from gradwatch.functional.spectra import (
    STATISTICS,
    as_matrix,
    batched_singular_values,
    cross_layer_mad,
    gradient_spectrum_statistics,
    spectrum_statistics,
)

__all__ = ["STATISTICS", "as_matrix", "batched_singular_values", "cross_layer_mad",
           "gradient_spectrum_statistics", "spectrum_statistics"]
