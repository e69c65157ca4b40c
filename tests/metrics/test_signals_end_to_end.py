"""The ``signals`` family end to end through both hosts (Lightning and the Hugging Face Trainer): every tag at
every probe step read back from TensorBoard (NaN where undefined), ``signals.jsonl`` and ``alerts.jsonl`` in the
run directory, the pairs text, the knobs, and observe-only: bitwise the same final weights with and without
gradwatch (CPU, ``torch.use_deterministic_algorithms``)."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from _signals_helpers import Classifier, planted
from _support.launch import run_worker
from _support.models import DictNet
from conftest import read_scalars
from torch import Tensor, nn
from torch.utils.data import DataLoader

from gradwatch.callbacks.lightning import GradWatch as LightningGradWatch
from gradwatch.metrics.signals import TAGS, SignalsConfig


def read_jsonl(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ---- Lightning ------------------------------------------------------------------------------------


def lightning_run(root: str, steps: int, config: SignalsConfig | None) -> dict[str, Any]:
    L.seed_everything(0, workers=True, verbose=False)
    module = Classifier()
    data, a, b = planted()
    alerts: list[Any] = []
    cb = None if config is None else LightningGradWatch(signals=config, spectra=False, max_overhead=None,
                                                        on_alert=alerts.append)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", deterministic=True, callbacks=[cb] if cb else [],
                        default_root_dir=root, logger=L.pytorch.loggers.TensorBoardLogger(root, name="", version=""),
                        log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False)
    trainer.fit(module, DataLoader(data, batch_size=1024, shuffle=True, generator=torch.Generator().manual_seed(0)))
    return {"state": {k: v.detach().clone() for k, v in module.state_dict().items()}, "cb": cb, "a": a, "b": b,
            "alerts": alerts, "log_dir": None if cb is None else cb.log_dir}


@pytest.fixture(scope="module")
def lightning_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("signals_lightning")
    config = SignalsConfig(every=1, probe_size=256, window=10)
    return {"without": lightning_run(str(root / "without"), 30, None),
            "with": lightning_run(str(root / "with"), 30, config)}


def test_lightning_observe_only(lightning_runs: dict[str, Any]) -> None:
    without, with_gw = lightning_runs["without"]["state"], lightning_runs["with"]["state"]
    assert not torch.equal(Classifier().state_dict()["net.0.weight"], without["net.0.weight"])  # it trained
    assert [k for k in without if not torch.equal(without[k], with_gw[k])] == []


def test_lightning_tags_records_alerts_and_text(lightning_runs: dict[str, Any]) -> None:
    run = lightning_runs["with"]
    log_dir = run["log_dir"]
    scalars = read_scalars(log_dir)
    for tag in TAGS:
        assert set(scalars[tag]) == set(range(2, 31)), tag  # step 1: no one-step change yet, nothing logged
    assert all(math.isfinite(scalars["signals/outliers"][s]) for s in range(2, 31))
    assert all(math.isnan(scalars["signals/pairs"][s]) for s in range(2, 6))  # pairs need 5 changes
    assert all(scalars["signals/alarm"][s] in (0.0, 1.0) for s in range(6, 31))
    assert max(scalars["signals/opposing_score"][s] for s in range(6, 31)) >= 0.9
    rows = read_jsonl(os.path.join(log_dir, "signals.jsonl"))
    assert [r["step"] for r in rows] == list(range(2, 31))
    assert all(set(r) >= {"step", "outliers", "pairs"} for r in rows)
    alarmed = [r for r in rows if any(p["alarm"] for p in r["pairs"])]
    assert len(alarmed) >= 10
    top = alarmed[-1]["pairs"][0]
    assert {"a", "b", "score", "alarm"} <= set(top)
    sides = (set(top["a"]), set(top["b"]))
    a, b = run["a"], run["b"]
    assert max(min(len(sides[0] & a) / len(sides[0]), len(sides[1] & b) / len(sides[1])),
               min(len(sides[0] & b) / len(sides[0]), len(sides[1] & a) / len(sides[1]))) >= 0.6
    written = read_jsonl(os.path.join(log_dir, "alerts.jsonl"))
    assert written and written[0]["rule"] == "signals/opposing_pair" and written[0]["severity"] == "warning"
    assert isinstance(written[0]["step"], int) and written[0]["evidence"]["score"] >= 0.6
    assert [al.rule for al in run["alerts"]] == [w["rule"] for w in written]  # on_alert got the same
    from tbparse import SummaryReader

    text = SummaryReader(log_dir).text
    tables = text[text["tag"].str.startswith("signals/pairs")]
    assert sorted(tables["step"]) == list(range(2, 31))
    header = "| pair | score | side | dataset index | label | loss | example |"
    shown = [(int(step), value) for step, value in zip(tables["step"], tables["value"]) if header in value]
    assert len(shown) >= len(alarmed)  # a table at every step with a pair
    step, value = next((st, v) for st, v in shown if st == alarmed[-1]["step"])
    assert f"| {top['a'][0]} | " in value and "(alarm)" in value


def test_lightning_watcher_state_holds_the_window(lightning_runs: dict[str, Any]) -> None:
    """What a checkpoint saves: the window of one-step loss changes and the latest losses (carried)."""
    state = lightning_runs["with"]["cb"].watcher.state_dict()
    entry = next(v for k, v in state["diagnostics"].items() if ":signals:" in k)
    assert entry["carried"]["change_steps"].tolist() == list(range(21, 31))  # window 10: 10 changes kept
    assert entry["carried"]["changes"].shape == (10, 256) and entry["carried"]["last"].shape == (256,)
    assert int(entry["carried"]["last_step"]) == 30


def test_lightning_bursts_probe_consecutive_steps_at_a_fixed_cadence(tmp_path: Any) -> None:
    """every=10 (due at 1, 10, 20), burst=4: probe steps 1-5, 10-14, 20-24 (the engine runs a burst's steps
    through ``continues``); a change enters the window only over one step, so the rows are at 2-5, 11-14,
    21-24 and the window (8) holds the changes ending at 11-14 and 21-24."""
    run = lightning_run(str(tmp_path), 27, SignalsConfig(every=10, burst=4, window=8, probe_size=256))
    logged = sorted(read_scalars(run["log_dir"])["signals/outliers"])
    assert logged == [2, 3, 4, 5, 11, 12, 13, 14, 21, 22, 23, 24]
    rows = read_jsonl(os.path.join(run["log_dir"], "signals.jsonl"))
    assert [r["step"] for r in rows] == logged and [r["changes"] for r in rows][-1] == 8
    entry = next(v for k, v in run["cb"].watcher.state_dict()["diagnostics"].items() if ":signals:" in k)
    assert entry["carried"]["change_steps"].tolist() == [11, 12, 13, 14, 21, 22, 23, 24]


# ---- Hugging Face ---------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")
from transformers import Trainer, TrainingArguments  # noqa: E402

from gradwatch.callbacks.transformers import GradWatch as HFGradWatch  # noqa: E402


class DictData(torch.utils.data.Dataset):
    """The planted data as HF examples: {"x": features, "labels": class}."""

    def __init__(self, n: int = 1024) -> None:
        self.data, _, _ = planted(n)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        x, y = self.data[i]
        return {"x": x, "labels": y}


class HFClassifier(DictNet):
    """A plain torch module with HF's calling convention: loss when given labels, logits always."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__(net=nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 2)))


