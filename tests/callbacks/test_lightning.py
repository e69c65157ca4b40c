"""End-to-end tests of the Lightning callback: real Trainers on CPU, TensorBoard files read back, every
logged value checked against a float64 NumPy SVD of the gradients the optimizer actually applied."""

from __future__ import annotations

import glob
import math
import os
import warnings
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _lightning_helpers import FAMILY, STATS, WEIGHTS, GradRecorder, TinyMLP, make_loader, reference_statistics
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from gradwatch import SpectraConfig
from gradwatch.callbacks.lightning import GradWatch
from gradwatch.engine import GradWatchError
from gradwatch.metrics.grad_spectrum import GradSpectrum

QUIET = dict(enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1, log_every_n_steps=1)
RTOL = 1e-5


@pytest.fixture(autouse=True)
def _restore_torch_flags():
    """``Trainer(deterministic=True)`` switches deterministic algorithms on process-wide: undo it."""
    det, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(det, warn_only=warn_only)


def fit(tmp_path, *callbacks: Any, model: TinyMLP | None = None, max_steps: int = 8, loader=None,
        ckpt_path: str | None = None, **trainer_kwargs: Any) -> tuple[L.Trainer, TinyMLP]:
    L.seed_everything(0, verbose=False)
    model = model or TinyMLP()
    trainer_kwargs.setdefault("logger", TensorBoardLogger(save_dir=str(tmp_path)))
    trainer_kwargs.setdefault("enable_checkpointing", False)
    trainer = L.Trainer(max_steps=max_steps, default_root_dir=str(tmp_path), callbacks=list(callbacks),
                        **QUIET, **trainer_kwargs)
    trainer.fit(model, loader or make_loader(), ckpt_path=ckpt_path)
    return trainer, model


def gradwatch_scalars(tb_scalars, log_dir) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of gradwatch's own tags."""
    df = tb_scalars(log_dir)
    df = df[df.tag.str.startswith(("grad_spectrum/", "gradwatch/"))]
    out: dict[str, dict[int, float]] = {}
    for tag, step, value in zip(df.tag, df.step, df.value):
        assert int(step) not in out.setdefault(tag, {}), f"{tag} logged twice at step {step}"
        out[tag][int(step)] = float(value)
    return out


def expected_tags(weights=WEIGHTS, family: str | None = FAMILY) -> set[str]:
    tags = {f"grad_spectrum/{s}/{w}" for s in STATS for w in weights}
    if family is not None:
        tags |= {f"grad_spectrum/mad/{s}/{family}" for s in STATS}
    return tags | {"grad_spectrum/nonfinite_layers", "gradwatch/overhead"}


def assert_matches_reference(logged: dict[str, dict[int, float]], recorder: GradRecorder, steps, **ref_kwargs) -> int:
    """Every logged grad_spectrum value at ``steps`` equals the NumPy recomputation; returns the count checked."""
    checked = 0
    for step in steps:
        ref = reference_statistics(recorder.grads[step], **ref_kwargs)
        for tag, want in ref.items():
            got = logged[tag][step]
            assert got == pytest.approx(want, rel=RTOL, abs=1e-12), f"{tag} at step {step}: {got} != {want}"
            checked += 1
    return checked


def event_accumulator(log_dir) -> EventAccumulator:
    ea = EventAccumulator(str(log_dir), size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    ea.Reload()
    return ea


def gradwatch_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning) and "gradwatch" in str(w.message)]


# ---- 1. TensorBoard read-back --------------------------------------------------------------------------


