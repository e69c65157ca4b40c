"""gradwatch: live training-dynamics diagnostics for PyTorch Lightning and Hugging Face ``Trainer``.

Add one callback (``gradwatch.callbacks.lightning.GradWatch`` or ``gradwatch.callbacks.transformers.GradWatch``)
and open TensorBoard. Neither Lightning nor transformers is imported by ``import gradwatch``.
"""

from gradwatch.config import SPECTRUM_STATS, Cadence, SharpnessConfig, SpectraConfig, WatchConfig

__version__ = "0.1.0"

__all__ = ["SPECTRUM_STATS", "Cadence", "SharpnessConfig", "SpectraConfig", "WatchConfig", "__version__"]

from gradwatch.integrations import install_report_to_hook as _install_report_to_hook

_install_report_to_hook()  # TrainingArguments(report_to=["gradwatch"]) once gradwatch is imported
