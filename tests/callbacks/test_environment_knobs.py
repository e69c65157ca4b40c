"""``GRADWATCH_SPECTRA_EVERY=7`` reaches every way of starting gradwatch: ``callbacks=[GradWatch()]`` in Lightning
and in the HF Trainer, and ``report_to=["gradwatch"]``; the spectra are logged at steps 1, 7, 14 (read back from
TensorBoard). What the script sets itself beats the variable, a value equal to its default included."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from _support.tensorboard import read_series

STEPS = 15
TAG = "grad_spectrum/nuclear_norm/"


@pytest.fixture
def env_seven(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for var in [v for v in os.environ if v.startswith("GRADWATCH_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("GRADWATCH_SPECTRA_EVERY", "7")
    monkeypatch.setenv("GRADWATCH_MAX_OVERHEAD", "0")  # no budget: every due step runs (tiny model, busy CPU)


def spectra_steps(root: Path) -> dict[str, list[int]]:
    series = read_series(root, [TAG])
    assert series, f"no {TAG} tags under {root}"
    return {tag: sorted(steps) for tag, steps in series.items()}


def assert_steps(root: Path, expected: list[int]) -> None:
    for tag, steps in spectra_steps(root).items():
        assert steps == expected, (tag, steps)


def test_lightning_callback_reads_the_environment(tmp_path: Path, env_seven: None) -> None:
    pytest.importorskip("lightning")
    from _support.lit import fit

    from gradwatch.callbacks.lightning import GradWatch

    fit(tmp_path / "env", [GradWatch()], max_steps=STEPS)
    assert_steps(tmp_path / "env", [1, 7, 14])
    fit(tmp_path / "code", [GradWatch(spectra=50)], max_steps=STEPS)  # an explicit default beats it
    assert_steps(tmp_path / "code", [1])


def _hf_train(root: Path, callbacks: list[Any], **overrides: Any) -> None:
    pytest.importorskip("transformers")
    import torch
    from _support.hf import trainer, training_args

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: one intra-op thread (see test_transformers.py)
    try:
        args = overrides.pop("args", None) or training_args(root, max_steps=STEPS, **overrides)
        trainer(args, callbacks).train()
    finally:
        torch.set_num_threads(threads)


def test_hf_callback_reads_the_environment(tmp_path: Path, env_seven: None) -> None:
    pytest.importorskip("transformers")
    from gradwatch.callbacks.transformers import GradWatch

    _hf_train(tmp_path / "env", [GradWatch()])
    assert_steps(tmp_path / "env", [1, 7, 14])


def test_report_to_reads_the_environment(tmp_path: Path, env_seven: None) -> None:
    pytest.importorskip("transformers")
    import gradwatch  # noqa: F401  (registers report_to="gradwatch")

    _hf_train(tmp_path / "env", [], report_to=["gradwatch"])
    assert_steps(tmp_path / "env", [1, 7, 14])


def test_hf_fields_reach_the_callback_and_beat_the_environment(tmp_path: Path, env_seven: None) -> None:
    """``gradwatch_*`` fields under ``callbacks=[GradWatch()]`` (once ignored there); a field set to its default
    (``gradwatch_spectra_every=50``) beats ``GRADWATCH_SPECTRA_EVERY=7``."""
    pytest.importorskip("transformers")
    from _support.hf import training_args

    from gradwatch.callbacks.transformers import GradWatch
    from gradwatch.integrations.huggingface import GradWatchTrainingArguments

    base = training_args(tmp_path, max_steps=STEPS).to_dict()
    base = {k: v for k, v in base.items() if k in GradWatchTrainingArguments.__dataclass_fields__
            and GradWatchTrainingArguments.__dataclass_fields__[k].init and not k.startswith("_")}

    def args(root: Path, **fields: Any) -> Any:
        return GradWatchTrainingArguments(**{**base, "output_dir": str(root), **fields})

    _hf_train(tmp_path / "field", [GradWatch()], args=args(tmp_path / "field", gradwatch_spectra_every=5))
    assert_steps(tmp_path / "field", [1, 5, 10, 15])
    _hf_train(tmp_path / "default", [GradWatch()], args=args(tmp_path / "default", gradwatch_spectra_every=50))
    assert_steps(tmp_path / "default", [1])
    _hf_train(tmp_path / "code", [GradWatch(spectra=3)], args=args(tmp_path / "code", gradwatch_spectra_every=5))
    assert_steps(tmp_path / "code", [1, 3, 6, 9, 12, 15])  # the callback's keyword beats the field
