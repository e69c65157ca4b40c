"""Hugging Face glue kept out of the callback: the ``gradwatch_*`` arguments, finding the Trainer, its training
loss, the pre-clip gradient norm, the step's loss, the loss scale of fp16 gradients, and where to write.

The private ``Trainer`` internals used here (``_clip_grad_norm``, ``training_step``'s return value,
``_get_num_items_in_batch``) are each isolated in one small class, checked on transformers 4.46-5.x; every
wrapper is observe-only (same call, same return value) and removed at train end.

``report_to=["gradwatch"]``: the registration lives with the adapter (``gradwatch.callbacks.transformers``).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import time
import warnings
import weakref
from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import Tensor, nn

from gradwatch.config import WatchConfig
from gradwatch.engine.probe import ProbeSource
from gradwatch.engine.sinks import Sink
from gradwatch.integrations.grad_scale import hf_scaler, pending_loss_scale
from gradwatch.integrations.sinks import build_sinks
from gradwatch.knobs import knobs
from gradwatch.resolve import HF_FIELD_PREFIX, resolve_config

FIELD_PREFIX = HF_FIELD_PREFIX
# torch.nn.utils.clip_grad_norm_ scales by max_norm / (total_norm + 1e-6) (torch/nn/utils/clip_grad.py);
# accelerate's clip_grad_norm_ calls it, so the pre-clip gradient is grad / min(1, that factor).
TORCH_CLIP_EPS = 1e-6


# ---- arguments -------------------------------------------------------------------------------------


def _field_type(knob: Any) -> Any:
    return Optional[knob.type]  # None: not given (the environment, then the default, decide)


def arguments_dataclass(name: str = "GradWatchArguments") -> type:
    """A dataclass with one ``gradwatch_<knob>`` field per knob, for
    ``HfArgumentParser((TrainingArguments, GradWatchArguments))``. Every field defaults to None, "not given":
    the ``GRADWATCH_*`` environment and then the defaults decide (the help names the default). Built from the
    knobs as they are when called: ``gradwatch.integrations.huggingface.GradWatchArguments`` is built anew
    after a family is registered."""
    specs = []
    for k in knobs():
        meta: dict[str, Any] = {"help": f"{k.help} (default: {k.default!r})"}
        if k.choices:
            meta["choices"] = list(k.choices)
        specs.append((FIELD_PREFIX + k.name, _field_type(k), dataclasses.field(default=None, metadata=meta)))

    def post_init(self: Any) -> None:
        config_from_training_args(self, environ={})  # a bad value fails at parse time, naming the field

    return dataclasses.make_dataclass(name, specs, namespace={
        "__post_init__": post_init, "__module__": __name__,
        "__doc__": "gradwatch's knobs as dataclass fields (None: not given)."})


def _training_arguments_class() -> type:
    from transformers import TrainingArguments

    knob_fields = [(f.name, f.type, dataclasses.field(default=None, metadata=f.metadata))
                   for f in dataclasses.fields(_derived("GradWatchArguments"))]

    def post_init(self: Any) -> None:
        TrainingArguments.__post_init__(self)
        config_from_training_args(self, environ={})

    return dataclasses.make_dataclass(
        "GradWatchTrainingArguments", knob_fields, bases=(TrainingArguments,),
        namespace={"__post_init__": post_init, "__module__": __name__,
                   "__doc__": "``TrainingArguments`` with gradwatch's knobs (each also a ``--gradwatch_*`` flag)."})


_BUILT: dict[str, tuple[tuple[str, ...], type]] = {}


def _derived(name: str) -> type:
    """``GradWatchArguments`` / ``GradWatchTrainingArguments`` for the knobs as they are now (the same class
    while the knobs do not change)."""
    names = tuple(k.name for k in knobs())
    built = _BUILT.get(name)
    if built is None or built[0] != names:
        cls = arguments_dataclass() if name == "GradWatchArguments" else _training_arguments_class()
        _BUILT[name] = built = (names, cls)
    return built[1]


def __getattr__(name: str) -> Any:
    if name in ("GradWatchArguments", "GradWatchTrainingArguments"):  # built on use: importing this module
        return _derived(name)  # imports no transformers, and a family registered later gets its fields
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def config_from_training_args(args: Any, *, environ: Mapping[str, str] | None = None,
                              base: Mapping[str, Any] | None = None) -> WatchConfig:
    """The :class:`WatchConfig` of ``gradwatch_*`` fields, the ``GRADWATCH_*`` environment and the defaults
    (``base``: options given in code, above them), by :data:`gradwatch.resolve.PRECEDENCE`: a field is given
    when it is not None, whatever its value (``gradwatch_spectra_every=50`` beats ``GRADWATCH_SPECTRA_EVERY``).

    Raises:
        ValueError: naming the field (``gradwatch_spectra_every=-3``) or the variable the bad value came from,
            the value and what is valid. Each value is checked alone, a family's option with its family switched
            on, so a bad option of a family that is off fails too (as it does from the environment).
    """
    return resolve_config(keywords=base, training_args=args, environ=environ)


# ---- the Trainer, its loss, its clip norm, its step loss ---------------------------------------------


def find_calling_trainer(max_depth: int = 12) -> Any | None:
    """The ``Trainer`` whose method is on the call stack (callback events are fired from one; its callback
    handler is at most a few frames up, 12 leaves room for subclasses)."""
    from transformers import Trainer

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


class HFTrainingLoss:
    """The loss the HF Trainer minimizes on a batch: ``compute_loss``, with ``num_items_in_batch`` counted as
    the training loop counts it (``Trainer._get_num_items_in_batch`` where it exists: labels other than -100,
    after the causal shift for models whose loss shifts labels; else every label other than -100).

    Holds the Trainer by weak reference, so a callback that outlives its Trainer does not keep it alive."""

    def __init__(self, trainer: Any) -> None:
        self._trainer = weakref.ref(trainer)

    def __call__(self, model: nn.Module, batch: Any) -> Tensor:
        trainer = self._trainer()
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


class _InstanceWrapper:
    """Wraps one method on one Trainer instance, observe-only, and undoes exactly that."""

    method: str

    def __init__(self) -> None:
        self._installed: tuple[Any, Any, Any, bool] | None = None

    def install(self, trainer: Any) -> None:
        if self._installed is not None:
            return
        original = getattr(trainer, self.method)
        had_own = self.method in vars(trainer)  # already wrapped on the instance (another callback)
        wrapper = self._wrap(original)
        setattr(trainer, self.method, wrapper)
        self._installed = (trainer, original, wrapper, had_own)

    def uninstall(self) -> None:
        if self._installed is None:
            return
        trainer, original, wrapper, had_own = self._installed
        # Undo only our own wrapper, and only while it is the outermost one: a wrapper put over ours stays,
        # and ours then just passes the call through.
        if vars(trainer).get(self.method) is wrapper:
            if had_own:
                setattr(trainer, self.method, original)
            else:
                delattr(trainer, self.method)
        self._installed = None

    def _wrap(self, original: Any) -> Any:
        raise NotImplementedError


class ClipNormRecorder(_InstanceWrapper):
    """Remembers the pre-clip total norm ``Trainer._clip_grad_norm`` returns, to undo the clip exactly."""

    method = "_clip_grad_norm"

    def __init__(self) -> None:
        super().__init__()
        self.norm: Tensor | float | None = None

    def _wrap(self, original: Any) -> Any:
        def clip_and_remember(model: nn.Module) -> Any:
            norm = original(model)
            self.norm = norm
            return norm

        return clip_and_remember

    def preclip_factor(self, max_grad_norm: float | None) -> float | None:
        """The factor undoing this step's clip: grads were multiplied by min(1, max_norm / (norm + eps))."""
        norm, self.norm = self.norm, None
        if norm is None or not max_grad_norm or max_grad_norm <= 0:
            return None
        norm = float(norm)
        if norm != norm or norm == float("inf"):  # non-finite: clipping made NaNs; nothing to undo
            return None
        return 1.0 / min(1.0, max_grad_norm / (norm + TORCH_CLIP_EPS))


