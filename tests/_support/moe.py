"""Mixture-of-experts test models and float64 references for the ``moe`` family.

- :class:`TopKRouter`: the hand-written top-k router, following gradwatch's router convention: its forward
  returns ``(logits [N, E], weights [N, k], indices [N, k])``, an index of -1 marking an assignment dropped
  because its expert was full (``capacity`` assignments per expert and call, first come first served).
- :class:`TinyMoE`: a causal LM of :class:`MoELayer` blocks (that router, ``E`` Linear experts), with a
  Hugging Face style forward (``{"loss", "logits"}``); ``gate="linear"`` swaps the router for a plain
  ``nn.Linear`` gate named ``gate`` (logits only; ``top_k`` on the parent block).
- :func:`tiny_mixtral` and friends: Hugging Face MoE models built from a config, no download
  (:func:`tiny_switch`: Switch Transformers, whose routers drop tokens over their expert capacity).
- :class:`RouterTap`: the test's own forward hooks on the routers, keeping float64 copies of what each call
  returned; :func:`reference`: every statistic of the family from such copies, in numpy float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


class TopKRouter(nn.Module):
    """Top-k softmax router with an optional expert capacity (see the module docstring)."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, capacity: int | None = None) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.capacity = num_experts, top_k, capacity
        self.weight = nn.Parameter(torch.randn(num_experts, hidden) / math.sqrt(hidden))
        self.bias = nn.Parameter(torch.zeros(num_experts))

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h = h.reshape(-1, h.shape[-1])
        logits = F.linear(h, self.weight, self.bias)
        top, indices = logits.topk(self.top_k, dim=-1)
        weights = torch.softmax(top, dim=-1)
        if self.capacity is not None:
            hot = F.one_hot(indices, self.num_experts)  # (N, k, E): token order, then slot order
            position = (hot.reshape(-1, self.num_experts).cumsum(0).reshape(hot.shape) * hot).sum(-1)
            indices = torch.where(position > self.capacity, torch.full_like(indices, -1), indices)
        return logits, weights, indices


