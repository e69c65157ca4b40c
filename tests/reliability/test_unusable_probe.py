"""Probe data gradwatch cannot use: training finishes, one warning says what is wrong and what gradwatch expects,
the diagnostics that need a per-example loss on the probe set (per-example spectra, signals, example quality)
go quiet for the rest of the run (nothing logged after the step that found it, no second warning), and every
other family keeps logging at every step.

Sharpness takes its loss from the host (Lightning's ``training_step``, HF's ``compute_loss``), which these
cases leave intact, so it keeps logging too. Through Lightning (every case) and the Hugging Face Trainer (a
forward returning a tuple without logits).
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from _support.models import DictData, classification_data, mlp
from _support.tensorboard import read_series
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from gradwatch import SharpnessConfig, SignalsConfig, SpectraConfig, StabilityConfig, WatchConfig
from gradwatch.engine.probe import ProbeSet, ProbeUnusable
from gradwatch.metrics.example_quality import ExampleQualityConfig

STEPS = 4
QUIET = ("grad_spectrum/per_example/", "signals/", "example_quality/")  # need a per-example probe loss
LOUD = ("grad_spectrum/nuclear_norm/", "stability/", "sharpness/")  # the others: every step, finite


def config() -> WatchConfig:
    return WatchConfig(spectra=SpectraConfig(every=1, per_example=True, per_example_every=1, per_example_size=4),
                       sharpness=SharpnessConfig(every=1, probe_size=8, max_iter=3),
                       signals=SignalsConfig(every=1, burst=2, window=5, probe_size=8),
                       stability=StabilityConfig(every=1), example_quality=ExampleQualityConfig(every=1, size=4),
                       max_overhead=None)


class Examples(Dataset):
    """32 examples of :func:`classification_data`, each shaped by ``make(x, y, i)``."""

    def __init__(self, make: Callable[[Tensor, Tensor, int], Any]) -> None:
        self.x, self.y = classification_data(32)
        self.make = make

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> Any:
        return self.make(self.x[i], self.y[i], i)


def collate_with_text(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"x": torch.stack([d["x"] for d in items]), "labels": torch.stack([d["labels"] for d in items]),
            "name": [d["name"] for d in items], "meta": None}


class Module(L.LightningModule):
    """:func:`mlp` trained on its own loss, whatever the batch looks like; ``tuple_out``: the forward returns
    ``(None, logits)`` (a loss slot left empty, as a model called without labels may)."""

    def __init__(self, tuple_out: bool = False, self_supervised: bool = False) -> None:
        super().__init__()
        self.net, self.tuple_out, self.self_supervised = mlp(0), tuple_out, self_supervised

    def forward(self, x: Tensor) -> Any:
        logits = self.net(x)
        return (None, logits) if self.tuple_out else logits

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        if isinstance(batch, dict):
            x, y = batch.get("x", batch.get("feat")), batch.get("labels", batch.get("target"))
        else:
            x, y = batch
        logits = self.net(x)
        if self.self_supervised:  # its labels are all -100: it trains on something else
            return logits.square().mean()
        return F.cross_entropy(logits, y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


CASES: dict[str, tuple[Callable[[Tensor, Tensor, int], Any], Any, dict[str, bool], str]] = {
    # name: (example, collate_fn, Module kwargs, what the one warning must say)
    # (4: the first diagnostic to meet the probe, per-example spectra, uses its own per_example_size of the draw)
    "labels all -100": (lambda x, y, i: (x, torch.tensor(-100)), None, {"self_supervised": True},
                        r"every label of the 4 probe examples is -100 \(ignored\).*expects labels it can score"),
    "strings and None in a batch": (lambda x, y, i: {"x": x, "labels": y, "name": f"example {i}"},
                                    collate_with_text, {},
                                    r"cannot be called with the probe batch's keys \(x: a Tensor, name: a list "
                                    r"of \(str\), meta: a NoneType\).*expects a batch of the forward's keyword"),
    "a forward returning a tuple": (lambda x, y, i: (x, y), None, {"tuple_out": True},
                                    r"output on a probe batch \(a tuple of \(NoneType, Tensor\)\) holds no logits"
                                    r"; gradwatch expects a Tensor, a `logits` field or a tuple"),
    "a loss it cannot infer": (lambda x, y, i: {"feat": x, "target": y}, None, {},
                               r"cannot infer a per-example loss for Module with batches of type dict.*"
                               r"pass `loss_fn="),
}


def gradwatch_warnings(caught: list[Any]) -> list[str]:
    return [str(w.message) for w in caught if str(w.message).startswith("gradwatch")
            and "Adam second moments" not in str(w.message)]  # SGD keeps none: said once, not the probe's fault


def check_quiet_and_loud(series: dict[str, dict[int, float]], found_at: int = 1) -> None:
    quiet = {t: s for t, s in series.items() if t.startswith(QUIET)}
    assert quiet, "the probe families never ran"
    for tag, steps in quiet.items():
        assert max(steps) <= found_at, f"{tag} logged after the probe data was found unusable: {sorted(steps)}"
    for prefix in LOUD:
        tags = [t for t in series if t.startswith(prefix)]
        assert tags, f"nothing under {prefix}"
        for tag in tags:
            assert sorted(series[tag]) == list(range(1, STEPS + 1)), (tag, sorted(series[tag]))
        assert any(all(math.isfinite(v) for v in series[t].values()) for t in tags), prefix


@pytest.mark.parametrize("case", list(CASES))
def test_lightning_unusable_probe_data(case: str, tmp_path: Any) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger

    from gradwatch.callbacks.lightning import GradWatch

    make, collate, kwargs, expected = CASES[case]
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, logger=TensorBoardLogger(str(tmp_path), "tb"),
                        callbacks=[GradWatch(config())], enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, log_every_n_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Module(**kwargs), DataLoader(Examples(make), batch_size=8, collate_fn=collate))
    assert trainer.global_step == STEPS
    messages = gradwatch_warnings(caught)
    assert len(messages) == 1, messages
    assert re.search(expected, messages[0]), messages[0]
    assert "Off for the rest of this run: " in messages[0] and "PerExampleGradSpectrum" in messages[0]
    check_quiet_and_loud(read_series(tmp_path, QUIET + LOUD))


class TupleNet(nn.Module):
    """A Hugging Face style model that returns ``(loss, logits)``, the loss None without labels."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp(0)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> tuple[Tensor | None, Tensor]:
        logits = self.net(x)
        return (None if labels is None else F.cross_entropy(logits, labels)), logits


