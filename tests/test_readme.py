"""The README's Python examples run: every ```python block, in order, in one namespace, in a fresh interpreter
(in a scratch directory, with no ``GRADWATCH_*`` variable set). The Hugging Face example's ``model`` and ``ds``
are supplied: a tiny classifier and its data (``_support.models``)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
PRELUDE = f"""
import sys
sys.path.insert(0, {str(ROOT / "tests")!r})
from _support.models import DictData, DictNet
model, ds = DictNet(), DictData(16)   # the HF example's model and dataset
"""


def readme_blocks() -> list[str]:
    return BLOCK.findall((ROOT / "README.md").read_text(encoding="utf-8"))


def test_readme_has_python_examples() -> None:
    blocks = readme_blocks()
    assert len(blocks) >= 4 and any("GRADWATCH_SPECTRA_EVERY" in b for b in blocks)


def test_readme_python_examples_run(tmp_path: Path) -> None:
    pytest.importorskip("lightning")
    pytest.importorskip("transformers")
    parts = [PRELUDE]
    for i, block in enumerate(readme_blocks()):
        parts.append(f"print('--- README block {i}', flush=True)\n{block}")
    parts.append("print('README OK')")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADWATCH_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-c", "\n".join(parts)], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.strip().endswith("README OK")
