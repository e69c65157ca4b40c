"""Per-example gradients of the scored matrices: ``torch.func`` ``vmap(grad_and_value)`` over a chunk of examples.

A chunk's examples are right-padded to its longest member (the losses in :mod:`.objectives` make padding exact),
and the chunk is sized so that its per-example gradients and activations stay under a memory cap. A chunk of one
(a cap too small for two examples, or a model ``vmap`` cannot trace: data-dependent control flow in its forward)
takes each example alone, unpadded, with ``torch.func.grad_and_value``. Nothing is written to ``.grad`` or to the
parameters; the model is only read.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from gradwatch.scoring.objectives import Encoded, Forward, collate


class PerExampleGradients:
    """Per-example gradients of ``loss(forward, example)`` with respect to the parameters ``names`` of ``model``.

    Args:
        model: the model, in eval mode; read only.
        names: parameter names (from ``named_parameters()``) to differentiate.
        loss: ``loss(forward, example) -> scalar``; ``forward(**inputs)`` runs the model with the given weights.
        pad_id: the token id padding uses.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], loss: Callable[[Forward, Mapping[str, Tensor]], Tensor],
                 pad_id: int) -> None:
        self.model = model
        self.names = list(names)
        self.loss = loss
        self.pad_id = pad_id
        params = dict(model.named_parameters())
        self.weights = {n: params[n].detach() for n in self.names}
        self.use_vmap = True

    def gradient_bytes(self) -> int:
        """Bytes of one example's gradients."""
        return sum(w.numel() * w.element_size() for w in self.weights.values())

    def _function(self) -> Callable[[dict[str, Tensor], Mapping[str, Tensor]], Tensor]:
        from torch.func import functional_call

        model, loss = self.model, self.loss

        def example_loss(weights: dict[str, Tensor], example: Mapping[str, Tensor]) -> Tensor:
            return loss(lambda **inputs: functional_call(model, weights, (), inputs), example)

        return example_loss

    def __call__(self, examples: Sequence[Encoded]) -> tuple[dict[str, Tensor], Tensor, str]:
        """``({name: (B, *shape) gradients}, (B,) losses, how)``, ``how`` being ``"vmap"`` or ``"loop"``."""
        from torch.func import grad_and_value, vmap

        fn = grad_and_value(self._function())
        device = next(iter(self.weights.values())).device
        examples = [{k: v.to(device) for k, v in ex.items()} for ex in examples]
        with torch.no_grad():  # torch.func.grad differentiates inside; nothing else records a graph
            if self.use_vmap and len(examples) > 1:
                try:
                    grads, losses = vmap(fn, in_dims=(None, 0))(self.weights, collate(examples, self.pad_id))
                    return dict(grads), losses, "vmap"
                except RuntimeError as error:  # data-dependent control flow, an op without a batching rule
                    if "out of memory" in str(error).lower():
                        raise
                    self.use_vmap = False
                    warnings.warn(f"gradwatch score-data: torch.func.vmap cannot trace this model ({str(error)[:200]}); "
                                  f"taking one example at a time", stacklevel=2)
            out: dict[str, list[Tensor]] = {n: [] for n in self.names}
            losses_: list[Tensor] = []
            for ex in examples:
                g, value = fn(self.weights, ex)
                for n in self.names:
                    out[n].append(g[n])
                losses_.append(value)
            return {n: torch.stack(v) for n, v in out.items()}, torch.stack(losses_), "loop"


def chunk_size(per_example_bytes: int, max_bytes: int, batch_size: int | None) -> int:
    """Examples per chunk: ``batch_size`` when given, else as many as fit in ``max_bytes`` (at least one)."""
    if batch_size is not None:
        return max(1, int(batch_size))
    return max(1, int(max_bytes // max(per_example_bytes, 1)))


def activation_bytes(matrix_shapes: Sequence[tuple[int, int]], tokens: int, element_size: int) -> int:
    """A rough bound on one example's saved activations and their gradients: every scored matrix's input and
    output per token, twice (forward and backward), plus as much again for what lies between them."""
    return 4 * tokens * element_size * sum(m + n for m, n in matrix_shapes)


