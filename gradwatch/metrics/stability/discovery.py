"""Where the family looks in a model: the attention modules, the transformer blocks, the output logits."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import nn

AttentionKind = Literal["mha", "sdpa"]


def _has_children(module: nn.Module, *names: str) -> bool:
    return all(isinstance(getattr(module, n, None), nn.Module) for n in names)


def _attention_kind(module: nn.Module) -> AttentionKind | None:
    if isinstance(module, nn.MultiheadAttention):
        return "mha"
    if (_has_children(module, "q_proj", "k_proj") or _has_children(module, "c_attn")
            or _has_children(module, "query", "key")):
        return "sdpa"
    if type(module).__name__.endswith(("Attention", "SelfAttention")):
        return "sdpa"
    return None


def find_attention_modules(model: nn.Module) -> list[tuple[str, AttentionKind]]:
    """``(name, kind)`` of every attention module: ``nn.MultiheadAttention`` (``"mha"``), and modules with
    Llama-like ``q_proj``/``k_proj``, GPT-2's fused ``c_attn``, BERT's ``query``/``key`` or a class name
    ending in ``Attention`` (``"sdpa"``: read through their SDPA calls). Of nested candidates only the
    innermost is kept (``BertSelfAttention``, not ``BertAttention``)."""
    found = [(name, kind) for name, m in model.named_modules() if (kind := _attention_kind(m)) is not None]
    names = [n for n, _ in found]

    def has_candidate_below(name: str) -> bool:
        prefix = f"{name}." if name else ""
        return any(o != name and o.startswith(prefix) for o in names)

    return [(n, k) for n, k in found if not has_candidate_below(n)]


def find_blocks(model: nn.Module, attention: Sequence[str]) -> list[str]:
    """Names of the transformer blocks: members of an ``nn.ModuleList`` containing an attention module
    (the innermost such list wins)."""
    blocks: list[str] = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.ModuleList):
            continue
        for i, _ in enumerate(m):
            child = f"{name}.{i}" if name else str(i)
            if any(a == child or a.startswith(child + ".") for a in attention):
                blocks.append(child)
    return [b for b in blocks if not any(o != b and o.startswith(b + ".") for o in blocks)]


_HEAD_NAMES = ("lm_head", "classifier", "head", "decoder", "output", "fc_out", "logits")


def find_logits_module(model: nn.Module) -> tuple[str, Literal["hf", "head", "top"]]:
    """Where the output logits are read (see the module docstring)."""
    for name, m in model.named_modules():
        if hasattr(m, "config") and callable(getattr(m, "get_output_embeddings", None)):
            cls = type(m).__name__
            if "For" in cls or "LMHead" in cls:
                return name, "hf"
    head = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in _HEAD_NAMES:
            head = name
    if head is not None:
        return head, "head"
    return "", "top"


def _submodule(model: nn.Module, name: str) -> nn.Module:
    return model if name == "" else model.get_submodule(name)
