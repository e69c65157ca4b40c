"""Sharpness end to end through real hosts: Lightning and the Hugging Face Trainer.

Observe-only (bitwise identical weights and BatchNorm buffers with and without gradwatch), tags read back
from TensorBoard, the user's own logging untouched by the probe passes, the Hessian of HF's
``compute_loss``, and bad input.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from gradwatch import SharpnessConfig
from gradwatch.callbacks.lightning import GradWatch as LightningGradWatch

transformers = pytest.importorskip("transformers")
from _lightning_helpers import TinyMLP  # noqa: E402
from _support.hf import training_args  # noqa: E402
from _support.models import DictNet  # noqa: E402
from conftest import TokenData  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from gradwatch.callbacks.transformers import GradWatch as HFGradWatch  # noqa: E402

TAGS = ("sharpness/lambda_max", "sharpness/threshold", "sharpness/ratio", "sharpness/converged", "sharpness/hvps")


def read_scalars(log_dir: str) -> dict[str, dict[int, float]]:
    from tbparse import SummaryReader

    df = SummaryReader(str(log_dir)).scalars
    return {tag: dict(zip(g["step"].astype(int), g["value"].astype(float))) for tag, g in df.groupby("tag")}


def make_data(n: int = 64, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return TensorDataset(x, (x @ torch.randn(8, 3, generator=g)).argmax(1))


def bn_dropout_net() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Dropout(0.25),
                         nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


# ---- Lightning ------------------------------------------------------------------------------------


def lightning_run(tmp_path: Any, with_gradwatch: bool, steps: int = 20, probe_size: int = 32) -> dict[str, Any]:
    L.seed_everything(0, workers=True)
    module = TinyMLP(net=bn_dropout_net())
    callbacks = []
    cb = None
    if with_gradwatch:
        cb = LightningGradWatch(spectra=False, sharpness=SharpnessConfig(every=10, probe_size=probe_size, tol=1e-4),
                                max_overhead=None, on_error="raise")
        callbacks.append(cb)
    root = str(tmp_path / ("with" if with_gradwatch else "without"))
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", deterministic=True, callbacks=callbacks,
                        default_root_dir=root, logger=L.pytorch.loggers.TensorBoardLogger(root),
                        log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False)
    loader = DataLoader(make_data(), batch_size=16, shuffle=True)
    trainer.fit(module, loader)
    return {"state": {k: v.detach().clone() for k, v in module.state_dict().items()}, "cb": cb,
            "trainer": trainer, "logdir": trainer.logger.log_dir,
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()}}


@pytest.fixture(scope="module")
def lightning_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("lit")
    return lightning_run(tmp, False), lightning_run(tmp, True)


def test_lightning_bitwise_identical_weights_and_buffers(lightning_runs: Any) -> None:
    without, with_gw = lightning_runs
    assert "net.1.running_mean" in without["state"] and "net.1.num_batches_tracked" in without["state"]
    assert int(without["state"]["net.1.num_batches_tracked"]) == 20
    assert without["state"].keys() == with_gw["state"].keys()
    different = [k for k in without["state"] if not torch.equal(without["state"][k], with_gw["state"][k])]
    assert different == []


def test_lightning_sharpness_tags(lightning_runs: Any) -> None:
    _, with_gw = lightning_runs
    scalars = read_scalars(with_gw["cb"].log_dir)
    for tag in TAGS:
        assert set(scalars[tag]) == {1, 10, 20}, tag
    for step in (10, 20):
        lam = scalars["sharpness/lambda_max"][step]
        assert np.isfinite(lam) and lam > 0
        assert scalars["sharpness/threshold"][step] == pytest.approx((2 + 2 * 0.9) / 0.1, rel=1e-6)
        assert scalars["sharpness/ratio"][step] == pytest.approx(lam / 38.0, rel=1e-5)
        assert scalars["sharpness/converged"][step] == 1.0
        assert 1 <= scalars["sharpness/hvps"][step] <= 50


def test_lightning_user_logging_unchanged(lightning_runs: Any) -> None:
    without, with_gw = lightning_runs
    assert with_gw["metrics"]["train_loss"] == without["metrics"]["train_loss"]
    a, b = read_scalars(without["logdir"]), read_scalars(with_gw["logdir"])
    assert len(a["train_loss"]) == 20
    assert a["train_loss"] == b["train_loss"]


def test_lightning_probe_larger_than_dataset_uses_all_of_it_and_says_so(tmp_path: Any) -> None:
    with pytest.warns(RuntimeWarning, match="asks for 100 examples but the training dataset has 64; using all 64"):
        lightning_run(tmp_path, True, steps=2, probe_size=100)


# ---- Hugging Face Trainer -------------------------------------------------------------------------


def HFNet() -> DictNet:  # noqa: N802 - stands where a class did
    """:func:`bn_dropout_net` with a Hugging Face style forward."""
    return DictNet(net=bn_dropout_net())


class DictData(torch.utils.data.Dataset):
    def __init__(self, n: int = 64) -> None:
        self.x, self.y = make_data(n).tensors

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


def hf_args(tmp_path: Any, **overrides: Any) -> TrainingArguments:
    """:func:`_support.hf.training_args` with this file's defaults: 20 steps of plain SGD at lr 0.1."""
    return training_args(tmp_path, **{"max_steps": 20, "learning_rate": 0.1, "optim": "sgd", **overrides})


