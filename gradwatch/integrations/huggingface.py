"""Hugging Face glue with no code in the training script: ``TrainingArguments(report_to=["gradwatch"])``.

``report_to`` names are looked up at ``Trainer`` construction in
``transformers.integrations.integration_utils.INTEGRATION_TO_CALLBACK`` (a private dict, verified on
transformers 5.x); gradwatch adds its name there. The class registered does everything ``"tensorboard"``
does (``--report_to`` on the command line takes one value) plus gradwatch, configured from the
``gradwatch_*`` fields of :class:`GradWatchTrainingArguments` (also ``HfArgumentParser`` flags) or the
defaults when plain ``TrainingArguments`` are used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments
from transformers.integrations.integration_utils import TensorBoardCallback

from gradwatch.config import SharpnessConfig, SpectraConfig, WatchConfig

REPORT_TO_NAME = "gradwatch"


@dataclass
class GradWatchTrainingArguments(TrainingArguments):
    """``TrainingArguments`` with gradwatch's knobs (each also a ``--gradwatch_*`` command-line flag)."""

    gradwatch_spectra_every: int = field(default=50, metadata={"help": "gradient spectra every N steps (0: off)"})
    gradwatch_spectra_method: str = field(default="gram", metadata={"help": "gram | gram32 | svdvals"})
    gradwatch_per_example_every: int = field(default=0, metadata={"help": "per-example spectra every N steps (0: off)"})
    gradwatch_sharpness_every: int = field(default=0, metadata={"help": "top Hessian eigenvalue every N steps (0: off)"})
    gradwatch_sharpness_probe_size: int = field(default=256, metadata={"help": "probe examples for sharpness"})
    gradwatch_include: str = field(default="*", metadata={"help": "comma-separated globs over parameter names"})
    gradwatch_exclude: str = field(default="", metadata={"help": "comma-separated globs to leave out"})
    gradwatch_max_overhead: float = field(default=0.05, metadata={"help": "share of wall time gradwatch may use "
                                                                          "(0: no budget)"})
    gradwatch_on_error: str = field(default="warn", metadata={"help": "warn | raise"})

    def __post_init__(self) -> None:
        super().__post_init__()
        config_from_training_args(self)  # a bad gradwatch_* value fails here (ValueError), not at train time


def config_from_training_args(args: Any) -> WatchConfig:
    """The :class:`WatchConfig` described by ``gradwatch_*`` fields (defaults where absent)."""

    def get(name: str, default: Any) -> Any:
        return getattr(args, f"gradwatch_{name}", default)

    spectra_every = get("spectra_every", 50)
    per_example_every = get("per_example_every", 0)
    spectra: bool | SpectraConfig = False
    if spectra_every:
        spectra = SpectraConfig(every=spectra_every, method=get("spectra_method", "gram"),
                                per_example=bool(per_example_every), per_example_every=per_example_every or 500)
    sharpness_every = get("sharpness_every", 0)
    sharpness: bool | SharpnessConfig = False
    if sharpness_every:
        sharpness = SharpnessConfig(every=sharpness_every, probe_size=get("sharpness_probe_size", 256))
    split = lambda s: tuple(p.strip() for p in s.split(",") if p.strip())  # noqa: E731
    return WatchConfig(spectra=spectra, sharpness=sharpness, include=split(get("include", "*")) or ("*",),
                       exclude=split(get("exclude", "")), max_overhead=get("max_overhead", 0.05) or None,
                       on_error=get("on_error", "warn"))


class GradWatchTensorBoardCallback(TensorBoardCallback):
    """What ``report_to=["gradwatch"]`` builds (with no arguments): HF's TensorBoard logging plus gradwatch
    in the same writer."""

    def __init__(self, tb_writer: Any = None) -> None:
        super().__init__(tb_writer)
        self.gradwatch: Any = None

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        from gradwatch.callbacks.transformers import GradWatch, find_calling_trainer

        self.gradwatch = GradWatch(config_from_training_args(args), trainer=find_calling_trainer())

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        super().on_train_begin(args, state, control, **kwargs)
        self.gradwatch._tb_writer = self.tb_writer
        self.gradwatch.on_train_begin(args, state, control, **kwargs)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.gradwatch.on_pre_optimizer_step(args, state, control, **kwargs)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.gradwatch.on_save(args, state, control, **kwargs)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.gradwatch.on_train_end(args, state, control, **kwargs)
        super().on_train_end(args, state, control, **kwargs)


def register_report_to() -> bool:
    """Make ``report_to=["gradwatch"]`` known to transformers. Returns whether it could be registered."""
    try:
        from transformers.integrations import integration_utils
    except ImportError:  # pragma: no cover
        return False
    table = getattr(integration_utils, "INTEGRATION_TO_CALLBACK", None)
    if not isinstance(table, dict):
        return False  # this transformers keeps report_to names elsewhere: use callbacks=[GradWatch()]
    table[REPORT_TO_NAME] = GradWatchTensorBoardCallback
    return True


register_report_to()  # importing this module first (before transformers' table) must register too
