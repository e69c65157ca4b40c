"""The loss scale the ``.grad`` values still carry under fp16 mixed precision, and where each host keeps its scaler.

Under fp16 AMP the backward runs on ``scaler.scale(loss)``, so every ``.grad`` is the true gradient times
the current scale ``S`` until ``GradScaler.unscale_(optimizer)`` divides it back. Whether that has happened
when a callback reads the gradients depends on the host and on the optimizer:

* Lightning ``MixedPrecision`` (``precision="16-mixed"``, or the plugin passed explicitly) calls
  ``scaler.unscale_(optimizer)`` before ``on_before_optimizer_step`` *unless* the optimizer unscales inside
  its own step (``_optimizer_handles_unscaling``: ``optimizer._step_supports_amp_scaling``, True for torch's
  ``fused=True`` Adam/AdamW/SGD). With a fused AdamW the gradients a callback sees there are still times S.
* Hugging Face ``Trainer`` (accelerate) unscales inside ``Accelerator.clip_grad_norm_`` →
  ``unscale_gradients`` → ``scaler.unscale_``. transformers 5.x calls ``clip_grad_norm_`` every step (with
  ``max_norm=inf`` when ``max_grad_norm`` is 0, to log ``grad_norm``); transformers 4.x calls it only when
  ``max_grad_norm > 0``, so without clipping the gradients at ``on_pre_optimizer_step`` are still times S.
* Every host: gradients read right after a backward (Lightning ``on_after_backward``, any micro-batch of an
  accumulation) are always still scaled.

Rather than encode these host rules, :func:`pending_loss_scale` reads the one fact that decides it, the
scaler's per-optimizer stage (``torch/amp/grad_scaler.py``):

* ``GradScaler._per_optimizer_states`` is a ``defaultdict`` keyed by ``id(optimizer)`` (the *torch*
  optimizer, not a Lightning/accelerate wrapper) whose entries start as ``{"stage": OptState.READY, ...}``;
* ``unscale_(optimizer)`` divides the gradients in place (by ``1 / S`` computed in float64) and sets the stage
  to ``OptState.UNSCALED``;
* ``step(optimizer)`` calls ``unscale_`` itself when the stage is ``READY`` and the optimizer does not set
  ``_step_supports_amp_scaling``; otherwise it hands ``optimizer.grad_scale = S`` (or ``None`` when already
  ``UNSCALED``) to the fused kernel, which unscales and writes the gradients back (observed on CPU for
  ``AdamW(fused=True)``, torch 2.13). Either way the stage ends ``OptState.STEPPED``;
* ``update()`` replaces the whole dict by a fresh ``defaultdict`` (every optimizer ``READY`` again) and may
  change the scale.

So, between the backward and ``scaler.step``: stage ``READY`` (or no entry yet) means the gradients are times
``scaler.get_scale()``; ``UNSCALED`` or ``STEPPED`` means they are true gradients. After ``scaler.update()``
the stage says nothing about gradients left over from the finished step: read them before the step
(Lightning ``on_before_optimizer_step`` / ``on_after_backward``, HF ``on_pre_optimizer_step``), not after.

Nothing here imports Lightning or transformers; the host helpers are duck-typed.
"""

from __future__ import annotations

from typing import Any

__all__ = ["hf_scaler", "lightning_scaler", "pending_loss_scale", "torch_optimizer", "unscaled"]


