"""Loading a local Hugging Face model and its tokenizer for scoring (offline: nothing is downloaded)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def load_model(path: str | os.PathLike, objective: str | None = None, dtype: str = "float32",
               device: str = "cpu") -> tuple[Any, Any, str]:
    """``(model, tokenizer, objective)`` from a local model folder, in eval mode with eager attention.

    The causal LM head is loaded for ``causal_lm`` (or when the folder's config names a ``...ForCausalLM`` /
    ``...LMHeadModel`` architecture and ``objective`` is None), the bare encoder otherwise. Eager attention is the
    plain math: ``torch.func.vmap`` traces it (the SDPA path of transformers' mask code has data-dependent checks).

    Raises:
        ValueError: not a folder with a model config, or transformers is not installed.
    """
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{path}: not a local Hugging Face model folder (no config.json); give the folder that "
                         f"save_pretrained wrote (nothing is downloaded)")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype expected one of {list(DTYPES)}, got {dtype!r}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise ValueError("gradwatch score-data needs transformers to load a model: pip install transformers") from None
    from gradwatch.scoring.objectives import OBJECTIVES

    if objective is not None and objective not in OBJECTIVES:
        raise ValueError(f"--objective expected one of {list(OBJECTIVES)}, got {objective!r}")
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    architectures = " ".join(config.architectures or [])
    if objective is None:
        objective = "causal_lm" if ("ForCausalLM" in architectures or "LMHeadModel" in architectures) else "pair_cosine"
    cls = AutoModelForCausalLM if objective == "causal_lm" else AutoModel
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "weights not used" reports for a head left out are expected
    try:
        model = cls.from_pretrained(folder, local_files_only=True, attn_implementation="eager", dtype=DTYPES[dtype])
    finally:
        transformers.logging.set_verbosity(verbosity)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    try:
        model = model.to(device)
    except (RuntimeError, AssertionError) as error:  # no such device, or torch built without it
        raise ValueError(f"--device {device!r}: {error}") from None
    return model.eval(), tokenizer, objective
