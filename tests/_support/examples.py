"""Loading a script of ``examples/`` as a module, without putting ``examples/`` on ``sys.path``."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load_example(stem: str) -> ModuleType:
    """``examples/<stem>.py``, imported under the name ``stem`` (its ``main`` is not run)."""
    spec = importlib.util.spec_from_file_location(stem, EXAMPLES / f"{stem}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