def test_hf_forward_returning_a_tuple_without_logits(tmp_path: Any) -> None:
    from _support.hf import training_args
    from transformers import Trainer

    from gradwatch.callbacks.transformers import GradWatch

    args = training_args(tmp_path, max_steps=STEPS, per_device_train_batch_size=8, optim="sgd")
    trainer = Trainer(model=TupleNet(), args=args, train_dataset=DictData(32), callbacks=[GradWatch(config())])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert trainer.state.global_step == STEPS
    messages = gradwatch_warnings(caught)
    assert len(messages) == 1 and "(a tuple of (NoneType, Tensor)) holds no logits" in messages[0], messages
    check_quiet_and_loud(read_series(tmp_path, QUIET + LOUD))


def test_drawing_from_an_empty_dataset_is_refused() -> None:
    """An empty dataset: Lightning trains no step (nothing to warn about); gradwatch's draw from it raises
    :class:`ProbeUnusable` (a ValueError), which the engine turns into the one warning above."""
    with pytest.raises(ProbeUnusable, match="the training dataset is empty; probe diagnostics need examples"):
        ProbeSet.from_dataset(torch.utils.data.TensorDataset(torch.zeros(0, 8)), 4, device=torch.device("cpu"))
    with pytest.raises(ProbeUnusable, match="the training dataset is empty"):
        ProbeSet.from_dataset(_EmptyStream(), 4, device=torch.device("cpu"))


class _OneShot(torch.utils.data.IterableDataset):
    """A stream that can be read once (its own iterator), like a generator handed to a DataLoader."""

    def __init__(self) -> None:
        self.items = iter([torch.full((8,), float(i)) for i in range(6)])

    def __iter__(self) -> Any:
        return self

    def __next__(self) -> Any:
        return next(self.items)


def test_a_one_shot_stream_is_refused_without_taking_an_example() -> None:
    """Drawing from a stream that can be read once would take its examples from training (observe-only):
    refused, and every example is still there for training."""
    stream = _OneShot()
    with pytest.raises(ProbeUnusable, match="one-shot stream"):
        ProbeSet.from_dataset(stream, 4, device=torch.device("cpu"))
    assert [float(x[0]) for x in stream] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


class _EmptyStream(torch.utils.data.IterableDataset):
    def __iter__(self) -> Any:
        return iter(())


def test_lightning_empty_dataset_finishes_quietly(tmp_path: Any) -> None:
    from gradwatch.callbacks.lightning import GradWatch

    trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, logger=False, callbacks=[GradWatch(config())],
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Module(), DataLoader(torch.utils.data.TensorDataset(torch.zeros(0, 8), torch.zeros(0).long())))
    assert trainer.global_step == 0 and gradwatch_warnings(caught) == []