class MoELayer(nn.Module):
    """A residual mixture of ``num_experts`` Linear-tanh experts, combined densely (deterministic)."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, capacity: int | None, gate: str) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        if gate == "router":
            self.router = TopKRouter(hidden, num_experts, top_k, capacity)
        else:
            self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh()) for _ in range(num_experts))

    def forward(self, x: Tensor) -> Tensor:
        h = x.reshape(-1, x.shape[-1])
        if hasattr(self, "router"):
            _, weights, indices = self.router(h)
        else:
            top, indices = self.gate(h).topk(self.top_k, dim=-1)
            weights = torch.softmax(top, dim=-1)
        kept = indices >= 0
        combine = torch.zeros(h.shape[0], self.num_experts, dtype=h.dtype).scatter_add(
            1, indices.clamp(min=0), weights * kept)
        out = sum(combine[:, e:e + 1] * expert(h) for e, expert in enumerate(self.experts))
        return x + out.reshape(x.shape)


class TinyMoE(nn.Module):
    """Token embedding, ``layers`` MoE blocks, a ``head``; next-token cross-entropy when given labels."""

    def __init__(self, vocab: int = 32, hidden: int = 16, num_experts: int = 4, top_k: int = 2, layers: int = 2,
                 capacity: int | None = None, gate: str = "router", seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.vocab = vocab
        self.embed = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(MoELayer(hidden, num_experts, top_k, capacity, gate) for _ in range(layers))
        self.head = nn.Linear(hidden, vocab)

    def forward(self, input_ids: Tensor, labels: Tensor | None = None, attention_mask: Tensor | None = None) -> dict:
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h)
        logits = self.head(h)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits[:, :-1].reshape(-1, self.vocab), labels[:, 1:].reshape(-1))
        return out

    def plant_collapse(self, experts: Sequence[int] = (0, 1), bias: float = 20.0) -> TinyMoE:
        """Every router biased towards ``experts`` (frozen there): collapsed routing, planted."""
        with torch.no_grad():
            for layer in self.layers:
                layer.router.bias.zero_()
                layer.router.bias[list(experts)] = bias
                layer.router.bias.requires_grad_(False)
        return self


def _hf_moe(kind: str, num_experts: int = 8, top_k: int = 2, vocab: int = 64, seed: int = 0) -> nn.Module:
    import transformers

    common = dict(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=32, num_experts_per_tok=top_k, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2)
    if kind == "mixtral":
        config = transformers.MixtralConfig(num_local_experts=num_experts, **common)
        cls = transformers.MixtralForCausalLM
    elif kind == "qwen2_moe":
        config = transformers.Qwen2MoeConfig(num_experts=num_experts, moe_intermediate_size=16,
                                             shared_expert_intermediate_size=16, decoder_sparse_step=1,
                                             mlp_only_layers=[], **common)
        cls = transformers.Qwen2MoeForCausalLM
    else:
        config = transformers.OlmoeConfig(num_experts=num_experts, **common)
        cls = transformers.OlmoeForCausalLM
    torch.manual_seed(seed)
    return cls(config)


def tiny_mixtral(**kw: Any) -> nn.Module:
    return _hf_moe("mixtral", **kw)


def tiny_qwen2_moe(**kw: Any) -> nn.Module:
    return _hf_moe("qwen2_moe", **kw)


def tiny_olmoe(**kw: Any) -> nn.Module:
    return _hf_moe("olmoe", **kw)


def tiny_switch(num_experts: int = 4, capacity: int = 2, vocab: int = 32, seed: int = 0) -> nn.Module:
    """Switch Transformers (top-1 routers with an expert capacity per sequence: they report dropped tokens)."""
    import transformers

    config = transformers.SwitchTransformersConfig(
        vocab_size=vocab, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=2,
        num_experts=num_experts, expert_capacity=capacity, encoder_sparse_step=1, decoder_sparse_step=1,
        decoder_start_token_id=0, pad_token_id=0, router_jitter_noise=0.0)
    torch.manual_seed(seed)
    return transformers.SwitchTransformersForConditionalGeneration(config)


def token_batches(steps: int, batch: int = 8, seq_len: int = 16, vocab: int = 32, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        ids = torch.randint(3, vocab, (batch, seq_len), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return out


# ---- the test's own capture and the float64 reference -----------------------------------------------


def _parts(output: Any, num_experts: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(logits, indices, mask) as numpy float64 / int64, by the router convention (tests' own reading)."""
    if isinstance(output, Tensor):
        return output.detach().double().reshape(-1, num_experts).numpy(), None, None
    items = list(output)
    if not items[0].is_floating_point():  # Switch Transformers: (mask, probs, logits)
        return (items[-1].detach().double().reshape(-1, num_experts).numpy(), None,
                items[0].detach().reshape(-1, num_experts).numpy())
    return (items[0].detach().double().reshape(-1, num_experts).numpy(),
            items[-1].detach().reshape(items[0].numel() // num_experts, -1).numpy(), None)


class RouterTap:
    """Forward hooks of the test on ``names`` (router modules of ``model``): ``calls[name]`` lists
    (logits, indices, mask) of every call, in order."""

    def __init__(self, model: nn.Module, names: Sequence[str], num_experts: int) -> None:
        self.calls: dict[str, list[tuple]] = {n: [] for n in names}
        self.handles = [model.get_submodule(n).register_forward_hook(self._hook(n, num_experts)) for n in names]

    def _hook(self, name: str, num_experts: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self.calls[name].append(_parts(output, num_experts))
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def reference(calls: Sequence[tuple], top_k: int | None = None) -> dict[str, Any]:
    """Every statistic of the ``moe`` family over ``calls`` of one router, in numpy float64: ``load`` (the
    shares), ``load_cv``, ``load_max``, ``load_entropy``, ``entropy``, ``z_loss``, ``log_z`` and, where the
    router reported its assignments, ``dropped``."""
    logits = np.concatenate([c[0] for c in calls])
    e = logits.shape[1]
    m = logits.max(1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(1, keepdims=True)))[:, 0]
    p = np.exp(logits - lse[:, None])
    entropy = -(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)).sum(1)
    counts = np.zeros(e)
    slots = dropped = 0.0
    reported = False
    for z, idx, mask in calls:
        if idx is not None:
            reported = True
            flat = idx.reshape(-1)
            for j in flat:
                if 0 <= j < e:
                    counts[j] += 1
            slots += flat.size
            dropped += float(((flat < 0) | (flat >= e)).sum())
        elif mask is not None:
            reported = True
            counts += (mask != 0).sum(0)
            slots += z.shape[0] * (top_k or 1)
            dropped += z.shape[0] * (top_k or 1) - float((mask != 0).sum())
        else:
            for row in np.argsort(-z, axis=1, kind="stable")[:, :top_k]:
                counts[row] += 1
    share = counts / counts.sum()
    out = {"load": share, "load_cv": float(counts.std() / counts.mean()), "load_max": float(e * share.max()),
           "load_entropy": float(-(share[share > 0] * np.log(share[share > 0])).sum()),
           "entropy": float(entropy.mean()), "z_loss": float((lse ** 2).mean()), "log_z": float(lse.mean())}
    if reported:
        out["dropped"] = dropped / slots
    return out
