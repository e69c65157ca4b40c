"""A launcher of the Hugging Face Trainer for :class:`_support.models.DictNet` (CPU, quiet)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from _support.models import DictData, DictNet


def training_args(output_dir: str | os.PathLike, **overrides: Any) -> TrainingArguments:
    kwargs: dict[str, Any] = dict(output_dir=str(output_dir), use_cpu=True, save_strategy="no", report_to=["tensorboard"],
                                  disable_tqdm=True, per_device_train_batch_size=16, max_steps=8, logging_steps=1,
                                  seed=0, data_seed=0, dataloader_num_workers=0, learning_rate=0.05,
                                  lr_scheduler_type="constant", optim="adamw_torch", remove_unused_columns=False)
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def trainer(args: TrainingArguments, callbacks: Sequence[TrainerCallback], *, n: int = 48,
            fp16_scaler: torch.amp.GradScaler | None = None) -> Trainer:
    """A Trainer of a fresh :class:`DictNet` on ``n`` examples. ``fp16_scaler``: put on the accelerator before
    ``train()`` (accelerate builds a GradScaler only off CPU; this is the same object on CPU), with the forward
    autocast to fp16 as accelerate does on a GPU (``args`` must have ``fp16=True``)."""
    t = Trainer(model=DictNet(), args=args, train_dataset=DictData(n), callbacks=list(callbacks))
    if fp16_scaler is not None:
        t.accelerator.scaler = fp16_scaler
        t.accelerator.native_amp = True
    return t


class StopAt(TrainerCallback):
    """Ends training after optimizer step ``step`` (after that step's checkpoint is saved): an interruption."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            control.should_training_stop = True
