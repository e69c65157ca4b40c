"""What the ``signals`` family reads of the model besides losses: the last layer (its weight, for the gradient
confirmation), each probe example's representation at the model's input, and each probe example's label.

The representation of example i, ``h_i`` of :func:`gradwatch.functional.signals.shared_direction`, is what
enters the model: the output of the input embeddings (Hugging Face's ``get_input_embeddings``, or a first
layer that is an ``nn.Embedding``), else the input of the first layer with parameters (pixels, features),
flattened; sequences are averaged over their positions (weighted by the batch's ``attention_mask`` where it
has one), so one vector per example. The input and not a deep layer, because the feature an opposing signal
shares is a property of the data (a sky background, a token), while a trained network's last layers warp
the two groups toward their labels: on MiniLM with a rare word planted in two groups of opposite labels, the
classifier's input showed the groups deviating in opposite directions (cosine -0.98), the input embeddings
the same direction. :class:`LayerInputs` reads any module's input (the output head's, for the tests).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from torch import Tensor, nn


def _declared(model: nn.Module, getter_name: str) -> nn.Module | None:
    """The module a Hugging Face model declares by ``get_output_embeddings``/``get_input_embeddings``, or None."""
    getter = getattr(model, getter_name, None)
    if not callable(getter):
        return None
    try:
        module = getter()
    except Exception:  # noqa: BLE001 - a model may not implement it
        return None
    return module if isinstance(module, nn.Module) else None


def last_layer_name(model: nn.Module) -> str | None:
    """The last layer's weight: the output embeddings of a model that declares them (Hugging Face's
    ``get_output_embeddings``), else the last 2-D trainable parameter."""
    weight = getattr(_declared(model, "get_output_embeddings"), "weight", None)
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
    head = _declared(model, "get_output_embeddings")
    if head is not None:
        return head
    name = last_layer_name(model)
    if name is None:
        return None
    owner = name.rpartition(".")[0]
    try:
        return model.get_submodule(owner) if owner else model
    except AttributeError:
        return None


def raw_label(example: Any) -> Any:
    """The label of a raw probe example as given: ``labels``/``label`` of a mapping, the second item of a
    tuple or list (None: no label)."""
    if isinstance(example, Mapping):
        return example.get("labels", example.get("label"))
    if isinstance(example, (tuple, list)) and len(example) >= 2:
        return example[1]
    return None


def class_key(example: Any) -> Any:
    """The label of a raw probe example as a hashable class, or None where it has no single label (a
    sequence of token labels, no label at all): ``labels``/``label`` of a mapping, the second item of a
    tuple, as an int or float."""
    y = raw_label(example)
    if isinstance(y, Tensor):
        if y.numel() != 1:
            return None
        y = y.item()
    if isinstance(y, bool) or not isinstance(y, (int, float)):
        return None
    return y


def input_layer(model: nn.Module) -> tuple[nn.Module, bool] | None:
    """(module, whether its output is read) for the model's input representation: the input embeddings (their
    output), else the first module with parameters of its own (its input; an ``nn.Embedding``: its output)."""
    emb = _declared(model, "get_input_embeddings")
    if emb is not None:
        return emb, True
    for module in model.modules():
        if any(True for _ in module.parameters(recurse=False)):
            return module, isinstance(module, nn.Embedding)
    return None


class LayerInputs:
    """Collects a module's input (or, with ``output``, its output) during probe forwards, one row per example
    (``take`` after each batch). The first call per forward counts."""

    def __init__(self, module: nn.Module | None, output: bool = False) -> None:
        self.module, self.output = module, output
        self._seen: Tensor | None = None

    @classmethod
    def of_input(cls, model: nn.Module) -> LayerInputs:
        """The model's input representation (:func:`input_layer`)."""
        found = input_layer(model)
        return cls(None) if found is None else cls(*found)

    @contextlib.contextmanager
    def capturing(self) -> Iterator[LayerInputs]:
        if self.module is None:
            yield self
            return

        def pre_hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            if self._seen is None and args and isinstance(args[0], Tensor) and args[0].is_floating_point():
                self._seen = args[0].detach()

        def hook(_module: nn.Module, _args: Any, out: Any) -> None:
            if self._seen is None and isinstance(out, Tensor) and out.is_floating_point():
                self._seen = out.detach()

        handle = (self.module.register_forward_hook(hook) if self.output
                  else self.module.register_forward_pre_hook(pre_hook))
        try:
            yield self
        finally:
            handle.remove()
            self._seen = None

    def take(self, batch: Any, count: int) -> Tensor | None:
        """The representation [count, H] (float32) of the ``count`` examples of the batch just run, or None
        when the module did not run or what it read has no row per example."""
        x, self._seen = self._seen, None
        if x is None or x.ndim < 1 or x.numel() == 0:
            return None
        x = x.float()
        if x.ndim > 3 or (x.ndim == 3 and not self.output and x.shape[0] == count
                          and not _is_sequence(batch, x)):  # pixels [B, C, H, W] or [B, C, L]: flattened
            return x.reshape(count, -1) if x.shape[0] == count else None
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


def _is_sequence(batch: Any, x: Tensor) -> bool:
    """Whether ``x`` [B, T, H] is a sequence of the batch's tokens (its ``attention_mask`` is [B, T])."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    return isinstance(mask, Tensor) and mask.shape == x.shape[:2]
