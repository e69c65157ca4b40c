"""PyTorch Lightning adapter: ``trainer = L.Trainer(..., callbacks=[GradWatch()])``.

Maps Lightning's hooks to the engine's events and nothing else; the glue is in
``gradwatch.integrations.lightning``. Works with ``lightning`` and ``pytorch_lightning``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from gradwatch.config import WatchConfig, list_watch_options
from gradwatch.engine.watcher import Watcher
from gradwatch.integrations import lightning as glue
from gradwatch.resolve import resolve_config

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover - the classic package name
    try:
        from pytorch_lightning.callbacks import Callback  # type: ignore[no-redef]
    except ImportError as exc:
        raise ImportError("gradwatch.callbacks.lightning needs Lightning: pip install 'gradwatch[lightning]'") from exc


@list_watch_options  # LightningCLI YAML sees every option
class GradWatch(Callback):
    """Live training diagnostics for a Lightning ``Trainer``.

    Args:
        config: a :class:`gradwatch.WatchConfig`; or its options as keywords (``GradWatch(spectra=10)``: an int
            for a family is its ``every``).

    Options not given here (nor in ``config``) come from the ``GRADWATCH_*`` environment (``gradwatch run``'s
    options), then the defaults: :data:`gradwatch.resolve.PRECEDENCE`. In LightningCLI YAML an option left
    out is ``unset``, so the environment applies to it too.

    Events: step start at the first micro-batch's ``on_train_batch_start`` (each reports its micro-batch's
    examples); gradients ready at
    ``on_before_optimizer_step`` (accumulated, all-reduced, unscaled, before clipping); step end at the
    ``on_train_batch_end`` that follows, with ``training_step``'s loss. Steps are ``global_step + 1``.
    """

    def __init__(self, config: WatchConfig | None = None, **kwargs: Any) -> None:
        self.config = resolve_config(config, kwargs)
        self.watcher = Watcher(self.config)
        self.log_dir: str | None = None
        self._ready: int | None = None

    # each entry point runs inside watcher.counting(): its whole time, glue included, is on gradwatch's clock

    def on_train_start(self, trainer: Any, pl_module: nn.Module) -> None:
        with self.watcher.counting(warmup=True):
            sinks, self.log_dir = glue.sinks_for(trainer, self.config)
            self.watcher.attach(pl_module, sinks=sinks,
                                probe_source=glue.probe_source(trainer, pl_module, self.config),
                                resumed_at=trainer.global_step)

    def on_train_batch_start(self, trainer: Any, pl_module: nn.Module, batch: Any, batch_idx: int) -> None:
        with self.watcher.counting():
            if batch_idx % glue.accumulation(trainer) == 0:
                self.watcher.on_step_start(trainer.global_step + 1)
            self.watcher.on_micro_batch(batch)

    def on_before_optimizer_step(self, trainer: Any, pl_module: nn.Module, optimizer: Any) -> None:
        with self.watcher.counting():
            factor, scaled = glue.true_gradient_factor(trainer, optimizer)
            self._ready = trainer.global_step + 1
            self.watcher.on_gradients_ready(self._ready, optimizer=optimizer, grad_scale=factor,
                                            check_skipped=scaled, loss_scale=glue.loss_scale(trainer))

    def on_train_batch_end(self, trainer: Any, pl_module: nn.Module, outputs: Any, batch: Any, batch_idx: int) -> None:
        with self.watcher.counting():
            if self._ready is not None:
                step, self._ready = self._ready, None
                self.watcher.on_step_end(step, loss=glue.step_loss(outputs))

    def on_exception(self, trainer: Any, pl_module: nn.Module, exception: BaseException) -> None:
        with self.watcher.counting():
            self.watcher.on_exception(exception)

    def on_train_end(self, trainer: Any, pl_module: nn.Module) -> None:
        with self.watcher.counting():
            self.watcher.close()

    def state_dict(self) -> dict[str, Any]:
        with self.watcher.counting():
            return self.watcher.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        with self.watcher.counting():
            self.watcher.load_state_dict(state_dict)
