"""gradwatch: live training-dynamics diagnostics for PyTorch Lightning and Hugging Face ``Trainer``.

Add one callback (``gradwatch.callbacks.lightning.GradWatch`` or ``gradwatch.callbacks.transformers.GradWatch``)
and open TensorBoard. ``import gradwatch`` imports neither Lightning nor transformers (nor torchmetrics).

The family configs exported here (``SpectraConfig``, ``SharpnessConfig``, ...) are those of the registered
families (``gradwatch.registry``), loaded on first use.
"""

from typing import Any

from gradwatch.cadence import Cadence
from gradwatch.config import WatchConfig

__version__ = "0.1.0"

_BUILTIN_CONFIGS = ("SpectraConfig", "SharpnessConfig", "SignalsConfig", "StabilityConfig")

__all__ = ["SPECTRUM_STATS", "Cadence", "WatchConfig", "__version__", *_BUILTIN_CONFIGS]


def __getattr__(name: str) -> Any:
    from gradwatch.registry import families

    for fam in families():
        if fam.config_class.__name__ == name:
            return fam.config_class
    if name == "SPECTRUM_STATS":
        from gradwatch.functional.spectra import STATISTICS

        return STATISTICS
    raise AttributeError(f"module 'gradwatch' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


from gradwatch._report_to import install_report_to_hook as _install_report_to_hook  # noqa: E402

_install_report_to_hook()  # TrainingArguments(report_to=["gradwatch"]) once gradwatch is imported