def test_hf_observe_only_tags_and_records(tmp_path: Any) -> None:
    def run(with_gradwatch: bool) -> tuple[dict[str, Tensor], Any]:
        model = HFClassifier()
        # strict (failures raise); alarm 1.0 so that no alert (which strict mode raises) can stop the run
        cb = HFGradWatch(spectra=False, signals=SignalsConfig(every=2, probe_size=128, window=5, alarm=1.0),
                         max_overhead=None, on_error="raise") if with_gradwatch else None
        args = TrainingArguments(output_dir=str(tmp_path / str(with_gradwatch)), use_cpu=True, save_strategy="no",
                                 report_to=["tensorboard"], disable_tqdm=True, per_device_train_batch_size=64,
                                 gradient_accumulation_steps=2, max_steps=12, logging_steps=1, seed=0, data_seed=0,
                                 dataloader_num_workers=0, learning_rate=0.1, lr_scheduler_type="constant",
                                 optim="sgd", weight_decay=0.0)
        torch.use_deterministic_algorithms(True)
        try:
            Trainer(model=model, args=args, train_dataset=DictData(), callbacks=[cb] if cb else []).train()
        finally:
            torch.use_deterministic_algorithms(False)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}, cb

    without, _ = run(False)
    with_gw, cb = run(True)
    assert not torch.equal(HFClassifier().state_dict()["net.0.weight"], without["net.0.weight"])  # it trained
    assert [k for k in without if not torch.equal(without[k], with_gw[k])] == []
    scalars = read_scalars(cb.log_dir)
    # bursts of 5 one-step changes from the due steps 1 and 8 (every 2; 2-6 continue the first burst, and
    # a due step that follows a probed one continues the chain): the probe steps that add a change
    changed = {2, 3, 4, 5, 6, 9, 10, 11, 12}
    for tag in TAGS:
        assert set(scalars[tag]) == changed, tag
    assert all(math.isfinite(scalars["signals/top1pct_share"][s]) for s in changed)
    assert all(math.isfinite(scalars["signals/opposing_score"][s]) for s in (6, 9, 12))  # 5 changes by step 6
    assert all(math.isnan(scalars["signals/opposing_score"][s]) for s in (2, 5))
    rows = read_jsonl(os.path.join(cb.log_dir, "signals.jsonl"))
    assert [r["step"] for r in rows] == sorted(changed)
    assert all(set(i for i in r["outliers"]) <= set(range(1024)) for r in rows)


