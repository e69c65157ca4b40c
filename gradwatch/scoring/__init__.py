"""Data quality through layer-wise gradients: score a dataset by the spectra of each example's own gradient
(``gradwatch score-data``) and compare two scorings by their relative difference (``gradwatch compare``).

Li et al. 2024, "What happened in LLMs layers when trained for fast vs. slow thinking: a gradient perspective";
Li et al. 2025, "How instruction and reasoning data shape post-training: data quality through the lens of
layer-wise gradients". Needs ``transformers`` only to load a model from a path (:func:`gradwatch.scoring.hf.load_model`).
"""

from __future__ import annotations

import importlib
from typing import Any

# names -> submodule; loaded on first use, so `gradwatch --help` does not import torch
_EXPORTS = {
    "compare_scorings": "compare", "format_differences": "compare", "is_scoring": "compare",
    "load_scoring": "compare", "relative_difference": "compare",
    "Example": "data", "Message": "data", "load_examples": "data", "parse_record": "data",
    "ROLES": "groups", "layer_groups": "groups", "matrix_role": "groups", "scored_matrices": "groups",
    "OBJECTIVES": "objectives", "infer_objective": "objectives",
    "SCORE_STATS": "score", "Scorer": "score", "ScoreResult": "score", "ScoringOptions": "score",
    "read_scores": "score", "score_dataset": "score",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"gradwatch.scoring.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'gradwatch.scoring' has no attribute {name!r}")