def torch_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside a host wrapper: Lightning's ``LightningOptimizer`` keeps it in
    ``_optimizer``, accelerate's ``AcceleratedOptimizer`` in ``optimizer``. The scaler's per-optimizer state
    is keyed by the id of this inner object."""
    seen = set()
    while id(optimizer) not in seen:
        seen.add(id(optimizer))
        inner = getattr(optimizer, "_optimizer", None)
        if inner is None:
            inner = getattr(optimizer, "optimizer", None)
        if inner is None or not hasattr(inner, "param_groups"):
            return optimizer
        optimizer = inner
    return optimizer


def pending_loss_scale(scaler: Any, optimizer: Any) -> float | None:
    """The factor the ``.grad`` values of ``optimizer``'s parameters still carry, or ``None`` when they are
    already the true gradients.

    Rule (torch ``GradScaler``, see the module docstring): if ``scaler`` is ``None`` or disabled, ``None``;
    else look up ``scaler._per_optimizer_states.get(id(torch_optimizer(optimizer)))``. A missing entry or
    ``stage is OptState.READY`` means nobody has unscaled yet, so the gradients are times
    ``scaler.get_scale()``, which is returned; ``OptState.UNSCALED`` (after ``unscale_``) or
    ``OptState.STEPPED`` (after ``step``, which unscales in place, in the fused kernel too) give ``None``.
    True gradient = ``grad / pending_loss_scale(...)`` when it is not ``None`` (for the power-of-two scales
    GradScaler uses this is bitwise what ``unscale_`` would produce, barring inf/NaN).

    Valid between the backward and ``scaler.step`` of an optimizer step. After ``scaler.update()`` every
    entry is reset to ``READY`` while gradients left from that step are already unscaled, so a call there
    answers wrongly; the host callbacks to use are Lightning ``on_before_optimizer_step`` /
    ``on_after_backward`` and HF ``on_pre_optimizer_step``.

    ``scaler.get_scale()`` is a device-to-host sync on CUDA (one ``.item()``); ``ShardedGradScaler`` (FSDP1)
    keeps the same per-optimizer states and is handled alike.

    Args:
        scaler: A ``torch.amp.GradScaler`` (or a subclass, or anything with its ``is_enabled``,
            ``get_scale`` and ``_per_optimizer_states``), or ``None``.
        optimizer: The optimizer whose gradients are read; host wrappers are unwrapped.
    """
    if scaler is None:
        return None
    is_enabled = getattr(scaler, "is_enabled", None)
    if is_enabled is not None and not is_enabled():
        return None
    states = getattr(scaler, "_per_optimizer_states", None)
    if states is None:  # not a torch GradScaler we know; say nothing rather than guess
        return None
    state = states.get(id(torch_optimizer(optimizer)))  # .get: indexing the defaultdict would insert an entry
    stage = None if state is None else state.get("stage")
    if stage is not None and getattr(stage, "name", str(stage)) != "READY":
        return None  # UNSCALED or STEPPED: unscale_ already divided the gradients in place
    return float(scaler.get_scale())


def unscaled(grad: Any, scale: float | None) -> Any:
    """``grad / scale``, or ``grad`` itself when ``scale`` is ``None`` (the result of
    :func:`pending_loss_scale`). Works on tensors and DTensors; never writes to ``grad``."""
    return grad if scale is None else grad / scale


def lightning_scaler(trainer: Any) -> Any:
    """The ``GradScaler`` a Lightning ``Trainer`` (or Fabric) uses, or ``None``.

    ``MixedPrecision`` and ``FSDPPrecision`` keep it in ``.scaler`` (``None`` for bf16, which needs none);
    the other precision plugins have no ``scaler``. Looked up on ``trainer.precision_plugin``, then on
    ``trainer.strategy.precision_plugin`` (the same object in Lightning 2.x), then Fabric's
    ``_precision``.
    """
    plugin = getattr(trainer, "precision_plugin", None)
    if plugin is None:
        plugin = getattr(getattr(trainer, "strategy", None), "precision_plugin", None)
    if plugin is None:
        plugin = getattr(getattr(trainer, "strategy", None), "precision", None)
    if plugin is None:
        plugin = getattr(trainer, "_precision", None)
    return _enabled(getattr(plugin, "scaler", None))


def hf_scaler(trainer: Any) -> Any:
    """The ``GradScaler`` a Hugging Face ``Trainer`` uses, or ``None``.

    accelerate keeps it in ``Accelerator.scaler`` (also captured by each ``AcceleratedOptimizer`` as
    ``.scaler`` at ``prepare``). It is ``None`` for bf16, for DeepSpeed (which scales inside its engine) and
    for fp16 on CPU: accelerate creates a scaler only when ``mixed_precision == "fp16"`` and
    ``device.type != "cpu"`` (``Accelerator.__init__``), so ``TrainingArguments(fp16=True, use_cpu=True)``
    trains in plain float32 with neither autocast nor scaler.
    """
    scaler = getattr(getattr(trainer, "accelerator", None), "scaler", None)
    if scaler is None:
        scaler = getattr(getattr(trainer, "optimizer", None), "scaler", None)
    return _enabled(scaler)


def _enabled(scaler: Any) -> Any:
    if scaler is None:
        return None
    is_enabled = getattr(scaler, "is_enabled", None)
    return scaler if is_enabled is None or is_enabled() else None