def test_hf_bitwise_identical_weights_and_tags(tmp_path: Any) -> None:
    def run(with_gradwatch: bool) -> tuple[dict[str, Tensor], Any]:
        torch.manual_seed(0)
        model = HFNet()
        cb = HFGradWatch(spectra=False, sharpness=SharpnessConfig(every=10, probe_size=32, tol=1e-4),
                         max_overhead=None, on_error="raise") if with_gradwatch else None
        Trainer(model=model, args=hf_args(tmp_path / str(with_gradwatch)), train_dataset=DictData(),
                callbacks=[cb] if cb else []).train()
        return {k: v.detach().clone() for k, v in model.state_dict().items()}, cb

    without, _ = run(False)
    with_gw, cb = run(True)
    assert int(without["net.1.num_batches_tracked"]) == 20
    torch.manual_seed(0)
    assert not torch.equal(HFNet().state_dict()["net.0.weight"], without["net.0.weight"])  # it trained
    assert [k for k in without if not torch.equal(without[k], with_gw[k])] == []
    scalars = read_scalars(cb.log_dir)
    for tag in TAGS:
        assert set(scalars[tag]) == {1, 10, 20}, tag
    for step in (10, 20):
        lam = scalars["sharpness/lambda_max"][step]
        assert lam > 0
        assert scalars["sharpness/threshold"][step] == pytest.approx(2 / 0.1, rel=1e-6)
        assert scalars["sharpness/ratio"][step] == pytest.approx(lam / 20.0, rel=1e-5)
        assert scalars["sharpness/converged"][step] == 1.0


