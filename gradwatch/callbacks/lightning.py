"""PyTorch Lightning adapter: ``trainer = L.Trainer(..., callbacks=[GradWatch()])``.

Maps Lightning's hooks to the engine and nothing else. Works with both ``lightning`` and
``pytorch_lightning`` (whichever is installed; the TensorBoard logger is matched by class name).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn

from gradwatch.config import WatchConfig
from gradwatch.engine.probe import ProbeSet
from gradwatch.engine.watcher import Watcher
from gradwatch.integrations.tensorboard import TensorBoardSink

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover - the classic package name
    try:
        from pytorch_lightning.callbacks import Callback  # type: ignore[no-redef]
    except ImportError as exc:
        raise ImportError("gradwatch.callbacks.lightning needs Lightning: pip install 'gradwatch[lightning]'") from exc


def _tensorboard_writer(trainer: Any) -> Any | None:
    for logger in getattr(trainer, "loggers", []) or []:
        if type(logger).__name__ == "TensorBoardLogger":
            return logger.experiment
    return None


def _first_loader(loaders: Any) -> Any | None:
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


class _SilencedLogging:
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
    with _SilencedLogging(module):
        out = module.training_step(batch, 0)  # type: ignore[operator]
    if isinstance(out, dict):
        out = out["loss"]
    if not isinstance(out, Tensor):
        raise ValueError(f"gradwatch: training_step returned {type(out).__name__}; expected a loss Tensor or "
                         "a dict with a 'loss' key (manual optimization is not supported by probe diagnostics)")
    return out


class GradWatch(Callback):
    """Live gradient diagnostics for a Lightning ``Trainer``.

    Args:
        config: a :class:`gradwatch.WatchConfig`; or pass its fields as keywords
            (``GradWatch(spectra=SpectraConfig(every=10))``).

    Gradients are read in ``on_before_optimizer_step``: accumulated over micro-batches, unscaled, all-reduced
    under DDP and before gradient clipping. Values are logged at step t = ``trainer.global_step + 1``, the
    optimizer step being taken (the same numbering as Hugging Face's ``state.global_step`` after it).
    """

    def __init__(self, config: WatchConfig | None = None, **kwargs: Any) -> None:
        self.config = WatchConfig.from_kwargs(config, **kwargs)
        self.watcher = Watcher(self.config)
        self.log_dir: str | None = None

    def on_train_start(self, trainer: Any, pl_module: nn.Module) -> None:
        sinks = []
        if trainer.is_global_zero:
            writer = _tensorboard_writer(trainer) if self.config.log_dir is None else None
            if writer is not None:
                sink = TensorBoardSink(writer=writer)
            else:
                log_dir = self.config.log_dir or os.path.join(trainer.default_root_dir, "gradwatch")
                sink = TensorBoardSink(log_dir=log_dir)
                why = "log_dir was given" if self.config.log_dir is not None else "no TensorBoardLogger on this Trainer"
                print(f"gradwatch: {why}; writing TensorBoard files to {log_dir}")
            self.log_dir = sink.log_dir
            sinks.append(sink)
        loader = _first_loader(getattr(trainer, "train_dataloader", None))

        def probe_factory(size: int) -> ProbeSet:
            if loader is None:
                raise ValueError("gradwatch: probe diagnostics need the training DataLoader; none was found")
            return ProbeSet.from_dataset(loader.dataset, size, seed=self.config.probe_seed,
                                         collate_fn=loader.collate_fn, device=pl_module.device,
                                         loss_fn=self.config.loss_fn, training_loss_fn=lightning_training_loss,
                                         batch_size=loader.batch_size or 64)

        self.watcher.attach(pl_module, sinks=sinks, is_rank_zero=trainer.is_global_zero,
                            probe_factory=probe_factory)

    def on_before_optimizer_step(self, trainer: Any, pl_module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
        self.watcher.on_gradients_ready(trainer.global_step + 1, optimizer=optimizer,
                                        check_skipped=scaler is not None)

    def on_train_end(self, trainer: Any, pl_module: nn.Module) -> None:
        self.watcher.close()

    def state_dict(self) -> dict[str, Any]:
        return self.watcher.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.watcher.load_state_dict(state_dict)
