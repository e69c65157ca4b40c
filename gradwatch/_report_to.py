"""``TrainingArguments(report_to=["gradwatch"])`` once gradwatch is imported, without importing transformers.

The explicit alternative to this import-time hook is ``gradwatch.callbacks.transformers.register_report_to()``
(or ``callbacks=[GradWatch()]``).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from typing import Any

_HF_MODULE = "transformers.integrations.integration_utils"


def _register() -> None:
    adapter = sys.modules.get("gradwatch.callbacks.transformers")
    if adapter is not None and not hasattr(adapter, "register_report_to"):
        # Its own import of transformers' integration table brought us here: it is half-initialized and
        # registers itself when its body finishes (importing it now would fail as a circular import).
        return
    from gradwatch.callbacks.transformers import register_report_to

    register_report_to()


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Registers ``report_to="gradwatch"`` right after transformers loads its integration table, so that
    ``import gradwatch`` works whether it comes before or after ``import transformers`` and never imports
    transformers itself."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != _HF_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module: Any) -> None:
            exec_module(module)
            _register()

        spec.loader.exec_module = exec_and_register  # type: ignore[method-assign]
        return spec


def install_report_to_hook() -> None:
    """Register now if transformers' integration table is loaded, else as soon as it is."""
    if _HF_MODULE in sys.modules:
        _register()
    elif importlib.util.find_spec("transformers") is not None:
        if not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
            sys.meta_path.insert(0, _RegisterAfterImport())
