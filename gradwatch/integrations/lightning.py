"""Lightning glue kept out of the callback: the TensorBoard writer, the training DataLoader, the module's
own loss with its logging silenced, the loss scale of fp16 gradients, and where to write.

Works with both ``lightning`` and ``pytorch_lightning``; nothing here imports either (loggers and loaders
are duck-typed).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn

from gradwatch.config import WatchConfig
from gradwatch.engine.probe import ProbeSource
from gradwatch.engine.sinks import Sink
from gradwatch.integrations.grad_scale import lightning_scaler, pending_loss_scale
from gradwatch.integrations.sinks import build_sinks


def tensorboard_writer(trainer: Any) -> Any | None:
    """The ``SummaryWriter`` of the trainer's ``TensorBoardLogger`` (matched by class name), or None."""
    for logger in getattr(trainer, "loggers", []) or []:
        if type(logger).__name__ == "TensorBoardLogger":
            return logger.experiment
    return None


def first_loader(loaders: Any) -> Any | None:
    """The first DataLoader of ``trainer.train_dataloader`` (a loader, a list or dict, a CombinedLoader)."""
    if loaders is None:
        return None
    if hasattr(loaders, "dataset"):
        return loaders
    if hasattr(loaders, "flattened"):  # CombinedLoader
        loaders = loaders.flattened
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        for dl in loaders:
            if hasattr(dl, "dataset"):
                return dl
    return None


class SilencedLogging:
    """Silence ``self.log``/``self.log_dict`` of a LightningModule while gradwatch calls its
    ``training_step`` on a probe batch, so the user's logged metrics (checkpoint monitors, early
    stopping) never see a probe value."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __enter__(self) -> None:
        self._had = {k: k in vars(self.module) for k in ("log", "log_dict")}
        self._old = {k: vars(self.module).get(k) for k in ("log", "log_dict")}
        self.module.log = lambda *a, **k: None  # type: ignore[method-assign]
        self.module.log_dict = lambda *a, **k: None  # type: ignore[method-assign]

    def __exit__(self, *exc: Any) -> None:
        for k, had in self._had.items():
            if had:
                setattr(self.module, k, self._old[k])
            else:
                delattr(self.module, k)


def lightning_training_loss(module: nn.Module, batch: Any) -> Tensor:
    """The loss Lightning minimizes on ``batch``: the module's own ``training_step``, its logging silenced,
    its return value read as Lightning reads it (a Tensor, or the ``"loss"`` of a dict)."""
    with SilencedLogging(module):
        out = module.training_step(batch, 0)  # type: ignore[operator]
    return step_loss(out, strict=True)


def step_loss(out: Any, strict: bool = False) -> Tensor | None:
    """The loss in what ``training_step`` returned (a Tensor, or a dict's ``"loss"``)."""
    if isinstance(out, dict):
        out = out.get("loss")
    if isinstance(out, Tensor):
        return out
    if strict:
        raise ValueError(f"gradwatch: training_step returned {type(out).__name__}; expected a loss Tensor or "
                         "a dict with a 'loss' key (manual optimization is not supported by probe diagnostics)")
    return None


def probe_source(trainer: Any, module: nn.Module, config: WatchConfig) -> ProbeSource:
    loader = first_loader(getattr(trainer, "train_dataloader", None))
    return ProbeSource(getattr(loader, "dataset", None), getattr(loader, "collate_fn", None), module.device,
                       getattr(loader, "batch_size", None), config.probe_seed, config.loss_fn,
                       lightning_training_loss)


def sinks_for(trainer: Any, config: WatchConfig) -> tuple[list[Sink], str | None]:
    """Rank zero: sinks writing into the TensorBoardLogger's run (or ``log_dir``, or ``default_root_dir/gradwatch``)."""
    if not trainer.is_global_zero:
        return [], None
    writer = tensorboard_writer(trainer) if config.log_dir is None else None
    if writer is not None:
        return build_sinks(writer=writer, resumed_at=getattr(trainer, "global_step", 0))
    log_dir = config.log_dir or os.path.join(trainer.default_root_dir, "gradwatch")
    why = "log_dir was given" if config.log_dir is not None else "no TensorBoardLogger on this Trainer"
    print(f"gradwatch: {why}; writing TensorBoard files to {log_dir}")
    return build_sinks(log_dir=log_dir, resumed_at=getattr(trainer, "global_step", 0))


def true_gradient_factor(trainer: Any, optimizer: Any) -> tuple[float | None, bool]:
    """(factor turning ``.grad`` into the true gradients, whether a mixed-precision scaler is active).

    Lightning unscales fp16 gradients before ``on_before_optimizer_step`` except for optimizers that
    unscale inside their own kernel (fused AdamW): then ``.grad`` still carries the loss scale."""
    scaler = lightning_scaler(trainer)
    if scaler is None:
        return None, False
    scale = pending_loss_scale(scaler, optimizer)
    return (None if scale is None else 1.0 / scale), True


def loss_scale(trainer: Any) -> Any:
    """A function returning the fp16 loss scale the step's backward passes carried (read only when asked: a
    host sync on CUDA), or None without a scaler."""
    scaler = lightning_scaler(trainer)
    return None if scaler is None else (lambda: float(scaler.get_scale()))


def accumulation(trainer: Any) -> int:
    return max(int(getattr(trainer, "accumulate_grad_batches", 1) or 1), 1)


def device_of(module: nn.Module) -> torch.device:
    return next((p.device for p in module.parameters()), torch.device("cpu"))
