"""What the ``signals`` family reads of the model besides losses: the last layer (its weight for the gradient
confirmation, its input as each probe example's representation) and each probe example's label.

The representation of example i is the input of the last layer (the output head), averaged over the other
positions of a sequence (tokens, weighted by the batch's ``attention_mask`` where it has one), so one vector
per example: ``h_i`` of :func:`gradwatch.functional.signals.shared_direction`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from torch import Tensor, nn


def last_layer_name(model: nn.Module) -> str | None:
    """The last layer's weight: the output embeddings of a model that declares them (Hugging Face's
    ``get_output_embeddings``), else the last 2-D trainable parameter."""
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            head = getter()
        except Exception:  # noqa: BLE001 - a model may not implement it
            head = None
        weight = getattr(head, "weight", None)
        if isinstance(weight, Tensor):
            for name, p in model.named_parameters(remove_duplicate=False):
                if p is weight:
                    return name
    name = None
    for n, p in model.named_parameters():
        if p.ndim == 2 and p.requires_grad:
            name = n
    return name


def last_layer(model: nn.Module) -> nn.Module | None:
    """The last layer as a module: the output embeddings of a model that declares them (their weight may be
    tied to the input embeddings, which come first by name), else the owner of :func:`last_layer_name`'s
    weight (None: no such weight)."""
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            head = getter()
        except Exception:  # noqa: BLE001 - a model may not implement it
            head = None
        if isinstance(head, nn.Module):
            return head
    name = last_layer_name(model)
    if name is None:
        return None
    owner = name.rpartition(".")[0]
    try:
        return model.get_submodule(owner) if owner else model
    except AttributeError:
        return None


def class_key(example: Any) -> Any:
    """The label of a raw probe example as a hashable class, or None where it has no single label (a
    sequence of token labels, no label at all): ``labels``/``label`` of a mapping, the second item of a
    tuple, as an int or float."""
    y: Any = None
    if isinstance(example, Mapping):
        y = example.get("labels", example.get("label"))
    elif isinstance(example, (tuple, list)) and len(example) >= 2:
        y = example[1]
    if isinstance(y, Tensor):
        if y.numel() != 1:
            return None
        y = y.item()
    if isinstance(y, bool) or not isinstance(y, (int, float)):
        return None
    return y


class HeadInputs:
    """Collects the last layer's input during probe forwards, one row per example (``take`` after each)."""

    def __init__(self, module: nn.Module | None) -> None:
        self.module = module
        self._seen: Tensor | None = None

    @contextlib.contextmanager
    def capturing(self) -> Iterator[HeadInputs]:
        if self.module is None:
            yield self
            return

        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            if args and isinstance(args[0], Tensor):
                self._seen = args[0].detach()

        handle = self.module.register_forward_pre_hook(hook)
        try:
            yield self
        finally:
            handle.remove()
            self._seen = None

    def take(self, batch: Any, count: int) -> Tensor | None:
        """The representation [count, H] (float32) of the ``count`` examples of the batch just run, or None
        when the last layer did not run or its input has no row per example."""
        x, self._seen = self._seen, None
        if x is None or x.ndim < 1 or x.numel() == 0:
            return None
        x = x.float()
        if x.ndim == 1:
            return x.reshape(count, -1) if x.numel() % count == 0 and x.shape[0] == count else None
        if x.shape[0] != count:  # flattened positions, [count * T, H]
            if x.ndim != 2 or x.shape[0] % count:
                return None
            x = x.reshape(count, -1, x.shape[-1])
        if x.ndim == 2:
            return x
        x = x.reshape(count, -1, x.shape[-1])
        mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        if isinstance(mask, Tensor) and mask.shape == x.shape[:2]:
            w = mask.to(x.dtype)[..., None]
            return (x * w).sum(1) / w.sum(1).clamp_min(1.0)
        return x.mean(1)
