"""Hugging Face adapter: ``Trainer(..., callbacks=[GradWatch()])``.

Maps ``TrainerCallback`` events to the engine and nothing else. HF callbacks never receive the
``Trainer``, yet the pre-clip gradient norm and the TensorBoard writer live on it; the Trainer is found
once, as the ``self`` of the frame that fires ``on_init_end``/``on_train_begin`` (or passed as
``trainer=``), and kept by weak reference.
"""

from __future__ import annotations

import inspect
import os
import weakref
from typing import Any

import torch
from torch import Tensor, nn

from gradwatch.config import WatchConfig
from gradwatch.engine.probe import ProbeSet
from gradwatch.engine.watcher import Watcher
from gradwatch.integrations.tensorboard import TensorBoardSink

try:
    from transformers import Trainer, TrainerCallback
except ImportError as exc:  # pragma: no cover
    raise ImportError("gradwatch.callbacks.transformers needs transformers: pip install 'gradwatch[transformers]'") from exc


def find_calling_trainer(max_depth: int = 12) -> Trainer | None:
    """The ``Trainer`` whose method is on the call stack (every callback event is fired from one)."""
    frame = inspect.currentframe()
    try:
        for _ in range(max_depth):
            if frame is None:
                return None
            owner = frame.f_locals.get("self")
            if isinstance(owner, Trainer):
                return owner
            frame = frame.f_back
    finally:
        del frame
    return None


def hf_training_loss(trainer: Trainer) -> Any:
    """The loss the HF Trainer minimizes on a batch: ``compute_loss``, with ``num_items_in_batch`` counted as
    the training loop counts it (``Trainer._get_num_items_in_batch`` where it exists: labels other than -100,
    after the causal shift for models whose loss shifts labels; else every label other than -100).

    Holds the Trainer by weak reference, so a callback that outlives its Trainer does not keep it (its model,
    optimizer state and data) alive."""
    trainer_ref = weakref.ref(trainer)

    def loss(model: nn.Module, batch: Any) -> Tensor:
        trainer = trainer_ref()
        if trainer is None:
            raise RuntimeError("gradwatch: the Trainer this loss belongs to no longer exists")
        num_items = None
        if isinstance(batch, dict) and "labels" in batch:
            count = getattr(trainer, "_get_num_items_in_batch", None)
            if count is not None:
                num_items = count([batch], batch["labels"].device)
            elif getattr(trainer, "model_accepts_loss_kwargs", False):
                num_items = (batch["labels"] != -100).sum()
        return trainer.compute_loss(model, batch, num_items_in_batch=num_items)

    return loss


