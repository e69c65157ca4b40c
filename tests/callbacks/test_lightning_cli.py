"""The Lightning callback from a LightningCLI YAML file: ``trainer.callbacks`` with ``class_path`` and
``init_args``, nested family configs included, run end to end and read back from TensorBoard.

LightningCLI builds callbacks with jsonargparse, which sees only the parameters in ``GradWatch.__init__``'s
signature; ``gradwatch.config.list_watch_options`` gives it every option (families from the registry).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("jsonargparse", reason="LightningCLI needs jsonargparse[signatures]: pip install -e '.[dev]'")
pytest.importorskip("docstring_parser", reason="LightningCLI needs jsonargparse[signatures]")

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402
from conftest import read_scalars  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from gradwatch.callbacks.lightning import GradWatch  # noqa: E402

CALLBACK = "gradwatch.callbacks.lightning.GradWatch"
WEIGHTS = ("body.0.weight", "body.2.weight", "head.weight")



class CliModule(L.LightningModule):
    """A 10-32-32-4 MLP classifier (its sizes are CLI options too)."""

    def __init__(self, hidden: int = 32, lr: float = 0.05) -> None:
        super().__init__()
        self.lr = lr
        self.body = nn.Sequential(nn.Linear(10, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.head = nn.Linear(hidden, 4)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self.head(self.body(x)), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class CliData(L.LightningDataModule):
    """A learnable 4-class problem (labels from a fixed random linear map)."""

    def __init__(self, n: int = 160, batch_size: int = 16) -> None:
        super().__init__()
        self.n, self.batch_size = n, batch_size

    def setup(self, stage: str) -> None:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(self.n, 10, generator=g)
        self.dataset = TensorDataset(x, (x @ torch.randn(10, 4, generator=g)).argmax(1))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["train.py"])  # LightningCLI warns when given args beside a real sys.argv


def config_file(tmp_path: Path, callback: dict[str, Any], max_steps: int = 10) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": max_steps, "log_every_n_steps": 1,
            "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(tmp_path), "name": "cli", "version": 0}},
            "callbacks": [callback],
        },
        "model": {"hidden": 24},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def cli(args: list[str], run: bool = True) -> LightningCLI:
    return LightningCLI(CliModule, CliData, args=args, run=run, save_config_callback=None)


def the_callback(trainer: L.Trainer) -> GradWatch:
    (watch,) = [c for c in trainer.callbacks if isinstance(c, GradWatch)]
    return watch


def test_callback_by_class_path_alone(tmp_path: Path) -> None:
    """``class_path`` with no ``init_args``: the defaults (spectra every 50 steps, and the first)."""
    path = config_file(tmp_path, {"class_path": CALLBACK}, max_steps=3)
    result = cli(["fit", "--config", str(path)])
    watch = the_callback(result.trainer)
    assert watch.log_dir == str(tmp_path / "cli" / "version_0")  # the logger's run directory
    scalars = read_scalars(watch.log_dir)
    assert set(scalars["train_loss"]) == {0, 1, 2}  # the module's own metric, in the same run
    for weight in WEIGHTS:
        assert set(scalars[f"grad_spectrum/nuclear_norm/{weight}"]) == {1}


def test_nested_family_config_end_to_end(tmp_path: Path) -> None:
    """``spectra: {class_path: gradwatch.SpectraConfig, init_args: {every: 5}}`` and general options."""
    path = config_file(tmp_path, {"class_path": CALLBACK, "init_args": {
        "spectra": {"class_path": "gradwatch.SpectraConfig",
                    "init_args": {"every": 5, "stats": ["nuclear_norm", "effective_rank"], "heatmap_every": 10}},
        "include": ["body.*"], "max_overhead": None, "on_error": "raise"}})
    result = cli(["fit", "--config", str(path)])
    watch = the_callback(result.trainer)
    config = watch.config
    assert config.spectra.stats == ("nuclear_norm", "effective_rank") and config.max_overhead is None
    assert config.include == ("body.*",) and config.on_error == "raise"
    scalars = read_scalars(watch.log_dir)
    assert set(scalars["train_loss"]) == set(range(10))
    spectra = {t for t in scalars if t.startswith("grad_spectrum/") and t.endswith(".weight") and "/mad/" not in t}
    assert spectra == {f"grad_spectrum/{s}/{w}" for s in ("nuclear_norm", "effective_rank")
                       for w in ("body.0.weight", "body.2.weight")}
    for tag in spectra:
        assert set(scalars[tag]) == {1, 5, 10}, tag


def test_family_configs_as_plain_mappings(tmp_path: Path) -> None:
    """The short form: a family's options as a mapping (no class_path), two families, and ``false`` for off."""
    path = config_file(tmp_path, {"class_path": CALLBACK, "init_args": {
        "spectra": {"every": 4, "method": "svdvals"},
        "sharpness": {"every": 8, "probe_size": 16},
        "exclude": ["*head*"], "max_overhead": 0.5}})
    config = the_callback(cli(["--config", str(path)], run=False).trainer).config
    assert [s for s in range(1, 10) if config.spectra.every.is_due(s)] == [1, 4, 8]
    assert config.spectra.method == "svdvals" and config.exclude == ("*head*",) and config.max_overhead == 0.5
    assert config.sharpness.probe_size == 16 and config.sharpness.every.is_due(8)

    path = config_file(tmp_path, {"class_path": CALLBACK, "init_args": {"spectra": False, "sharpness": True}})
    config = the_callback(cli(["--config", str(path)], run=False).trainer).config
    assert config.spectra is None and config.sharpness is not None


