"""gradwatch: live training-dynamics diagnostics for PyTorch Lightning and Hugging Face ``Trainer``.

Add one callback (``gradwatch.callbacks.lightning.GradWatch`` or ``gradwatch.callbacks.transformers.GradWatch``)
and open TensorBoard. Neither Lightning nor transformers is imported by ``import gradwatch``.
"""

from gradwatch.config import SPECTRUM_STATS, Cadence, SharpnessConfig, SpectraConfig, WatchConfig

__version__ = "0.1.0"

__all__ = ["SPECTRUM_STATS", "Cadence", "SharpnessConfig", "SpectraConfig", "WatchConfig", "__version__"]


def __getattr__(name: str):  # `report_to=["gradwatch"]` works once gradwatch is imported, when HF is there
    raise AttributeError(f"module 'gradwatch' has no attribute {name!r}")
