"""gradwatch: live training-dynamics diagnostics for PyTorch Lightning and Hugging Face ``Trainer``.

Add one callback (``gradwatch.callbacks.lightning.GradWatch`` or ``gradwatch.callbacks.transformers.GradWatch``)
and open TensorBoard. ``import gradwatch`` imports neither Lightning nor transformers (nor torchmetrics).

The family configs exported here (``SpectraConfig``, ``SharpnessConfig``, ``MoEConfig``, ...) are those of the
registered families (``gradwatch.registry``) when asked for: ``gradwatch.<ConfigClass>``, ``__all__`` and
``dir(gradwatch)`` include a family registered after import.
"""

from typing import Any

from gradwatch.cadence import Cadence as Cadence
from gradwatch.config import WatchConfig as WatchConfig

__version__ = "0.1.0"

_FIXED = ("NOT_GIVEN", "SPECTRUM_STATS", "Cadence", "WatchConfig", "__version__")


def _all() -> list[str]:
    from gradwatch.registry import families

    return [*_FIXED, *(f.config_class.__name__ for f in families())]


def __getattr__(name: str) -> Any:
    from gradwatch.registry import families

    if name == "__all__":  # derived from the registry when asked (``from gradwatch import *`` asks)
        return _all()
    if name == "NOT_GIVEN":
        from gradwatch.options import NOT_GIVEN

        return NOT_GIVEN
    for fam in families():
        if fam.config_class.__name__ == name:
            return fam.config_class
    if name == "SPECTRUM_STATS":
        from gradwatch.functional.spectra import STATISTICS

        return STATISTICS
    raise AttributeError(f"module 'gradwatch' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_all()})


from gradwatch._report_to import install_report_to_hook as _install_report_to_hook  # noqa: E402

_install_report_to_hook()  # TrainingArguments(report_to=["gradwatch"]) once gradwatch is imported