def test_options_on_the_command_line(tmp_path: Path) -> None:
    """The same options as LightningCLI flags, without a file."""
    result = cli(["--trainer.accelerator", "cpu", "--trainer.logger", "false",
                  f"--trainer.callbacks+={CALLBACK}", "--trainer.callbacks.spectra.every", "3",
                  "--trainer.callbacks.max_overhead", "0.25"], run=False)
    config = the_callback(result.trainer).config
    assert config.spectra.every.is_due(3) and not config.spectra.every.is_due(2) and config.max_overhead == 0.25


@pytest.mark.parametrize("init_args, needles", [
    ({"spectra": {"every": 5, "method": "fast"}}, ["method", "'gram'", "'svdvals'", "fast"]),
    ({"spectra": {"class_path": "gradwatch.SpectraConfig", "init_args": {"evry": 5}}}, ["evry"]),
    ({"on_error": "explode"}, ["on_error", "explode"]),
])
def test_invalid_init_args_fail_at_parse_time(tmp_path: Path, capsys: pytest.CaptureFixture,
                                              init_args: dict[str, Any], needles: list[str]) -> None:
    path = config_file(tmp_path, {"class_path": CALLBACK, "init_args": init_args})
    with pytest.raises(SystemExit) as info:
        cli(["--config", str(path)], run=False)
    assert info.value.code != 0
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err
    assert not (tmp_path / "cli").exists()  # nothing ran


def test_unknown_option_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = config_file(tmp_path, {"class_path": CALLBACK, "init_args": {"spectrr": {"every": 5}}})
    with pytest.raises(SystemExit):
        cli(["--config", str(path)], run=False)
    assert "spectrr" in capsys.readouterr().err


def test_environment_under_lightningcli_below_the_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Options left out of ``init_args`` come from ``GRADWATCH_*`` (``gradwatch run``'s options); one written
    there beats the variable, even at its default value (``max_overhead: 0.05``)."""
    monkeypatch.setenv("GRADWATCH_SPECTRA_EVERY", "7")
    monkeypatch.setenv("GRADWATCH_MAX_OVERHEAD", "0.3")
    monkeypatch.setenv("GRADWATCH_ON_ERROR", "raise")
    path = config_file(tmp_path, {"class_path": CALLBACK, "init_args": {"max_overhead": 0.05}})
    config = the_callback(cli(["--config", str(path)], run=False).trainer).config
    assert [s for s in range(1, 15) if config.spectra.every.is_due(s)] == [1, 7, 14]
    assert config.max_overhead == 0.05 and config.on_error == "raise"


def test_saved_config_keeps_options_left_out_unset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """LightningCLI saves the parsed config (``config.yaml`` in the run directory): an option left out is saved
    as ``unset`` and reads back as left out, so a rerun from the saved file still takes the environment."""
    monkeypatch.setenv("GRADWATCH_SPECTRA_EVERY", "7")
    path = config_file(tmp_path, {"class_path": CALLBACK, "init_args": {"include": ["body.*"]}}, max_steps=2)
    LightningCLI(CliModule, CliData, args=["fit", "--config", str(path)], save_config_kwargs={"overwrite": True})
    saved = tmp_path / "cli" / "version_0" / "config.yaml"
    text = saved.read_text()
    assert "max_overhead: unset" in text and "body.*" in text, text
    config = the_callback(cli(["fit", "--config", str(saved)]).trainer).config  # a rerun from the saved file
    assert config.include == ("body.*",) and config.spectra.every.is_due(7) and not config.spectra.every.is_due(50)