class PictureData(DictData):
    """The planted data as HF image examples: {"pixel_values": 1 x 4 x 4 (features zero-padded), "labels"}."""

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        x, y = self.data[i]
        return {"pixel_values": F.pad(x, (0, 8)).reshape(1, 4, 4), "labels": y}


class HFPictureClassifier(HFClassifier):
    def forward(self, pixel_values: Tensor, labels: Tensor | None = None) -> dict[str, Tensor]:  # type: ignore[override]
        return super().forward(pixel_values.flatten(1)[:, :8], labels)


def test_hf_picture_examples_are_logged_as_thumbnails(tmp_path: Any) -> None:
    """Through the HF Trainer: the pairs' picture examples as the image signals/pair_examples, a row per side
    of the shown pairs (the last logged image matches the last signals.jsonl row with pairs)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cb = HFGradWatch(spectra=False, signals=SignalsConfig(every=1, probe_size=256, window=5),
                     max_overhead=None)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, save_strategy="no", report_to=["tensorboard"],
                             disable_tqdm=True, per_device_train_batch_size=256, max_steps=30, logging_steps=10,
                             seed=0, data_seed=0, dataloader_num_workers=0, learning_rate=0.5,
                             lr_scheduler_type="constant", optim="sgd", weight_decay=0.0, remove_unused_columns=False)
    Trainer(model=HFPictureClassifier(), args=args, train_dataset=PictureData(4096), callbacks=[cb]).train()
    rows = [r for r in read_jsonl(os.path.join(cb.log_dir, "signals.jsonl")) if r["pairs"]]
    assert rows, "no pair in 30 probe steps of the planted data"
    event = next(os.path.join(cb.log_dir, f) for f in os.listdir(cb.log_dir) if "tfevents" in f)
    ea = EventAccumulator(event, size_guidance={"images": 0})
    ea.Reload()
    images = ea.Images("signals/pair_examples")
    assert sorted(im.step for im in images) == [r["step"] for r in rows]  # one per probe step with a pair
    last = max(images, key=lambda im: im.step)
    sides = [side[:8] for p in rows[-1]["pairs"][:3] for side in (p["a"], p["b"])]
    assert (last.height, last.width) == (2 + 34 * len(sides), 2 + 34 * max(map(len, sides)))


def test_knobs_and_hf_arguments() -> None:
    from gradwatch.knobs import config_from_knobs, knobs

    names = {k.name for k in knobs()}
    assert {"signals_every", "signals_window", "signals_alarm", "signals_probe_size"} <= names
    config = config_from_knobs({"signals_every": 10, "signals_window": 30, "signals_alarm": 0.7})
    assert config.signals.window == 30 and config.signals.alarm == 0.7 and config.signals.every.is_due(10)
    with pytest.raises(ValueError, match="window"):
        config_from_knobs({"signals_every": 10, "signals_window": 2})


# ---- DDP ---------------------------------------------------------------------------------------------

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_signals_ddp_worker.py")


@pytest.mark.slow
def test_ddp_two_cpu_ranks_split_the_probe_and_make_one_report(tmp_path: Any) -> None:
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    run_worker(WORKER, str(tmp_path), timeout=180)  # a hang fails here
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    # the same window on both ranks: every rank holds the whole probe's one-step changes, gathered in probe order
    assert torch.equal(ranks[0]["carried"]["changes"], ranks[1]["carried"]["changes"])
    assert torch.equal(ranks[0]["carried"]["last"], ranks[1]["carried"]["last"])
    assert ranks[0]["carried"]["change_steps"].tolist() == [4, 5, 6, 7, 8]
    # ... and they are the probe's losses under the final weights, evaluated here in one process
    model = Classifier()
    model.load_state_dict(ranks[0]["weights"])
    model.eval()
    data, _, _ = planted(1024)
    x, y = data.tensors[0][ranks[0]["indices"]], data.tensors[1][ranks[0]["indices"]]
    with torch.no_grad():
        expected = F.cross_entropy(model(x), y, reduction="none").double()
    torch.testing.assert_close(ranks[0]["carried"]["last"], expected, rtol=1e-6, atol=1e-7)
    rows = read_jsonl(os.path.join(ranks[0]["log_dir"], "signals.jsonl"))
    assert [r["step"] for r in rows] == list(range(2, 9))  # one report, written once (by rank zero)
    assert set(read_scalars(ranks[0]["log_dir"])["signals/outliers"]) == set(range(2, 9))
    # the representations of both ranks' probe blocks were gathered for the pairs' shared direction
    shared = [p["shared_direction"] for r in rows for p in r["pairs"]]
    assert shared and all(v is not None for v in shared), shared
