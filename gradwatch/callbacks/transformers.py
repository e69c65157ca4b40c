"""Hugging Face adapter: ``Trainer(..., callbacks=[GradWatch()])``, or no code: ``report_to=["gradwatch"]``.

Maps ``TrainerCallback`` events to the engine's events and nothing else; the glue is in
``gradwatch.integrations.huggingface``. HF callbacks never receive the ``Trainer``, yet the pre-clip norm,
the step's loss and the TensorBoard writer live on it: it is found once, as the ``self`` of the frame that
fires ``on_init_end``/``on_train_begin`` (or passed as ``trainer=``), and kept by weak reference.
"""

from __future__ import annotations

import weakref
from typing import Any

from gradwatch.config import WatchConfig
from gradwatch.engine.watcher import Watcher
from gradwatch.integrations import huggingface as glue
from gradwatch.resolve import resolve_config

try:
    from transformers import TrainerCallback
    from transformers.integrations.integration_utils import TensorBoardCallback
except ImportError as exc:  # pragma: no cover
    raise ImportError("gradwatch.callbacks.transformers needs transformers: pip install 'gradwatch[transformers]'") from exc

REPORT_TO_NAME = "gradwatch"


class GradWatch(TrainerCallback):
    """Live training diagnostics for a Hugging Face ``Trainer``.

    Args:
        config: a :class:`gradwatch.WatchConfig`, or its options as keywords (``GradWatch(spectra=10)``: an int
            for a family is its ``every``).
        trainer: the Trainer, if you have it (otherwise found automatically).
        tb_writer: a SummaryWriter to write with (default: that of HF's own ``TensorBoardCallback``, so
            gradwatch's charts land in the same run; else a writer of our own in HF's run directory).

    Events: step start at ``on_step_begin`` (before the first micro-batch; each micro-batch's inputs are
    reported from ``Trainer.training_step``); gradients ready at
    ``on_pre_optimizer_step``, after HF clipped them: the pre-clip gradients are rebuilt exactly (clipping is
    one global scale, undone with the pre-clip norm ``Trainer._clip_grad_norm`` returned) and fp16 gradients
    still carrying the loss scale are unscaled; step end at ``on_step_end`` with the step's loss. Steps are
    ``state.global_step + 1`` at gradients ready, the step being taken.

    Options not given here (nor in ``config``) come from the Trainer's ``gradwatch_*`` TrainingArguments
    fields, then the ``GRADWATCH_*`` environment (``gradwatch run``'s options), then the defaults
    (:data:`gradwatch.resolve.PRECEDENCE`); the fields are read when the Trainer is built (``on_init_end``)
    or at the latest at train begin.
    """

    def __init__(self, config: WatchConfig | None = None, *, trainer: Any = None, tb_writer: Any = None,
                 **kwargs: Any) -> None:
        self._given_config, self._keywords = config, dict(kwargs)
        self.config = resolve_config(config, self._keywords)  # a bad keyword or variable fails here
        self.watcher = Watcher(self.config)
        self._args_read = False
        self._trainer_ref = weakref.ref(trainer) if trainer is not None else None
        self._tb_writer = tb_writer
        self._clip = glue.ClipNormRecorder()
        self._loss = glue.StepLossRecorder(on_inputs=lambda inputs: self.watcher.on_micro_batch(inputs),
                                           on_spent=lambda seconds: self.watcher._spent_in_hooks(seconds))
        self.log_dir: str | None = None

    def read_training_args(self, args: Any) -> None:
        """Resolve again with ``args``' ``gradwatch_*`` fields (once, before training starts)."""
        if self._args_read or args is None:
            return
        self._args_read = True
        self.config = resolve_config(self._given_config, self._keywords, training_args=args, warn_unknown=False)
        self.watcher = Watcher(self.config)

    @property
    def trainer(self) -> Any:
        trainer = self._trainer_ref() if self._trainer_ref is not None else None
        if trainer is None:
            trainer = glue.find_calling_trainer()
            if trainer is not None:
                self._trainer_ref = weakref.ref(trainer)
        return trainer

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        _ = self.trainer
        self.read_training_args(args)

    # each entry point runs inside watcher.counting(): its whole time, glue included, is on gradwatch's clock

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, train_dataloader: Any = None,
                       **kwargs: Any) -> None:
        self.read_training_args(args)  # may build a new Watcher: before its counting() block
        with self.watcher.counting(warmup=True):
            self._begin(args, state, model, train_dataloader)

    def _begin(self, args: Any, state: Any, model: Any, train_dataloader: Any) -> None:
        trainer = self.trainer
        writer = self._tb_writer or glue.host_writer(trainer, exclude=self)
        sinks, self.log_dir = glue.sinks_for(args, state, self.config, writer)
        if trainer is not None:
            self._clip.install(trainer)
            self._loss.install(trainer)
        model = model if model is not None else getattr(trainer, "model", None)
        saved = glue.load_state(glue.resume_folder(trainer, args, state))
        if saved is not None:
            self.watcher.load_state_dict(saved)
        self.watcher.attach(model, sinks=sinks,
                            probe_source=glue.probe_source(trainer, args, model, train_dataloader, self.config),
                            resumed_at=0 if saved is not None else getattr(state, "global_step", 0))

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        with self.watcher.counting():
            self.watcher.on_step_start(state.global_step + 1)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        with self.watcher.counting():
            factor, scaled = glue.true_gradient_factor(self.trainer, optimizer,
                                                       self._clip.preclip_factor(getattr(args, "max_grad_norm", None)))
            self.watcher.on_gradients_ready(state.global_step + 1, optimizer=optimizer, grad_scale=factor,
                                            check_skipped=scaled, loss_scale=glue.loss_scale(self.trainer))

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        with self.watcher.counting():
            self.watcher.on_step_end(state.global_step, loss=self._loss.pop())

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        with self.watcher.counting():
            self._clip.uninstall()
            self._loss.uninstall()
            self.watcher.close()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        with self.watcher.counting():
            if state.is_world_process_zero:
                glue.save_state(args, state, self.watcher.state_dict())


class GradWatchTensorBoardCallback(TensorBoardCallback):
    """What ``report_to=["gradwatch"]`` builds: HF's TensorBoard logging plus gradwatch, in one writer. Every
    event goes to both: the gradwatch adapter is registered beside it in the Trainer's callback handler."""

    def __init__(self, tb_writer: Any = None) -> None:
        super().__init__(tb_writer)
        self.gradwatch: GradWatch | None = None

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        super().on_init_end(args, state, control, **kwargs)
        trainer = glue.find_calling_trainer()
        # runs after this callback at every event, so it finds this callback's writer at train begin
        self.gradwatch = GradWatch(trainer=trainer)  # every option from the fields, the environment, the defaults
        self.gradwatch.read_training_args(args)
        if trainer is not None:
            trainer.add_callback(self.gradwatch)


def register_report_to() -> bool:
    """Make ``report_to=["gradwatch"]`` known to transformers. Returns whether it could be registered."""
    from transformers.integrations import integration_utils

    table = getattr(integration_utils, "INTEGRATION_TO_CALLBACK", None)
    if not isinstance(table, dict):
        return False  # this transformers keeps report_to names elsewhere: use callbacks=[GradWatch()]
    table[REPORT_TO_NAME] = GradWatchTensorBoardCallback
    return True


register_report_to()  # importing this module first (before transformers' table) must register too