class GradWatch(TrainerCallback):
    """Live gradient diagnostics for a Hugging Face ``Trainer``.

    Args:
        config: a :class:`gradwatch.WatchConfig`, or its fields as keywords.
        trainer: the Trainer, if you have it (otherwise found automatically).
        tb_writer: a SummaryWriter to write with (default: the one of HF's own ``TensorBoardCallback``,
            so gradwatch's charts land in the same run; else a writer of our own in the run directory).

    Gradients are read in ``on_pre_optimizer_step`` after HF has clipped them; the pre-clip gradients are
    reconstructed exactly (clipping is one global scale: ``grad * max(1, (norm + 1e-6) / max_norm)``, with
    the pre-clip ``norm`` that ``Trainer._clip_grad_norm`` returns), so the numbers match Lightning's for
    the same run. Values are logged at step ``state.global_step + 1``, the step being taken.
    """

    def __init__(self, config: WatchConfig | None = None, *, trainer: Trainer | None = None,
                 tb_writer: Any = None, **kwargs: Any) -> None:
        self.config = WatchConfig.from_kwargs(config, **kwargs)
        self.watcher = Watcher(self.config)
        self._trainer_ref = weakref.ref(trainer) if trainer is not None else None
        self._tb_writer = tb_writer
        self._clip_norm: Tensor | float | None = None
        self._wrapped: tuple[Any, Any, Any, bool] | None = None
        self.log_dir: str | None = None

    # ---- finding the Trainer --------------------------------------------------------------

    @property
    def trainer(self) -> Trainer | None:
        trainer = self._trainer_ref() if self._trainer_ref is not None else None
        if trainer is None:
            trainer = find_calling_trainer()
            if trainer is not None:
                self._trainer_ref = weakref.ref(trainer)
        return trainer

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        _ = self.trainer

    # ---- events -----------------------------------------------------------------------------

    def _writer(self, args: Any, state: Any) -> TensorBoardSink | None:
        if not state.is_world_process_zero:
            return None
        if self.config.log_dir is not None:
            return TensorBoardSink(log_dir=self.config.log_dir)
        writer = self._tb_writer
        trainer = self.trainer
        if writer is None and trainer is not None:
            for cb in trainer.callback_handler.callbacks:  # HF's TensorBoardCallback (or a subclass)
                if cb is not self and getattr(cb, "tb_writer", None) is not None:
                    writer = cb.tb_writer
                    break
        if writer is not None:
            return TensorBoardSink(writer=writer)
        from transformers.integrations.integration_utils import default_logdir

        log_dir = os.getenv("TENSORBOARD_LOGGING_DIR") or os.path.join(args.output_dir, default_logdir())
        print(f"gradwatch: no TensorBoard writer on this Trainer (report_to has no 'tensorboard'); "
              f"writing TensorBoard files to {log_dir}")
        return TensorBoardSink(log_dir=log_dir)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                       train_dataloader: Any = None, **kwargs: Any) -> None:
        trainer = self.trainer
        sink = self._writer(args, state)
        self.log_dir = sink.log_dir if sink is not None else None
        if trainer is not None and self._wrapped is None:
            original = trainer._clip_grad_norm
            had_own = "_clip_grad_norm" in vars(trainer)  # already wrapped on the instance (another callback)

            def clip_and_remember(model_: nn.Module) -> Any:
                norm = original(model_)
                self._clip_norm = norm
                return norm

            trainer._clip_grad_norm = clip_and_remember  # observe only: same call, same return value
            self._wrapped = (trainer, original, clip_and_remember, had_own)
        loader = train_dataloader
        training_loss = hf_training_loss(trainer) if trainer is not None else None
        model = model if model is not None else getattr(trainer, "model", None)
        device = next(model.parameters()).device if model is not None else torch.device("cpu")

        def probe_factory(size: int) -> ProbeSet:
            if loader is None:
                raise ValueError("gradwatch: probe diagnostics need the training DataLoader; none was given")
            dataset = getattr(loader, "dataset", None)
            return ProbeSet.from_dataset(dataset, size, seed=self.config.probe_seed,
                                         collate_fn=getattr(loader, "collate_fn", None), device=device,
                                         loss_fn=self.config.loss_fn, training_loss_fn=training_loss,
                                         batch_size=args.per_device_train_batch_size)

        resume = getattr(args, "resume_from_checkpoint", None)
        saved = os.path.join(resume, "gradwatch_state.pt") if isinstance(resume, str) else None
        if saved is not None and os.path.isfile(saved):
            self.watcher.load_state_dict(torch.load(saved, weights_only=False))
        self.watcher.attach(model, sinks=[sink] if sink is not None else [],
                            is_rank_zero=state.is_world_process_zero, probe_factory=probe_factory)

    def _preclip_scale(self, args: Any) -> float | None:
        norm, self._clip_norm = self._clip_norm, None
        max_norm = getattr(args, "max_grad_norm", 0) or 0
        if norm is None or max_norm <= 0:
            return None
        norm = float(norm)
        if not (norm == norm) or norm == float("inf"):  # non-finite: clipping made NaNs; nothing to undo
            return None
        # torch.nn.utils.clip_grad_norm_: grads *= min(1, max_norm / (norm + 1e-6))
        coef = min(1.0, max_norm / (norm + 1e-6))
        return 1.0 / coef

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer = self.trainer
        scale = self._preclip_scale(args)
        scaler = getattr(getattr(trainer, "accelerator", None), "scaler", None)
        self.watcher.on_gradients_ready(state.global_step + 1, optimizer=kwargs.get("optimizer"),
                                        grad_scale=scale, check_skipped=scaler is not None)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._wrapped is not None:
            trainer, original, wrapper, had_own = self._wrapped
            # Undo only our own wrapper, and only while it is the outermost one: put back what was there (the
            # class method, or an instance-level wrapper of someone else). A wrapper put over ours stays; ours
            # then just passes the call through.
            if vars(trainer).get("_clip_grad_norm") is wrapper:
                if had_own:
                    trainer._clip_grad_norm = original
                else:
                    del trainer._clip_grad_norm
            self._wrapped = None
        self.watcher.close()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder):
            torch.save(self.watcher.state_dict(), os.path.join(folder, "gradwatch_state.pt"))