def test_tensorboard_readback_matches_numpy_svd(tmp_path, tb_scalars):
    gw = GradWatch(spectra=SpectraConfig(every=2, heatmap_every=4), max_overhead=None, on_error="raise")
    rec = GradRecorder()
    trainer, _ = fit(tmp_path, gw, rec)
    assert trainer.global_step == 8
    log_dir = trainer.logger.log_dir
    assert gw.log_dir == log_dir  # shares the Trainer's TensorBoard writer

    logged = gradwatch_scalars(tb_scalars, log_dir)
    assert set(logged) == expected_tags()
    for tag, by_step in logged.items():
        assert sorted(by_step) == [1, 2, 4, 6, 8], tag
    assert assert_matches_reference(logged, rec, [1, 2, 4, 6, 8]) == 5 * (18 + 6 + 1)
    assert all(0.0 < v < 1.0 for v in logged["gradwatch/overhead"].values())
    # a statistic that changes along training: not the same number five times
    assert len(set(logged["grad_spectrum/nuclear_norm/net.0.weight"].values())) == 5

    ea = event_accumulator(log_dir)
    # custom-scalars layout: one multiline chart per statistic and layer family, every layer on it
    assert "custom_scalars__config__" in ea.Tags()["tensors"]
    layout = layout_pb2.Layout()
    layout.ParseFromString(ea.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    charts = {(c.title, ch.title): list(ch.multiline.tag) for c in layout.category for ch in c.chart}
    assert {c.title for c in layout.category} == {"gradwatch", "grad_spectrum/mad"} | {f"grad_spectrum/{s}" for s in STATS}
    assert charts[("grad_spectrum/nuclear_norm", f"nuclear_norm | {FAMILY}")] == [
        r"^grad_spectrum/nuclear_norm/net\.0\.weight$", r"^grad_spectrum/nuclear_norm/net\.4\.weight$",
        r"^grad_spectrum/nuclear_norm/net\.6\.weight$"]
    assert charts[("gradwatch", "overhead")] == ["^gradwatch/overhead$"]
    import re
    for patterns in charts.values():  # every chart shows logged tags
        for pattern in patterns:
            assert any(re.search(pattern, t) for t in logged), pattern

    # heatmaps: emitted at heatmap_every=4 (steps 4 and 8), drawn by matplotlib with labelled axes
    assert set(ea.Tags()["images"]) == {f"grad_spectrum/heatmap/{s}" for s in STATS}
    images = ea.Images("grad_spectrum/heatmap/nuclear_norm")
    assert [im.step for im in images] == [4, 8]
    import io

    from PIL import Image
    pixels = np.asarray(Image.open(io.BytesIO(images[-1].encoded_image_string)).convert("RGB"))
    assert pixels.shape[0] > 100 and pixels.shape[1] > 200  # a figure with axes, not a bare strip
    assert not (pixels == [255, 0, 255]).all(-1).any()  # no NaN (magenta) cell
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 2  # a real colour ramp, not one flat colour


# ---- 2. gradient accumulation --------------------------------------------------------------------------


def test_gradient_accumulation_logs_optimizer_steps_with_accumulated_gradients(tmp_path, tb_scalars):
    gw = GradWatch(spectra=SpectraConfig(every=1), max_overhead=None, on_error="raise")
    rec = GradRecorder()
    trainer, _ = fit(tmp_path, gw, rec, max_steps=4, accumulate_grad_batches=2)
    assert trainer.global_step == 4
    assert len(rec.after_backward) == 8  # 8 micro-batches, 4 optimizer steps
    logged = gradwatch_scalars(tb_scalars, trainer.logger.log_dir)
    assert set(logged) == expected_tags()
    for tag, by_step in logged.items():
        assert sorted(by_step) == [1, 2, 3, 4], tag
    assert_matches_reference(logged, rec, [1, 2, 3, 4])
    # the recorded gradient is the sum over both micro-batches, not the last micro-batch's alone
    for step in (1, 2, 3, 4):
        first = rec.after_backward[2 * (step - 1)]
        final = rec.after_backward[2 * step - 1]
        assert torch.equal(final["net.4.weight"], rec.grads[step]["net.4.weight"])
        lone = reference_statistics({n: final[n] - first[n] for n in WEIGHTS})
        tag = "grad_spectrum/nuclear_norm/net.4.weight"
        assert abs(logged[tag][step] - lone[tag]) > 1e-3 * lone[tag]


# ---- 3. observe only -----------------------------------------------------------------------------------


def _final_state(tmp_path, *callbacks) -> dict[str, torch.Tensor]:
    # 64 examples, batch 16, shuffled: 2 epochs, so the second epoch's shuffle and every dropout mask
    # come from the global RNG after gradwatch has run
    trainer, model = fit(tmp_path, *callbacks, logger=False, deterministic=True,
                         loader=make_loader(64, 16, shuffle=True))
    assert trainer.current_epoch == 2 and trainer.global_step == 8
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _noisy_probe_loss(model, batch):
    """A per-example loss that draws random numbers (input noise): only an RNG fork keeps it private."""
    x, y = batch
    return F.cross_entropy(model(x + 0.01 * torch.randn_like(x)), y, reduction="none")


@pytest.mark.parametrize("kind", ["default", "per_example", "per_example_random_loss"])
def test_observe_only_bitwise_identical_weights(tmp_path, tb_scalars, kind):
    baseline = _final_state(tmp_path / "base")
    if kind == "default":
        gw = GradWatch()
    else:
        gw = GradWatch(spectra=SpectraConfig(every=1, per_example=True, per_example_every=2, per_example_size=4),
                       max_overhead=None, on_error="raise",
                       loss_fn=_noisy_probe_loss if kind == "per_example_random_loss" else None)
    watched = _final_state(tmp_path / "watched", gw)
    assert gw.watcher.steps_seen == 8
    assert set(watched) == set(baseline)
    assert "net.1.running_mean" in watched and "net.1.num_batches_tracked" in watched
    changed = [k for k in watched if not torch.equal(watched[k], baseline[k])]
    assert changed == []
    # sanity: training moved the weights away from their initial values
    L.seed_everything(0, verbose=False)
    init = TinyMLP().state_dict()
    assert not torch.equal(init["net.0.weight"], watched["net.0.weight"])
    if kind != "default":  # the extra passes really ran (the observe-only claim is not vacuous)
        logged = gradwatch_scalars(tb_scalars, gw.log_dir)
        per_ex = {t: s for t, s in logged.items() if t.startswith("grad_spectrum/per_example/")}
        assert set(per_ex) == {f"grad_spectrum/per_example/{s}/{w}" for s in STATS for w in WEIGHTS}
        for tag, by_step in per_ex.items():
            assert sorted(by_step) == [1, 2, 4, 6, 8], tag
            assert all(math.isfinite(v) and v > 0 for v in by_step.values()), tag


# ---- 4. no TensorBoardLogger ---------------------------------------------------------------------------


@pytest.mark.parametrize("logger", ["none", "csv"])
def test_without_tensorboard_logger_writes_under_default_root_dir(tmp_path, tb_scalars, capsys, logger):
    gw = GradWatch(spectra=SpectraConfig(every=4), max_overhead=None, on_error="raise")
    lg = False if logger == "none" else CSVLogger(save_dir=str(tmp_path / "csv"))
    trainer, _ = fit(tmp_path, gw, logger=lg)
    want = os.path.join(str(tmp_path), "gradwatch")
    assert gw.log_dir == want
    assert f"no TensorBoardLogger on this Trainer; writing TensorBoard files to {want}" in capsys.readouterr().out
    events = glob.glob(os.path.join(str(tmp_path), "**", "events.out.tfevents.*"), recursive=True)
    assert len(events) == 1 and os.path.dirname(events[0]) == want
    logged = gradwatch_scalars(tb_scalars, want)
    assert set(logged) == expected_tags()
    assert sorted(logged["grad_spectrum/spectral_norm/net.6.weight"]) == [1, 4, 8]
    if logger == "csv":  # the CSV logger still gets the user's own metrics and none of gradwatch's
        metrics = open(os.path.join(trainer.logger.log_dir, "metrics.csv")).read()
        assert "train_loss" in metrics and "grad_spectrum" not in metrics


def test_explicit_log_dir_wins_over_tensorboard_logger(tmp_path, tb_scalars, capsys):
    own = str(tmp_path / "own")
    gw = GradWatch(spectra=SpectraConfig(every=4), max_overhead=None, on_error="raise", log_dir=own)
    trainer, _ = fit(tmp_path, gw)
    assert gw.log_dir == own
    assert f"log_dir was given; writing TensorBoard files to {own}" in capsys.readouterr().out
    assert set(gradwatch_scalars(tb_scalars, own)) == expected_tags()
    assert gradwatch_scalars(tb_scalars, trainer.logger.log_dir) == {}  # the logger's run has only the user's
    assert "train_loss" in set(tb_scalars(trainer.logger.log_dir).tag)


# ---- 5. checkpoint resume ------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended")
def test_checkpoint_resume_restores_state(tmp_path, tb_scalars):
    config = dict(spectra=SpectraConfig(every=2, heatmap_every=2), max_overhead=None, on_error="raise")
    ckpt_dir = tmp_path / "ckpt"
    first = GradWatch(**config)
    fit(tmp_path, first, ModelCheckpoint(dirpath=str(ckpt_dir), every_n_train_steps=4, save_top_k=-1),
        max_steps=4, enable_checkpointing=True, logger=TensorBoardLogger(str(tmp_path), version="first"))
    ckpts = sorted(glob.glob(str(ckpt_dir / "*.ckpt")))
    assert len(ckpts) == 1
    saved = torch.load(ckpts[0], weights_only=False)
    assert saved["global_step"] == 4
    state = saved["callbacks"]["GradWatch"]
    assert state["steps_seen"] == 4
    history = state["sinks"][0]["heatmaps"]  # the TensorBoard sink keeps the heatmap columns
    assert history["grad_spectrum/heatmap/nuclear_norm"][0] == [1, 2, 4]

    second, rec = GradWatch(**config), GradRecorder()
    trainer, _ = fit(tmp_path, second, rec, max_steps=8, ckpt_path=ckpts[0],
                     logger=TensorBoardLogger(str(tmp_path), version="resumed"))
    assert trainer.global_step == 8
    assert second.watcher.steps_seen == 8  # 4 restored + 4 new
    steps, cols = second.watcher.sinks[0]._history["grad_spectrum/heatmap/nuclear_norm"]
    assert steps == [1, 2, 4, 6, 8]
    first_cols = history["grad_spectrum/heatmap/nuclear_norm"][1]
    np.testing.assert_array_equal(np.stack(cols[:3]), np.asarray(first_cols))  # run 1's columns, unchanged

    log_dir = trainer.logger.log_dir
    logged = gradwatch_scalars(tb_scalars, log_dir)
    assert set(logged) == expected_tags()
    for tag, by_step in logged.items():
        assert sorted(by_step) == [6, 8], tag
    assert_matches_reference(logged, rec, [6, 8])
    # the heatmap at step 6 is drawn from run 1's three columns plus its own
    drawn = []
    sink = second.watcher.sinks[0]
    sink.log_heatmap = lambda name, step, values, *a: drawn.append((name, step, values.shape))
    for column in sink._history["grad_spectrum/heatmap/stable_rank"]:  # back to how it stood before step 6
        del column[-2:]
    sink._heatmap_due.add("grad_spectrum/heatmap/stable_rank")
    sink._record_heatmaps(6, {f"grad_spectrum/stable_rank/{t}": 1.0 for t in ("net.0.weight",)})
    assert drawn == [("grad_spectrum/heatmap/stable_rank", 6, (3, 4))]
    images = event_accumulator(log_dir).Images("grad_spectrum/heatmap/stable_rank")
    assert [im.step for im in images] == [6, 8]


# ---- 6. frozen parameters ------------------------------------------------------------------------------


def test_frozen_layer_is_skipped_with_one_warning(tmp_path, tb_scalars):
    gw = GradWatch(spectra=SpectraConfig(every=2), max_overhead=None, on_error="raise")
    rec = GradRecorder()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, model = fit(tmp_path, gw, rec, model=TinyMLP(freeze_first=True))
    ours = gradwatch_warnings(caught)
    assert len(ours) == 1, ours
    assert "net.0.weight" in ours[0] and "1 parameters" in ours[0]
    logged = gradwatch_scalars(tb_scalars, trainer.logger.log_dir)
    assert not any("net.0." in t for t in logged)
    kept = ("net.4.weight", "net.6.weight")
    assert set(logged) == expected_tags(kept)  # a 2-layer family still has a MAD
    assert_matches_reference(logged, rec, [1, 2, 4, 6, 8], names=kept)


# ---- 7. bf16 autocast ----------------------------------------------------------------------------------


def test_bf16_mixed_precision_logs_finite_values(tmp_path, tb_scalars):
    gw = GradWatch(spectra=SpectraConfig(every=2), max_overhead=None, on_error="raise")
    rec = GradRecorder()
    trainer, model = fit(tmp_path, gw, rec, precision="bf16-mixed")
    assert model.logits_dtype == torch.bfloat16  # autocast really ran
    logged = gradwatch_scalars(tb_scalars, trainer.logger.log_dir)
    assert set(logged) == expected_tags()
    values = [v for by_step in logged.values() for v in by_step.values()]
    assert len(values) == 26 * 5 and all(math.isfinite(v) for v in values)
    assert set(logged["grad_spectrum/nonfinite_layers"].values()) == {0.0}
    assert_matches_reference(logged, rec, [1, 2, 4, 6, 8])


# ---- 8. on_error ---------------------------------------------------------------------------------------


def _broken_observe(self, ctx):
    raise RuntimeError("planted failure")


def test_on_error_warn_logs_nan_and_training_goes_on(tmp_path, tb_scalars, monkeypatch):
    monkeypatch.setattr(GradSpectrum, "observe", _broken_observe)
    gw = GradWatch(spectra=SpectraConfig(every=2), max_overhead=None, on_error="warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, _ = fit(tmp_path, gw)
    assert trainer.global_step == 8
    ours = gradwatch_warnings(caught)
    assert len(ours) == 1, ours  # once, not once per step
    assert "GradSpectrum" in ours[0] and "planted failure" in ours[0]
    logged = gradwatch_scalars(tb_scalars, trainer.logger.log_dir)
    assert set(logged) == expected_tags()
    for tag, by_step in logged.items():
        assert sorted(by_step) == [1, 2, 4, 6, 8], tag
        if tag.startswith("grad_spectrum/") and tag != "grad_spectrum/nonfinite_layers":
            assert all(math.isnan(v) for v in by_step.values()), tag
    assert all(math.isfinite(v) for v in logged["gradwatch/overhead"].values())


def test_on_error_raise_stops_fit(tmp_path, monkeypatch):
    monkeypatch.setattr(GradSpectrum, "observe", _broken_observe)
    gw = GradWatch(spectra=SpectraConfig(every=2), max_overhead=None, on_error="raise")
    with pytest.raises(GradWatchError, match=r"GradSpectrum \(grad_spectrum\) failed.*planted failure"):
        fit(tmp_path, gw)


# ---- 9. fp16 with a gradient scaler: skipped steps -----------------------------------------------------


class ScaleTracker(GradRecorder):
    """Records which optimizer steps the GradScaler skipped (its scale was backed off)."""

    def __init__(self) -> None:
        super().__init__()
        self.skipped: list[int] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # noqa: ANN001
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        self._scale = (trainer.global_step + 1, trainer.precision_plugin.scaler.get_scale())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        step, before = self._scale
        if trainer.precision_plugin.scaler.get_scale() < before:
            self.skipped.append(step)


def test_fp16_scaler_skipped_steps_are_not_reported(tmp_path, tb_scalars):
    if not hasattr(torch.amp, "GradScaler"):
        pytest.skip("this torch has no device-generic torch.amp.GradScaler for CPU fp16")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 21, growth_interval=10_000)
    gw = GradWatch(spectra=SpectraConfig(every=1), max_overhead=None, on_error="raise")
    rec = ScaleTracker()
    trainer, model = fit(tmp_path, gw, rec, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    assert model.logits_dtype == torch.float16  # real fp16 autocast, not bf16
    assert trainer.global_step == 8
    assert rec.skipped, "the huge initial scale should have overflowed the first step(s)"
    assert rec.skipped[0] == 1 and len(rec.skipped) < 8
    assert gw.watcher.skipped_steps == len(rec.skipped)
    for step in rec.skipped:  # the gradients of those steps really were non-finite
        assert not all(torch.isfinite(g).all() for g in rec.grads[step].values())
    taken = [s for s in range(1, 9) if s not in rec.skipped]
    logged = gradwatch_scalars(tb_scalars, trainer.logger.log_dir)
    assert set(logged) == expected_tags()
    for tag, by_step in logged.items():
        assert sorted(by_step) == taken, tag
        assert all(math.isfinite(v) for v in by_step.values()), tag
    assert_matches_reference(logged, rec, taken)
