"""fp16 loss scaling: which gradients a callback reads still carry the scale, and the rule that recovers the
true ones (``gradwatch.integrations.grad_scale``), checked on a bare ``GradScaler`` and through 3-step runs of
Lightning and the Hugging Face Trainer on CPU.

Reference gradients are recomputed independently inside the callback: the same batch, the same fp16 autocast
forward, ``torch.autograd.grad`` of the unscaled loss. The recovered gradient norm must match within 1e-4
relative (the issue's bar). Elementwise the match is not exact, and cannot be: the unscaled fp16 backward
loses the tiny entries to fp16 subnormals (below 6.1e-5), which is what loss scaling is for, so single
entries differ by up to ~1e-3 relative; elementwise the check is to 1e-4 of the largest entry. Against
``GradScaler.unscale_`` itself the rule is bitwise exact (the scales are powers of two).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradwatch.integrations.grad_scale import hf_scaler, lightning_scaler, pending_loss_scale, torch_optimizer, unscaled

SCALE = 1024.0


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))


def _data(n: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def _fp16_loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.float16):
        logits = net(x)
    assert logits.dtype == torch.float16  # fp16 autocast is real on CPU
    return F.cross_entropy(logits.float(), y)


def _flat(tensors) -> torch.Tensor:  # noqa: ANN001
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def _assert_recovered(grads, scale: float | None, reference) -> None:  # noqa: ANN001
    got = _flat([unscaled(g, scale) for g in grads])
    want = _flat(reference)
    assert abs(got.norm().item() / want.norm().item() - 1) <= 1e-4
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * want.abs().max().item())


# ------------------------------------------------------------------------------------------------------
# the rule on a bare GradScaler
# ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fused", [False, True], ids=["adamw", "adamw_fused"])
def test_pending_scale_follows_the_scaler_stage(fused: bool) -> None:
    net = _net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, fused=fused)
    assert bool(getattr(opt, "_step_supports_amp_scaling", False)) is fused  # what Lightning checks
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    x, y = _data(16)
    params = list(net.parameters())
    reference = torch.autograd.grad(_fp16_loss(net, x, y), params)

    scaler.scale(_fp16_loss(net, x, y)).backward()
    # READY (no per-optimizer entry yet): .grad is the true gradient times the scale, exactly
    assert id(opt) not in scaler._per_optimizer_states
    assert pending_loss_scale(scaler, opt) == SCALE
    assert id(opt) not in scaler._per_optimizer_states  # the lookup inserted nothing into the defaultdict
    _assert_recovered([p.grad for p in params], pending_loss_scale(scaler, opt), reference)
    by_rule = [unscaled(p.grad, pending_loss_scale(scaler, opt)) for p in params]

    if not fused:
        scaler.unscale_(opt)  # OptState.UNSCALED: divided in place
        assert scaler._per_optimizer_states[id(opt)]["stage"].name == "UNSCALED"
        assert pending_loss_scale(scaler, opt) is None
        # the rule gives bitwise what unscale_ gives
        torch.testing.assert_close(_flat(p.grad for p in params), _flat(by_rule), rtol=0, atol=0)

    scaler.step(opt)  # fused: the kernel gets grad_scale and writes the unscaled gradients back
    assert scaler._per_optimizer_states[id(opt)]["stage"].name == "STEPPED"
    assert pending_loss_scale(scaler, opt) is None
    torch.testing.assert_close(_flat(p.grad for p in params), _flat(by_rule), rtol=0, atol=0)

    # the documented limit: update() resets every stage to READY, while the leftover grads are unscaled
    scaler.update()
    assert pending_loss_scale(scaler, opt) == SCALE
    _assert_recovered([p.grad for p in params], None, reference)


def test_no_scaler_disabled_scaler_and_wrappers() -> None:
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    assert pending_loss_scale(None, opt) is None
    disabled = torch.amp.GradScaler("cpu", enabled=False)
    assert pending_loss_scale(disabled, opt) is None

    class LightningLike:  # LightningOptimizer keeps the torch optimizer in ``_optimizer``
        def __init__(self, inner):  # noqa: ANN001
            self._optimizer = inner

    class AccelerateLike:  # AcceleratedOptimizer keeps it in ``optimizer`` (and has param_groups itself)
        def __init__(self, inner):  # noqa: ANN001
            self.optimizer = inner
            self.param_groups = inner.param_groups

    assert torch_optimizer(opt) is opt
    assert torch_optimizer(LightningLike(opt)) is opt
    assert torch_optimizer(AccelerateLike(opt)) is opt

    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    scaler.scale(F.cross_entropy(net(_data(4)[0]), _data(4)[1])).backward()
    scaler.unscale_(opt)
    assert pending_loss_scale(scaler, AccelerateLike(opt)) is None  # keyed by the inner optimizer's id
    assert pending_loss_scale(scaler, torch.optim.SGD(net.parameters(), lr=0.1)) == SCALE  # another optimizer

    class HostLike:
        pass

    host = HostLike()
    assert lightning_scaler(host) is None and hf_scaler(host) is None
    host.accelerator = HostLike()
    host.accelerator.scaler = disabled
    assert hf_scaler(host) is None
    host.accelerator.scaler = scaler
    assert hf_scaler(host) is scaler


# ------------------------------------------------------------------------------------------------------
# Lightning: MixedPrecision("16-mixed", "cpu", scaler=GradScaler("cpu"))
# ------------------------------------------------------------------------------------------------------

def _lightning_classes():  # noqa: ANN202
    L = pytest.importorskip("lightning")

    class Module(L.LightningModule):
        def __init__(self, fused: bool) -> None:
            super().__init__()
            self.fused = fused
            self.net = _net()

        def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
            x, y = batch
            return F.cross_entropy(self.net(x).float(), y)

        def configure_optimizers(self):  # noqa: ANN201
            return torch.optim.AdamW(self.parameters(), lr=1e-2, fused=self.fused)

    class Check(L.Callback):
        """Applies the rule where gradwatch reads gradients and compares with a fresh recomputation."""

        def __init__(self) -> None:
            self.seen: list[tuple[str, float | None, float]] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
            self.batch = batch

        def _check(self, hook, trainer, pl_module, optimizer) -> None:  # noqa: ANN001
            scale = pending_loss_scale(lightning_scaler(trainer), optimizer)
            params = list(pl_module.parameters())
            with trainer.precision_plugin.forward_context():
                loss = pl_module.training_step(self.batch, 0)
            reference = torch.autograd.grad(loss, params)
            _assert_recovered([p.grad for p in params], scale, reference)
            ratio = (_flat(p.grad for p in params).norm() / _flat(reference).norm()).item()
            self.seen.append((hook, scale, ratio))

        def on_after_backward(self, trainer, pl_module) -> None:  # noqa: ANN001
            self._check("after_backward", trainer, pl_module, trainer.optimizers[0])

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # noqa: ANN001
            self._check("before_optimizer_step", trainer, pl_module, optimizer)

    return L, Module, Check


def _lightning_trainer(L, callbacks, **kw):  # noqa: ANN001, ANN202
    return L.Trainer(accelerator="cpu", devices=1, max_steps=3, callbacks=callbacks, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kw)


@pytest.mark.parametrize("fused", [False, True], ids=["adamw", "adamw_fused"])
def test_lightning_fp16_gradients_recovered(fused: bool) -> None:
    L, Module, Check = _lightning_classes()
    from lightning.pytorch.plugins import MixedPrecision

    check = Check()
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    trainer = _lightning_trainer(L, [check], plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    x, y = _data()
    trainer.fit(Module(fused), torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16))
    assert lightning_scaler(trainer) is scaler
    assert [h for h, _, _ in check.seen] == ["after_backward", "before_optimizer_step"] * 3
    for hook, scale, ratio in check.seen:
        # after backward the grads are always scaled; before the step Lightning has unscaled them unless the
        # optimizer unscales in its own kernel (_optimizer_handles_unscaling): the fused AdamW path
        still_scaled = hook == "after_backward" or fused
        assert scale == (SCALE if still_scaled else None), (hook, scale)
        assert ratio == pytest.approx(SCALE if still_scaled else 1.0, rel=1e-6), (hook, ratio)


def test_lightning_16_mixed_flag_on_cpu_becomes_bf16_without_scaler() -> None:
    L, _, _ = _lightning_classes()
    with pytest.warns(UserWarning, match="fp16 is not supported on CPU"):
        trainer = _lightning_trainer(L, [], precision="16-mixed")
    assert trainer.precision_plugin.precision == "bf16-mixed"
    assert lightning_scaler(trainer) is None


# ------------------------------------------------------------------------------------------------------
# Hugging Face Trainer: fp16=True on CPU, with the scaler accelerate would build on a GPU put in by hand
# ------------------------------------------------------------------------------------------------------

class _HFNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = _net()
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict:
        self.last = (x, labels)
        return {"loss": F.cross_entropy(self.net(x).float(), labels)}


class _HFData(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.x, self.y = _data()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "labels": self.y[i]}


def _hf_run(tmp_path, optim: str, max_grad_norm: float, inject: bool, skip_norm: bool = False):  # noqa: ANN001, ANN202
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainerCallback, TrainingArguments

    seen: list[tuple[float | None, float, str | None]] = []

    class Check(TrainerCallback):
        trainer = None

        def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kw):  # noqa: ANN001
            scaler = hf_scaler(self.trainer)
            scale = pending_loss_scale(scaler, optimizer)
            params = list(model.parameters())
            x, y = model.last
            reference = torch.autograd.grad(model(x, labels=y)["loss"], params)  # forward autocast by accelerate
            _assert_recovered([p.grad for p in params], scale, reference)
            ratio = (_flat(p.grad for p in params).norm() / _flat(reference).norm()).item()
            state_ = None if scaler is None else scaler._per_optimizer_states.get(id(torch_optimizer(optimizer)))
            seen.append((scale, ratio, None if state_ is None else state_["stage"].name))

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=16, max_steps=3, use_cpu=True,
                             fp16=True, optim=optim, max_grad_norm=max_grad_norm, learning_rate=1e-2, report_to=[],
                             save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0)
    check = Check()
    trainer = Trainer(model=_HFNet(), args=args, train_dataset=_HFData(), callbacks=[check])
    check.trainer = trainer
    if inject:
        # accelerate builds a scaler only off CPU (GradScaler("cuda") there); this is the same object on CPU,
        # set before train() so that prepare() hands it to the AcceleratedOptimizer and autocasts the forward
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
        trainer.accelerator.native_amp = True
    if skip_norm and hasattr(trainer, "_get_grad_norm"):
        # transformers 4.x loop: no clip_grad_norm_ call at all when max_grad_norm is 0 (5.x calls it with
        # max_norm=inf to log grad_norm, which unscales). On 4.x, max_grad_norm=0 is that loop already.
        trainer._get_grad_norm = lambda model, grad_norm=None: grad_norm
    trainer.train()
    return trainer, seen


def test_hf_fp16_on_cpu_is_plain_float32(tmp_path) -> None:  # noqa: ANN001
    trainer, seen = _hf_run(tmp_path, "adamw_torch", 1.0, inject=False)
    assert trainer.accelerator.state.mixed_precision == "fp16"
    assert trainer.accelerator.scaler is None and not trainer.accelerator.native_amp
    assert hf_scaler(trainer) is None
    assert [(s, round(r, 6)) for s, r, _ in seen] == [(None, 1.0)] * 3


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_torch_fused"])
@pytest.mark.parametrize("clip", ["clip", "no_clip", "no_clip_no_norm"])
def test_hf_fp16_gradients_recovered(tmp_path, optim: str, clip: str) -> None:  # noqa: ANN001
    max_grad_norm = 1e6 if clip == "clip" else 0.0  # 1e6: clip_grad_norm_ runs (and unscales) but never clips
    trainer, seen = _hf_run(tmp_path, optim, max_grad_norm, inject=True, skip_norm=clip == "no_clip_no_norm")
    assert hf_scaler(trainer) is trainer.accelerator.scaler
    assert len(seen) == 3
    for scale, ratio, stage in seen:
        if clip == "no_clip_no_norm":  # nobody unscaled before on_pre_optimizer_step
            assert (scale, stage) == (SCALE, None)
            assert ratio == pytest.approx(SCALE, rel=1e-6)
        else:  # Accelerator.clip_grad_norm_ -> unscale_gradients -> scaler.unscale_
            assert (scale, stage) == (None, "UNSCALED")
            assert ratio == pytest.approx(1.0, rel=1e-6)
