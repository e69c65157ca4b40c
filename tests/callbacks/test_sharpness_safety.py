"""Sharpness is safe on real models: half-precision weights, gradient checkpointing, DDP.

* bf16 models are measured in float32 (float32 copies swapped in by name, the model untouched), checked
  against a dense float64 Hessian of the same bf16-rounded weights, directly and through Lightning's
  ``precision="bf16-true"`` (whose float32 probe inputs used to crash a bf16 model) and with tied weights;
  where torch lacks the reparametrization, a one-time warning and a measurement in the native dtype;
* a Hugging Face GPT-2 with gradient checkpointing gives the same eigenvalue as without, and its weights
  are bitwise those of a run without gradwatch;
* two-process Lightning DDP (gloo) finishes, rank 0 logs the top eigenvalue of a dense Hessian of rank
  0's probe loss, and the weights are bitwise identical across ranks and to a DDP run without gradwatch.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from _lightning_helpers import TinyMLP  # noqa: E402
from _support.launch import run_worker
from _support.references import dense_hessian_of_forward, top_eigenvalue
from conftest import TokenData
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from gradwatch import SharpnessConfig, WatchConfig
from gradwatch.callbacks.lightning import GradWatch as LightningGradWatch
from gradwatch.engine.probe import ProbeSet
from gradwatch.engine.watcher import Watcher
from gradwatch.functional.hessian import HessianOperator, lanczos_top_eigenvalues

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sharpness_ddp_worker.py")


def read_scalars(log_dir: str) -> dict[str, dict[int, float]]:
    from tbparse import SummaryReader

    df = SummaryReader(str(log_dir)).scalars
    return {tag: dict(zip(g["step"].astype(int), g["value"].astype(float))) for tag, g in df.groupby("tag")}


def dense_top_eigenvalue(model: nn.Module, loss_of: Any) -> float:
    """Top eigenvalue of the float64 dense Hessian of ``loss_of(forward)`` over the trainable parameters,
    evaluated on a float64 copy of ``model`` in eval mode (same, possibly bf16-rounded, values)."""
    return top_eigenvalue(dense_hessian_of_forward(copy.deepcopy(model).double().eval(), loss_of))


# ---- bf16 --------------------------------------------------------------------------------------------


def bf16_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.Tanh(), nn.Dropout(0.2),
                         nn.Linear(12, 3)).to(torch.bfloat16)


def bf16_data(n: int = 32, dtype: torch.dtype = torch.bfloat16) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 6, generator=g)
    return TensorDataset(x.to(dtype), (x @ torch.randn(6, 3, generator=g)).argmax(1))


def ce_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


@pytest.mark.parametrize("input_dtype", [torch.bfloat16, torch.float32])
def test_bf16_model_measured_in_float32_and_untouched(input_dtype: torch.dtype) -> None:
    model = bf16_net()
    with torch.no_grad():  # non-trivial BatchNorm statistics, in bf16
        model[1].running_mean.copy_(torch.linspace(-0.5, 0.5, 12))
        model[1].running_var.copy_(torch.linspace(0.5, 2.0, 12))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    data = bf16_data(dtype=input_dtype)
    w = Watcher(WatchConfig(spectra=False, sharpness=SharpnessConfig(every=1, probe_size=32, max_iter=200, tol=1e-6),
                            max_overhead=None, on_error="raise"))
    w.attach(model, probe_source=lambda size: ProbeSet.from_dataset(
        data, size, device=torch.device("cpu"), training_loss_fn=ce_loss, batch_size=16))
    rng = torch.get_rng_state()
    out = w.run_step(1, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    lam = out["sharpness/lambda_max"]
    assert out["sharpness/converged"] == 1.0

    # observe only: values, dtypes, grads, training flags and the global RNG untouched
    after = model.state_dict()
    assert {k: v.dtype for k, v in after.items()} == dtypes
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
    assert all(p.grad is None for p in model.parameters())
    assert all(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng)

    batches = [b for b in w.probe().batches(drop_last=True)]
    assert len(batches) == 2

    def loss_of(fwd: Any) -> Tensor:
        return sum(F.cross_entropy(fwd(x.double()), y) for x, y in batches) / len(batches)

    want = dense_top_eigenvalue(model, loss_of)
    assert lam == pytest.approx(want, rel=1e-5)  # float32 products: ~1e-7 here

    # what the fix is for: the same Lanczos on bf16 Hessian-vector products is off by far more (~1.5e-4)
    model.eval()
    bf16_batches = [(x.to(torch.bfloat16), y) for x, y in batches]
    with HessianOperator(lambda: sum(ce_loss(model, b) for b in bf16_batches) / len(bf16_batches),
                         list(model.parameters())) as op:
        native = float(lanczos_top_eigenvalues(op.matvec, op.dim, k=1, max_iter=200, tol=1e-6).eigenvalues[0])
    model.train()
    assert abs(native - want) > 1e-5 * abs(want)


class InitialState(L.Callback):
    """The weights Lightning actually trains (after precision="bf16-true" converted them), at step 1."""

    state: dict[str, Tensor] | None = None

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if trainer.global_step == 0:
            self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def lightning_bf16_run(root: str, with_gradwatch: bool) -> dict[str, Any]:
    L.seed_everything(0)
    module = TinyMLP(net=nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3)))
    snap = InitialState()
    cb = LightningGradWatch(spectra=False, sharpness=SharpnessConfig(every=3, probe_size=32, max_iter=200, tol=1e-6),
                            max_overhead=None, on_error="raise", log_dir=os.path.join(root, "gw"))
    trainer = L.Trainer(max_steps=4, accelerator="cpu", precision="bf16-true", deterministic=True,
                        callbacks=[cb, snap] if with_gradwatch else [snap], default_root_dir=root, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(module, DataLoader(bf16_data(64, torch.float32), batch_size=16, shuffle=True))
    return {"state": {k: v.detach().clone() for k, v in module.state_dict().items()}, "cb": cb,
            "initial": snap.state, "module": module}


def test_lightning_bf16_true(tmp_path: Any) -> None:
    without = lightning_bf16_run(str(tmp_path / "without"), False)
    with_gw = lightning_bf16_run(str(tmp_path / "with"), True)
    assert all(v.dtype == torch.bfloat16 for v in with_gw["state"].values())
    assert [k for k in without["state"] if not torch.equal(without["state"][k], with_gw["state"][k])] == []
    assert not torch.equal(with_gw["initial"]["net.0.weight"], with_gw["state"]["net.0.weight"])  # it trained

    scalars = read_scalars(with_gw["cb"].log_dir)
    assert set(scalars["sharpness/lambda_max"]) == {1, 3}
    assert scalars["sharpness/converged"][1] == 1.0
    batches = with_gw["cb"].watcher.probe().batches(drop_last=True)
    assert len(batches) == 2
    model = copy.deepcopy(with_gw["module"])
    model.load_state_dict(with_gw["initial"])

    def loss_of(fwd: Any) -> Tensor:
        return sum(F.cross_entropy(fwd(x.double()), y) for x, y in batches) / len(batches)

    want = dense_top_eigenvalue(model.net, loss_of)
    assert scalars["sharpness/lambda_max"][1] == pytest.approx(want, rel=1e-5)


# ---- gradient checkpointing (Hugging Face) ------------------------------------------------------------

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

from gradwatch.callbacks.transformers import GradWatch as HFGradWatch  # noqa: E402


def gpt2_run(tmp_path: Any, *, checkpointing: bool, with_gradwatch: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50, n_positions=16,
                                       resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1))
    if checkpointing:
        model.gradient_checkpointing_enable()
    cb = HFGradWatch(spectra=False, sharpness=SharpnessConfig(every=2, probe_size=8, max_iter=200, tol=1e-6),
                     max_overhead=None, on_error="raise") if with_gradwatch else None
    out = tmp_path / f"gc{checkpointing}_gw{with_gradwatch}"
    args = TrainingArguments(output_dir=str(out), use_cpu=True, save_strategy="no", report_to="none",
                             disable_tqdm=True, per_device_train_batch_size=4, max_steps=4, logging_steps=1,
                             seed=0, data_seed=0, dataloader_num_workers=0, learning_rate=0.05,
                             lr_scheduler_type="constant", optim="sgd", gradient_checkpointing=checkpointing)
    Trainer(model=model, args=args, train_dataset=TokenData(), callbacks=[cb] if cb else []).train()
    return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "scalars": read_scalars(cb.log_dir) if cb else None, "model": model}


def test_hf_gradient_checkpointing(tmp_path: Any) -> None:
    gc_gw = gpt2_run(tmp_path, checkpointing=True, with_gradwatch=True)
    gc_plain = gpt2_run(tmp_path, checkpointing=True, with_gradwatch=False)
    nogc_gw = gpt2_run(tmp_path, checkpointing=False, with_gradwatch=True)
    assert gc_gw["model"].is_gradient_checkpointing
    lam = gc_gw["scalars"]["sharpness/lambda_max"]
    assert set(lam) == {1, 2, 4}
    assert all(math.isfinite(v) and v > 0 for v in lam.values())
    assert gc_gw["scalars"]["sharpness/converged"][1] == 1.0
    assert lam[1] == pytest.approx(nogc_gw["scalars"]["sharpness/lambda_max"][1], rel=1e-4)
    assert [k for k in gc_plain["state"] if not torch.equal(gc_plain["state"][k], gc_gw["state"][k])] == []
    torch.manual_seed(0)
    assert not torch.equal(gc_plain["state"]["transformer.h.0.attn.c_attn.weight"],
                           GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50, n_positions=16))
                           .state_dict()["transformer.h.0.attn.c_attn.weight"])  # it trained


# ---- DDP (Lightning, two CPU processes, gloo) ----------------------------------------------------------


def ddp_run(out_dir: Any, *modes: str) -> None:
    run_worker(WORKER, str(out_dir), *modes, timeout=120)  # a hang fails here


@pytest.mark.slow
def test_ddp_two_cpu_ranks_sharpness(tmp_path: Any) -> None:
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    ddp_run(tmp_path, "with", "without")
    ranks = [torch.load(tmp_path / "with" / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    plain = [torch.load(tmp_path / "without" / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for run in (ranks, plain):
        assert [r["world_size"] for r in run] == [2, 2] and [r["global_step"] for r in run] == [4, 4]

    # identical weights on both ranks (BatchNorm statistics are per rank: Lightning does not sync them), and
    # every weight and buffer of each rank identical to the same rank of DDP without gradwatch
    params = [n for n, _ in TinyMLP().named_parameters()]
    for run in (ranks, plain):
        assert [k for k in params if not torch.equal(run[0]["final"][k], run[1]["final"][k])] == []
    for r in (0, 1):
        assert [k for k in plain[r]["final"] if not torch.equal(plain[r]["final"][k], ranks[r]["final"][k])] == []
    assert not torch.equal(ranks[0]["final"]["net.0.weight"], ranks[0]["initial"]["net.0.weight"])  # it trained

    # logged by rank 0 only, at steps 1, 2, 4
    lam = read_scalars(ranks[0]["log_dir"])["sharpness/lambda_max"]
    assert set(lam) == {1, 2, 4}
    assert ranks[1]["log_dir"] is None

    # step 1: the dense Hessian of rank 0's probe loss (the module's training_step: cross-entropy) at the
    # weights and BatchNorm statistics of rank 0 at that step, in eval mode
    module = TinyMLP()
    module.load_state_dict(ranks[0]["initial"])
    batches = ranks[0]["probe"]
    assert len(batches) == 1 and batches[0][0].shape == (16, 8)

    def loss_of(fwd: Any) -> Tensor:
        return sum(F.cross_entropy(fwd(x.double()), y) for x, y in batches) / len(batches)

    want = dense_top_eigenvalue(module.net, loss_of)
    assert lam[1] == pytest.approx(want, rel=1e-4)


# ---- bf16 with tied weights (GPT-2's lm_head is its token embedding) -----------------------------------


def test_bf16_gpt2_tied_weights_match_float32_copy() -> None:
    torch.manual_seed(0)
    config = GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=16)
    model = GPT2LMHeadModel(config).to(torch.bfloat16)
    assert model.lm_head.weight is model.transformer.wte.weight
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = TokenData()

    def lm_loss(m: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        return m(**batch).loss

    w = Watcher(WatchConfig(spectra=False, sharpness=SharpnessConfig(every=1, probe_size=8, max_iter=200, tol=1e-6),
                            max_overhead=None, on_error="raise"))
    w.attach(model, probe_source=lambda size: ProbeSet.from_dataset(
        data, size, device=torch.device("cpu"), training_loss_fn=lm_loss, batch_size=4))
    lam = w.run_step(1, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))["sharpness/lambda_max"]
    after = model.state_dict()
    assert all(after[k].dtype == torch.bfloat16 and torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())

    # the same measurement on a float32 copy (deepcopy keeps the tie), in eval mode with the math kernel
    ref = copy.deepcopy(model).float().eval()
    assert ref.lm_head.weight is ref.transformer.wte.weight
    batches = w.probe().batches(drop_last=True)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH), HessianOperator(
            lambda: sum(lm_loss(ref, b) for b in batches) / len(batches), list(ref.parameters())) as op:
        want = float(lanczos_top_eigenvalues(op.matvec, op.dim, k=1, max_iter=200, tol=1e-6).eigenvalues[0])
    assert lam == pytest.approx(want, rel=1e-4)


def test_bf16_without_reparametrization_warns_once_and_measures_natively(monkeypatch: pytest.MonkeyPatch) -> None:
    import gradwatch.engine.context as context

    monkeypatch.setattr(context, "_reparametrize", lambda: None)
    model = bf16_net()
    data = bf16_data()
    w = Watcher(WatchConfig(spectra=False, sharpness=SharpnessConfig(every=1, probe_size=32, max_iter=200, tol=1e-6),
                            max_overhead=None, on_error="raise"))
    w.attach(model, probe_source=lambda size: ProbeSet.from_dataset(
        data, size, device=torch.device("cpu"), training_loss_fn=ce_loss, batch_size=16))
    with pytest.warns(RuntimeWarning, match="own dtype"):
        first = w.run_step(1)["sharpness/lambda_max"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = w.run_step(2)["sharpness/lambda_max"]
    assert math.isfinite(first) and first > 0 and second == pytest.approx(first, rel=1e-2)