class Snapshot(TrainerCallback):
    """Copies the weights the sharpness of step ``step`` was measured at (before that optimizer step)."""

    def __init__(self, step: int) -> None:
        self.step, self.state = step, None

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if state.global_step + 1 == self.step:
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny GPT-2 trained one step by a real Trainer; our own ARPACK eigenvalue of trainer.compute_loss."""
    tmp_path = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=16,
                                       resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1))
    cb = HFGradWatch(spectra=False, sharpness=SharpnessConfig(every=100, probe_size=8, tol=1e-5, max_iter=200),
                     max_overhead=None, on_error="raise")
    snap = Snapshot(1)
    trainer = Trainer(model=model, args=hf_args(tmp_path, max_steps=1, per_device_train_batch_size=4,
                                                learning_rate=0.05, report_to="none"),
                      train_dataset=TokenData(), callbacks=[cb, snap])
    trainer.train()
    scalars = read_scalars(cb.log_dir)

    # our own: ARPACK on Hessian-vector products of trainer.compute_loss, eval mode, same probe batches,
    # with num_items_in_batch = every label (as gradwatch's hf_training_loss passes it)
    model.load_state_dict(snap.state)
    model.eval()
    batches = cb.watcher.probe().batches(drop_last=True)
    assert len(batches) == 2 and batches[0]["input_ids"].shape == (4, 8)
    params = [p for p in model.parameters() if p.requires_grad]
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        loss = sum(trainer.compute_loss(model, b, num_items_in_batch=(b["labels"] != -100).sum())
                   for b in batches) / len(batches)
        grads = torch.autograd.grad(loss, params, create_graph=True)

    def hvp(v: np.ndarray) -> np.ndarray:
        vs = torch.split(torch.as_tensor(v.reshape(-1), dtype=torch.float32), [p.numel() for p in params])
        hv = torch.autograd.grad(grads, params, grad_outputs=[a.view_as(p) for a, p in zip(vs, params)],
                                 retain_graph=True)
        return torch.cat([h.reshape(-1) for h in hv]).double().numpy()

    dim = sum(p.numel() for p in params)
    top = float(eigsh(LinearOperator((dim, dim), matvec=hvp, dtype=np.float64), k=1, which="LA",
                      tol=1e-6, v0=np.ones(dim))[0][0])
    with torch.no_grad():
        mean_ce = sum(model(**b).loss for b in batches) / len(batches)
    return {"logged": scalars["sharpness/lambda_max"][1], "converged": scalars["sharpness/converged"][1],
            "top": top, "loss": float(loss), "mean_ce": float(mean_ce)}


def test_hf_hessian_of_compute_loss_gpt2(gpt2_run: dict[str, Any]) -> None:
    assert gpt2_run["converged"] == 1.0
    assert gpt2_run["logged"] == pytest.approx(gpt2_run["top"], rel=1e-3)
    # compute_loss with num_items_in_batch, not a per-token mean: they differ by 7/8 here
    assert gpt2_run["loss"] == pytest.approx(gpt2_run["mean_ce"] * 7 / 8, rel=1e-5)


def test_hf_probe_loss_is_training_loop_loss_llama(tmp_path: Any) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from gradwatch.integrations.huggingface import HFTrainingLoss

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=50,
                                         max_position_embeddings=16))
    trainer = Trainer(model=model, args=hf_args(tmp_path, report_to="none"), train_dataset=TokenData())
    batch = {k: torch.stack([TokenData()[i][k] for i in range(4)]) for k in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        probed = float(HFTrainingLoss(trainer)(model, batch))
        trained = float(trainer.compute_loss(model, batch,
                                             num_items_in_batch=trainer._get_num_items_in_batch([batch], torch.device("cpu"))))
    assert probed == pytest.approx(trained, rel=1e-6)


def test_hf_probe_larger_than_dataset_uses_all_of_it_and_says_so(tmp_path: Any) -> None:
    torch.manual_seed(0)
    cb = HFGradWatch(spectra=False, sharpness=SharpnessConfig(every=1, probe_size=100), max_overhead=None)
    trainer = Trainer(model=HFNet(), args=hf_args(tmp_path, max_steps=2, report_to="none"), train_dataset=DictData(),
                      callbacks=[cb])
    with pytest.warns(RuntimeWarning, match="asks for 100 examples but the training dataset has 64; using all 64"):
        trainer.train()
    assert len(cb.watcher.probe()) == 64


# ---- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"probe_size": 0}, "probe_size"), ({"max_iter": 0}, "max_iter"), ({"tol": 0}, "tol"), ({"tol": 2}, "tol"),
])
def test_bad_config_raises_at_construction(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=f"SharpnessConfig.{field}"):
        SharpnessConfig(**kwargs)