class StepLossRecorder(_InstanceWrapper):
    """The mean of ``Trainer.training_step``'s returned losses over the micro-batches of a step (each is the
    micro-batch loss divided by the accumulation steps, so their sum is the step's loss); ``on_inputs`` is
    told each micro-batch's inputs before it runs; ``on_spent(seconds)`` the wrapper's own time (gradwatch's,
    spent inside the host's step), the wrapped ``training_step`` aside."""

    method = "training_step"

    def __init__(self, on_inputs: Any = None, on_spent: Any = None) -> None:
        super().__init__()
        self._total: Tensor | None = None
        self._on_inputs = on_inputs  # told each micro-batch's inputs before it runs
        self._on_spent = on_spent

    def _wrap(self, original: Any) -> Any:
        def step_and_remember(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            if self._on_inputs is not None:
                inputs = args[1] if len(args) > 1 else kwargs.get("inputs")
                self._on_inputs(inputs)
            t1 = time.perf_counter()
            loss = original(*args, **kwargs)
            t2 = time.perf_counter()
            if isinstance(loss, Tensor):
                self._total = loss.detach() if self._total is None else self._total + loss.detach()
            if self._on_spent is not None:
                self._on_spent(t1 - t0 + time.perf_counter() - t2)
            return loss

        return step_and_remember

    def pop(self) -> Tensor | None:
        total, self._total = self._total, None
        return total


def true_gradient_factor(trainer: Any, optimizer: Any, clip_factor: float | None) -> tuple[float | None, bool]:
    """(factor turning ``.grad`` into the true pre-clip gradients, whether a mixed-precision scaler is
    active). Without clipping, accelerate never unscales fp16 gradients before the optimizer step, so
    ``.grad`` still carries the loss scale then."""
    scaler = hf_scaler(trainer)
    loss_scale = pending_loss_scale(scaler, optimizer) if scaler is not None else None
    factor = clip_factor
    if loss_scale is not None:
        factor = (factor or 1.0) / loss_scale
    return factor, scaler is not None


def loss_scale(trainer: Any) -> Any:
    """A function returning the fp16 loss scale the step's backward passes carried (read only when asked), or
    None without a scaler."""
    scaler = hf_scaler(trainer)
    return None if scaler is None else (lambda: float(scaler.get_scale()))


def token_decoder(trainer: Any) -> Any | None:
    """``decode(example) -> str`` through the Trainer's tokenizer (``processing_class``, or its ``tokenizer``),
    for examples with ``input_ids``; None when the Trainer has no tokenizer."""
    tokenizer = getattr(trainer, "processing_class", None) or getattr(trainer, "tokenizer", None)
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor wraps its tokenizer
    if not callable(getattr(tokenizer, "decode", None)):
        return None

    def decode(example: Any) -> str:
        ids = example["input_ids"] if isinstance(example, Mapping) else example
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        return tokenizer.decode(ids, skip_special_tokens=True)

    return decode


def probe_source(trainer: Any, args: Any, model: nn.Module | None, loader: Any, config: WatchConfig) -> ProbeSource:
    device = next(model.parameters()).device if model is not None else torch.device("cpu")
    return ProbeSource(getattr(loader, "dataset", None), getattr(loader, "collate_fn", None), device,
                       args.per_device_train_batch_size, config.probe_seed, config.loss_fn,
                       HFTrainingLoss(trainer) if trainer is not None else None,
                       token_decoder(trainer) if trainer is not None else None)


def host_writer(trainer: Any, exclude: Any = None) -> Any | None:
    """The ``tb_writer`` of HF's ``TensorBoardCallback`` (or a subclass) on this Trainer, if any."""
    if trainer is None:
        return None
    for cb in trainer.callback_handler.callbacks:
        if cb is not exclude and getattr(cb, "tb_writer", None) is not None:
            return cb.tb_writer
    return None


def sinks_for(args: Any, state: Any, config: WatchConfig, writer: Any) -> tuple[list[Sink], str | None]:
    """Rank zero: sinks writing with ``writer`` (HF's own), or into ``log_dir``, or HF's default run dir."""
    if not state.is_world_process_zero:
        return [], None
    if config.log_dir is not None:
        return build_sinks(log_dir=config.log_dir, resumed_at=getattr(state, "global_step", 0))
    if writer is not None:
        return build_sinks(writer=writer, resumed_at=getattr(state, "global_step", 0))
    from transformers.integrations.integration_utils import default_logdir

    log_dir = os.getenv("TENSORBOARD_LOGGING_DIR") or os.path.join(args.output_dir, default_logdir())
    print(f"gradwatch: no TensorBoard writer on this Trainer (report_to has no 'tensorboard'); "
          f"writing TensorBoard files to {log_dir}")
    return build_sinks(log_dir=log_dir, resumed_at=getattr(state, "global_step", 0))


STATE_FILE = "gradwatch_state.pt"


def resume_folder(trainer: Any, args: Any, state: Any = None) -> str | None:
    """The checkpoint folder this run resumes from, or None when the Trainer starts afresh.

    ``Trainer.train`` resumes only from its ``resume_from_checkpoint`` argument (a path, or ``True``: the last
    ``checkpoint-N`` in ``output_dir``), which it keeps in no public place, so it is read from the ``train``
    call on the stack. ``TrainingArguments(resume_from_checkpoint=...)`` is not read by the Trainer
    (transformers 4.x and 5.x: HF's example scripts pass it on to ``train()``); it is used only when the Trainer
    did resume from it (a subclass that reads it). gradwatch follows the Trainer: with ``state`` (the
    ``TrainerState`` at train begin) at step 0 nothing was resumed, so nothing is restored (restoring would
    carry a finished run's counters, warm starts and open intervals into a new run at step 1), and a path given
    only in the arguments is reported once.
    """
    resume = _train_call_argument()
    from_call = resume is not None and resume is not False
    if not from_call:
        resume = getattr(args, "resume_from_checkpoint", None)
    if resume is True:
        from transformers.trainer_utils import get_last_checkpoint

        resume = get_last_checkpoint(args.output_dir)
    folder = resume if isinstance(resume, str) else None
    if folder is not None and state is not None and not getattr(state, "global_step", 0):
        if not from_call:
            warnings.warn(f"gradwatch: TrainingArguments.resume_from_checkpoint={folder!r} is not read by "
                          "Trainer.train(), which starts at step 0; gradwatch starts afresh too. To resume, call "
                          "trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)", RuntimeWarning,
                          stacklevel=2)
        return None
    return folder


def _train_call_argument(max_depth: int = 16) -> Any:
    frame = inspect.currentframe()
    try:
        for _ in range(max_depth):
            if frame is None:
                return None
            if frame.f_code.co_name in ("train", "_inner_training_loop") and "resume_from_checkpoint" in frame.f_locals:
                value = frame.f_locals["resume_from_checkpoint"]
                if value not in (None, False):
                    return value
            frame = frame.f_back
    finally:
        del frame
    return None


def load_state(folder: str | None) -> dict[str, Any] | None:
    path = os.path.join(folder, STATE_FILE) if folder else None
    if path is None or not os.path.isfile(path):
        return None
    return torch.load(path, weights_only=True)


def save_state(args: Any, state: Any, watcher_state: dict[str, Any]) -> None:
    folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
    if os.path.isdir(folder):
        torch.save(watcher_state, os.path.join(folder, STATE_FILE))
