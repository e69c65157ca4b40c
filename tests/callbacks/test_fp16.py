"""fp16 mixed precision through both hosts: the gradient norms gradwatch logs are those of the true (unscaled,
pre-clip) gradients, with a fused and a non-fused AdamW.

fp16 on CPU: Lightning with ``MixedPrecision("16-mixed", "cpu", scaler=GradScaler("cpu"))`` (its
``precision="16-mixed"`` flag turns into bf16 on CPU); the HF Trainer with the GradScaler accelerate builds on a
GPU put on its accelerator by hand (``_support.hf.trainer(fp16_scaler=...)``). The reference is recorded
independently of gradwatch at the hook where it reads the gradients: the step's batch run again through the same
fp16 autocast forward, the backward of ``loss * S`` with the scaler's current scale S, divided by S
(``_support.references.scaled_backward_gradients``), so nothing depends on whether or by whom ``.grad`` was
unscaled yet; a float64 SVD gives the norms.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from _support.models import WEIGHTS
from _support.references import scaled_backward_gradients, svd_statistics
from _support.tensorboard import read_series

from gradwatch import SpectraConfig

SCALE = 1024.0
STEPS = 3
TOL = 1e-4
CHECKED = ("frobenius_norm", "spectral_norm")


def _spectra() -> dict[str, Any]:
    return dict(spectra=SpectraConfig(every=1, stats=["frobenius_norm", "spectral_norm", "stable_rank"]),
                max_overhead=None, on_error="raise")


def _reference(grads: dict[str, torch.Tensor]) -> dict[str, float]:
    return {f"grad_spectrum/{s}/{w}": svd_statistics(grads[w])[s] for w in WEIGHTS for s in CHECKED}


def _assert_logged_true_norms(logged: dict[str, dict[int, float]], reference: dict[int, dict[str, float]]) -> None:
    assert sorted(reference) == list(range(1, STEPS + 1))
    for step, want in reference.items():
        for tag, value in want.items():
            got = logged[tag][step]
            assert abs(got / value - 1) <= TOL, f"{tag} at step {step}: logged {got}, true {value}"


# ---- Lightning ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_fused"])
def test_lightning_fp16_logs_true_gradient_norms(tmp_path, optimizer):
    from _support.lit import Classifier, fit
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.plugins import MixedPrecision

    from gradwatch.callbacks.lightning import GradWatch

    class TrueGradients(Callback):
        def __init__(self) -> None:
            self.reference: dict[int, dict[str, float]] = {}
            self.grad_over_true: list[float] = []  # what .grad holds at the hook, over the true gradient

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001
            self.batch = batch

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # noqa: ANN001
            x, y = self.batch
            with trainer.precision_plugin.forward_context():
                loss = F.cross_entropy(pl_module.net(x).float(), y)  # what training_step computes
            names = [n for n, _ in pl_module.named_parameters()]
            true = dict(zip(names, scaled_backward_gradients(loss, list(pl_module.parameters()),
                                                             trainer.precision_plugin.scaler.get_scale())))
            self.reference[trainer.global_step + 1] = _reference(true)
            grad = dict(pl_module.named_parameters())["net.0.weight"].grad
            self.grad_over_true.append(float(grad.norm() / true["net.0.weight"].norm()))

    gw, rec = GradWatch(**_spectra()), TrueGradients()
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    trainer, _ = fit(tmp_path, [gw, rec], max_steps=STEPS, module=Classifier(optimizer, lr=1e-2),
                     plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    assert trainer.global_step == STEPS and gw.watcher.skipped_steps == 0
    # the path under test is real: a fused AdamW unscales in its own kernel, so Lightning leaves .grad scaled
    assert rec.grad_over_true == pytest.approx([SCALE if optimizer == "adamw_fused" else 1.0] * STEPS, rel=1e-3)
    _assert_logged_true_norms(read_series(gw.log_dir, ["grad_spectrum/"]), rec.reference)


# ---- Hugging Face ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_torch_fused"])
@pytest.mark.parametrize("clip", ["clip", "no_clip", "no_clip_no_norm"])
def test_hf_fp16_logs_true_gradient_norms(tmp_path, optim, clip):
    """``clip``: max_grad_norm small enough that every step is clipped (gradwatch undoes it); ``no_clip``:
    max_grad_norm=0 (transformers 5.x still calls clip_grad_norm_ with an infinite norm, which unscales);
    ``no_clip_no_norm``: the transformers 4.x loop, which then never unscales before the optimizer step."""
    pytest.importorskip("accelerate")
    from _support.hf import trainer as hf_trainer
    from _support.hf import training_args
    from transformers import TrainerCallback

    from gradwatch.callbacks.transformers import GradWatch

    class TrueGradients(TrainerCallback):
        def __init__(self) -> None:
            self.reference: dict[int, dict[str, float]] = {}
            self.grad_over_true: list[float] = []
            self.scaler: torch.amp.GradScaler | None = None
            self._batch: dict[str, Any] | None = None
            self._recomputing = False

        def on_train_begin(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
            def remember(module, a, kw):  # noqa: ANN001
                if not self._recomputing:
                    self._batch = dict(kw)
            model.register_forward_pre_hook(remember, with_kwargs=True)

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
            self._recomputing = True
            try:
                loss = model(**self._batch)["loss"]  # accelerate's autocast-wrapped forward, as in training
            finally:
                self._recomputing = False
            names = [n for n, _ in model.named_parameters()]
            true = dict(zip(names, scaled_backward_gradients(loss, list(model.parameters()), self.scaler.get_scale())))
            self.reference[state.global_step + 1] = _reference(true)
            grad = dict(model.named_parameters())["net.0.weight"].grad
            self.grad_over_true.append(float(grad.norm() / true["net.0.weight"].norm()))

    gw, rec = GradWatch(**_spectra()), TrueGradients()
    rec.scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    args = training_args(tmp_path, fp16=True, optim=optim, max_steps=STEPS, learning_rate=1e-2,
                         max_grad_norm=1e-2 if clip == "clip" else 0.0)
    trainer = hf_trainer(args, [gw, rec], fp16_scaler=rec.scaler)
    if clip == "no_clip_no_norm":
        trainer._get_grad_norm = lambda model, grad_norm=None: grad_norm
    trainer.train()
    assert trainer.state.global_step == STEPS and gw.watcher.skipped_steps == 0
    # what .grad holds when gradwatch reads it: clipped (a factor below 1), unscaled, or still times S
    if clip == "clip":
        assert all(r < 0.5 for r in rec.grad_over_true), rec.grad_over_true
    else:
        want = SCALE if clip == "no_clip_no_norm" else 1.0
        assert rec.grad_over_true == pytest.approx([want] * STEPS, rel=1e-3)
    _assert_logged_true_norms(read_series(gw.log_dir, ["grad_spectrum/"]), rec.reference)
