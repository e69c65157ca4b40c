"""End-to-end tests of the Hugging Face adapter (``gradwatch.callbacks.transformers.GradWatch``).

Tiny models built from configs (no downloads) are trained for a few steps by a real ``Trainer``; the
TensorBoard files are read back with tbparse and every logged number is checked against a float64
numpy SVD of a gradient obtained independently of gradwatch.
"""

from __future__ import annotations

import copy
import gc
import os
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
tbparse = pytest.importorskip("tbparse")

from _support.references import svd_statistics  # noqa: E402
from conftest import read_scalars  # noqa: E402
from tbparse import SummaryReader  # noqa: E402
from torch.utils.data import default_collate  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from gradwatch import SPECTRUM_STATS, SpectraConfig  # noqa: E402
from gradwatch.callbacks.transformers import GradWatch  # noqa: E402

RTOL = 1e-5


# ---- tiny models and data -------------------------------------------------------------------------


class TokenDataset(torch.utils.data.Dataset):
    """Random token sequences; ``labels`` are class ids (classifier) or the tokens themselves (causal LM)."""

    def __init__(self, n: int = 32, seq_len: int = 8, vocab: int = 100, num_labels: int | None = 3,
                 seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, vocab, (n, seq_len), generator=g)
        self.labels = torch.randint(0, num_labels, (n,), generator=g) if num_labels else self.ids.clone()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def tiny_bert(dropout: float = 0.0, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        vocab_size=100, num_labels=3, max_position_embeddings=32,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return BertForSequenceClassification(config)


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=32,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def tiny_llama(dropout: float = 0.0, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4, vocab_size=100,
                                        max_position_embeddings=32, attention_dropout=dropout))


def training_args(tmp_path: Any, **overrides: Any) -> TrainingArguments:
    kwargs: dict[str, Any] = dict(output_dir=str(tmp_path), use_cpu=True, save_strategy="no", report_to=["tensorboard"],
                                  disable_tqdm=True, per_device_train_batch_size=4, max_steps=8, logging_steps=1,
                                  seed=0, data_seed=0, dataloader_num_workers=0)
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


# ---- references -----------------------------------------------------------------------------------


def spectrum_tags(scalars: dict[str, dict[int, float]], stat: str,
                  prefix: str = "grad_spectrum") -> dict[str, dict[int, float]]:
    head = f"{prefix}/{stat}/"
    return {t[len(head):]: v for t, v in scalars.items() if t.startswith(head)}


def linear_weight_names(model: nn.Module) -> list[str]:
    return [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)]


class GradCapture(TrainerCallback):
    """Test-side observer: at ``on_pre_optimizer_step`` keeps a float64 copy of every gradient (post-clip,
    as HF leaves them) and, with ``recompute=True``, recomputes the PRE-clip gradient independently by a
    forward/backward of a copy of the model on the batch the Trainer just used (captured by a forward
    pre-hook)."""

    def __init__(self, steps: set[int], recompute: bool = False) -> None:
        self.steps = steps
        self.recompute = recompute
        self.clipped: dict[int, dict[str, np.ndarray]] = {}
        self.preclip: dict[int, dict[str, np.ndarray]] = {}
        self.substep: dict[int, dict[str, np.ndarray]] = {}
        self.wrapped_during_training: list[bool] = []
        self.trainer: Trainer | None = None
        self._batch: dict[str, Any] | None = None
        self._recording = True

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                       **kwargs: Any) -> None:
        def hook(module: nn.Module, a: tuple, kw: dict) -> None:
            if self._recording:
                self._batch = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}

        assert model is not None
        model.register_forward_pre_hook(hook, with_kwargs=True)

    def on_substep_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                       **kwargs: Any) -> None:
        step = state.global_step + 1
        if step in self.steps and step not in self.substep:
            self.substep[step] = {n: p.grad.detach().double().numpy().copy()
                                  for n, p in model.named_parameters() if p.grad is not None}

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                              **kwargs: Any) -> None:
        assert model is not None
        if self.trainer is not None:
            self.wrapped_during_training.append("_clip_grad_norm" in vars(self.trainer))
        step = state.global_step + 1
        if step not in self.steps:
            return
        self.clipped[step] = {n: p.grad.detach().double().numpy().copy()
                              for n, p in model.named_parameters() if p.grad is not None}
        if self.recompute:
            assert self._batch is not None
            self._recording = False
            try:
                twin = copy.deepcopy(model)  # same (pre-step) weights; dropout is off in these configs
                twin.zero_grad(set_to_none=True)
                twin.train()
                loss = twin(**self._batch)["loss"]
                loss.backward()
                self.preclip[step] = {n: p.grad.detach().double().numpy().copy()
                                      for n, p in twin.named_parameters() if p.grad is not None}
            finally:
                self._recording = True


# ---- (a), (b), (d): one clipped BERT run shared by three tests ------------------------------------

BERT_STEPS = {1, 2, 4, 6, 8}


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("bert_clip")
    model = tiny_bert()
    cb = GradWatch(spectra=SpectraConfig(every=2), max_overhead=None, on_error="raise")
    capture = GradCapture(BERT_STEPS, recompute=True)
    args = training_args(tmp, max_grad_norm=1e-3)
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(), callbacks=[cb, capture])
    found_at_init = cb.trainer
    capture.trainer = trainer
    tb = next(c for c in trainer.callback_handler.callbacks if type(c).__name__ == "TensorBoardCallback")
    trainer.train()
    return dict(tmp=tmp, model=model, cb=cb, capture=capture, trainer=trainer, tb_logging_dir=tb.logging_dir,
                found_at_init=found_at_init, scalars=read_scalars(cb.log_dir))


def test_bert_tags_share_hf_run_directory(bert_run: dict[str, Any]) -> None:
    cb, scalars = bert_run["cb"], bert_run["scalars"]
    # gradwatch wrote with HF's own writer: same directory, one events file, HF's loss beside our tags
    assert os.path.realpath(cb.log_dir) == os.path.realpath(bert_run["tb_logging_dir"])
    runs = os.listdir(os.path.join(bert_run["tmp"], "runs"))
    assert len(runs) == 1
    assert len([f for f in os.listdir(cb.log_dir) if f.startswith("events.out.tfevents")]) == 1
    assert sorted(scalars["train/loss"]) == list(range(1, 9))

    expected = linear_weight_names(bert_run["model"])
    assert "classifier.weight" in expected and "bert.encoder.layer.1.attention.self.query.weight" in expected
    for stat in SPECTRUM_STATS:
        tags = spectrum_tags(scalars, stat)
        assert sorted(tags) == sorted(expected), stat
        for tag, series in tags.items():
            assert set(series) == BERT_STEPS, (stat, tag)
            assert all(np.isfinite(v) and v > 0 for v in series.values()), (stat, tag)
    # cross-layer MAD per family and the housekeeping scalars
    mad = scalars["grad_spectrum/mad/nuclear_norm/bert.encoder.layer.*.attention.self.query.weight"]
    q0 = scalars["grad_spectrum/nuclear_norm/bert.encoder.layer.0.attention.self.query.weight"]
    q1 = scalars["grad_spectrum/nuclear_norm/bert.encoder.layer.1.attention.self.query.weight"]
    for step in BERT_STEPS:
        assert mad[step] == pytest.approx(abs(q1[step] - q0[step]), rel=RTOL, abs=1e-9)
    assert set(scalars["gradwatch/overhead"]) == BERT_STEPS
    assert all(v == 0.0 for v in scalars["grad_spectrum/nonfinite_layers"].values())
    assert not any(t.startswith("grad_spectrum/") and "embeddings" in t for t in scalars)


def test_bert_values_are_preclip_spectra(bert_run: dict[str, Any]) -> None:
    scalars, capture = bert_run["scalars"], bert_run["capture"]
    max_norm = 1e-3
    names = linear_weight_names(bert_run["model"])
    assert set(capture.preclip) == BERT_STEPS
    for step in sorted(BERT_STEPS):
        pre, clipped = capture.preclip[step], capture.clipped[step]
        # the independent recomputation is the gradient HF clipped: same norm as HF logged, same direction
        total = np.sqrt(sum(float((g ** 2).sum()) for g in pre.values()))
        hf_norm = scalars["train/grad_norm"][step]
        assert total == pytest.approx(hf_norm, rel=1e-5)
        coef = max_norm / (total + 1e-6)
        assert coef < 0.01  # clipping was active, and strong
        for n in names:
            np.testing.assert_allclose(clipped[n], pre[n] * coef, rtol=1e-4, atol=1e-12 * np.abs(pre[n]).max())
        for n in names:
            ref = svd_statistics(pre[n])
            for stat in SPECTRUM_STATS:
                logged = scalars[f"grad_spectrum/{stat}/{n}"][step]
                assert logged == pytest.approx(ref[stat], rel=RTOL), (step, n, stat)
            # without the reconstruction the norms would be those of the clipped gradient: far smaller
            clipped_ref = svd_statistics(clipped[n])
            assert clipped_ref["spectral_norm"] < 0.01 * scalars[f"grad_spectrum/spectral_norm/{n}"][step]
            assert clipped_ref["spectral_norm"] == pytest.approx(coef * ref["spectral_norm"], rel=1e-4)


def test_trainer_found_and_clip_restored(bert_run: dict[str, Any]) -> None:
    cb, trainer, capture = bert_run["cb"], bert_run["trainer"], bert_run["capture"]
    assert bert_run["found_at_init"] is trainer  # found from the frame that fired on_init_end
    assert cb.trainer is trainer
    # the clip wrapper was in place for every optimizer step and is gone afterwards
    assert len(capture.wrapped_during_training) == 8 and all(capture.wrapped_during_training)
    assert "_clip_grad_norm" not in vars(trainer)
    assert trainer._clip_grad_norm.__func__ is Trainer._clip_grad_norm


def test_trainer_found_when_added_after_construction(tmp_path: Any) -> None:
    model = tiny_bert()
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=2), train_dataset=TokenDataset())
    cb = GradWatch(spectra=SpectraConfig(every=1), max_overhead=None, on_error="raise")
    trainer.add_callback(cb)  # on_init_end never reaches it: found at on_train_begin instead
    trainer.train()
    assert cb.trainer is trainer
    assert "_clip_grad_norm" not in vars(trainer)
    scalars = read_scalars(cb.log_dir)
    assert set(scalars["grad_spectrum/spectral_norm/classifier.weight"]) == {1, 2}
    # only a weak reference is kept: the Trainer can be freed
    del trainer
    gc.collect()
    assert cb.trainer is None


def test_two_gradwatch_instances_stack_and_unwind(tmp_path: Any) -> None:
    """``report_to=["gradwatch"]`` plus an explicit ``GradWatch()``: two clip wrappers stacked on one Trainer;
    both see the pre-clip norm, and the end of training unwinds them without an AttributeError."""
    from gradwatch.integrations.huggingface import GradWatchTrainingArguments

    model = tiny_bert()
    cb = GradWatch(spectra=SpectraConfig(every=1), max_overhead=None, on_error="raise")
    args = GradWatchTrainingArguments(output_dir=str(tmp_path), use_cpu=True, save_strategy="no", disable_tqdm=True,
                                      report_to=["gradwatch"], per_device_train_batch_size=4, max_steps=2,
                                      logging_steps=1, max_grad_norm=1e-3, gradwatch_spectra_every=1,
                                      gradwatch_max_overhead=1.0, gradwatch_on_error="raise")
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(), callbacks=[cb])
    trainer.train()
    inner = next(c for c in trainer.callback_handler.callbacks if type(c).__name__ == "GradWatchTensorBoardCallback")
    assert inner.gradwatch.log_dir == cb.log_dir  # one run, one writer
    wrapper = vars(trainer).get("_clip_grad_norm")
    assert wrapper is None or wrapper.__qualname__.endswith("clip_and_remember")  # at most a pass-through left
    df = SummaryReader(cb.log_dir).scalars
    rows = df[df["tag"] == "grad_spectrum/spectral_norm/classifier.weight"]
    assert sorted(rows["step"].tolist()) == [1, 1, 2, 2]  # both instances logged both steps ...
    for step in (1, 2):
        a, b = rows[rows["step"] == step]["value"].tolist()
        assert a == pytest.approx(b, rel=1e-6)  # ... the same reconstructed pre-clip values
    assert rows["value"].max() > 10 * 1e-3  # larger than any clipped gradient could be


# ---- (c) GPT-2 fused c_attn ------------------------------------------------------------------------


def test_gpt2_fused_qkv_split(tmp_path: Any) -> None:
    model = tiny_gpt2()
    steps = {1, 2, 3}
    cb = GradWatch(spectra=SpectraConfig(every=1), max_overhead=None, on_error="raise")
    capture = GradCapture(steps)
    args = training_args(tmp_path, max_steps=3, max_grad_norm=0.0)
    Trainer(model=model, args=args, train_dataset=TokenDataset(num_labels=None), callbacks=[cb, capture]).train()
    scalars = read_scalars(cb.log_dir)
    assert set(scalars["train/loss"]) == steps

    tags = spectrum_tags(scalars, "nuclear_norm")
    for layer in (0, 1):
        c_attn = f"transformer.h.{layer}.attn.c_attn.weight"
        assert {f"{c_attn}.q", f"{c_attn}.k", f"{c_attn}.v"} <= set(tags)
        assert c_attn not in tags
        assert {f"transformer.h.{layer}.attn.c_proj.weight", f"transformer.h.{layer}.mlp.c_fc.weight",
                f"transformer.h.{layer}.mlp.c_proj.weight"} <= set(tags)
    assert len(tags) == 2 * 6  # q, k, v, attn.c_proj, c_fc, mlp.c_proj per layer; lm_head (tied) off

    for step in sorted(steps):
        grads = capture.clipped[step]  # max_grad_norm=0: nothing clipped
        for layer in (0, 1):
            c_attn = f"transformer.h.{layer}.attn.c_attn.weight"
            g = grads[c_attn]  # Conv1D stores (in, 3*out): block i is columns [32 i, 32 (i+1))
            assert g.shape == (32, 96)
            for i, part in enumerate("qkv"):
                ref = svd_statistics(g[:, 32 * i:32 * (i + 1)].T)
                for stat in SPECTRUM_STATS:
                    assert scalars[f"grad_spectrum/{stat}/{c_attn}.{part}"][step] == pytest.approx(ref[stat], rel=RTOL)
            fused = svd_statistics(g.T)["nuclear_norm"]
            q = scalars[f"grad_spectrum/nuclear_norm/{c_attn}.q"][step]
            k = scalars[f"grad_spectrum/nuclear_norm/{c_attn}.k"][step]
            assert abs(q - k) > 1e-3 * q and abs(q - fused) > 1e-3 * fused  # really three blocks
            ref = svd_statistics(grads[f"transformer.h.{layer}.mlp.c_fc.weight"].T)
            assert scalars[f"grad_spectrum/spectral_norm/transformer.h.{layer}.mlp.c_fc.weight"][step] == pytest.approx(
                ref["spectral_norm"], rel=RTOL)
        mad = scalars["grad_spectrum/mad/stable_rank/transformer.h.*.attn.c_attn.weight.v"][step]
        v0 = scalars["grad_spectrum/stable_rank/transformer.h.0.attn.c_attn.weight.v"][step]
        v1 = scalars["grad_spectrum/stable_rank/transformer.h.1.attn.c_attn.weight.v"][step]
        assert mad == pytest.approx(abs(v1 - v0), rel=RTOL, abs=1e-9)


# ---- (e) observe only -----------------------------------------------------------------------------


def test_observe_only_bitwise_identical_weights(tmp_path: Any) -> None:
    def run(with_gradwatch: bool) -> tuple[dict[str, torch.Tensor], GradWatch | None]:
        model = tiny_bert(dropout=0.1)  # dropout on: any RNG draw by gradwatch would change the masks
        callbacks = []
        cb = None
        if with_gradwatch:
            cb = GradWatch(spectra=SpectraConfig(every=1, per_example=True, per_example_every=2, per_example_size=4),
                           max_overhead=None, on_error="raise")
            callbacks.append(cb)
        args = training_args(tmp_path / ("with" if with_gradwatch else "without"), max_steps=4, seed=7, data_seed=7,
                             report_to="none")
        Trainer(model=model, args=args, train_dataset=TokenDataset(), callbacks=callbacks).train()
        return {k: v.detach().clone() for k, v in model.state_dict().items()}, cb

    initial = tiny_bert(dropout=0.1).state_dict()
    without, _ = run(False)
    with_gw, cb = run(True)
    assert cb is not None
    scalars = read_scalars(cb.log_dir)
    # gradwatch really did its work during the run (including the extra per-example passes)
    assert set(scalars["grad_spectrum/per_example/nuclear_norm/classifier.weight"]) == {1, 2, 4}
    assert set(scalars["grad_spectrum/nuclear_norm/classifier.weight"]) == {1, 2, 3, 4}
    assert not torch.equal(without["classifier.weight"], initial["classifier.weight"])  # it trained
    assert without.keys() == with_gw.keys()
    different = [k for k in without if not torch.equal(without[k], with_gw[k])]
    assert different == []


# ---- (f) gradient accumulation --------------------------------------------------------------------


def test_gradient_accumulation_logs_optimizer_steps(tmp_path: Any) -> None:
    model = tiny_bert()
    steps = {1, 2, 3, 4}
    cb = GradWatch(spectra=SpectraConfig(every=1), max_overhead=None, on_error="raise")
    capture = GradCapture(steps)
    args = training_args(tmp_path, max_steps=4, gradient_accumulation_steps=2, max_grad_norm=0.0)
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(), callbacks=[cb, capture])
    trainer.train()
    assert trainer.state.global_step == 4
    scalars = read_scalars(cb.log_dir)
    assert set(scalars["train/loss"]) == steps
    name = "bert.encoder.layer.0.attention.self.query.weight"
    for stat in SPECTRUM_STATS:
        assert set(scalars[f"grad_spectrum/{stat}/{name}"]) == steps  # 8 micro-batches, 4 optimizer steps
    for step in sorted(steps):
        accumulated = capture.clipped[step][name]
        ref = svd_statistics(accumulated)
        for stat in SPECTRUM_STATS:
            assert scalars[f"grad_spectrum/{stat}/{name}"][step] == pytest.approx(ref[stat], rel=RTOL)
        # the first micro-batch alone has a different gradient: what was logged is the accumulated one
        first_micro = svd_statistics(capture.substep[step][name])
        assert abs(first_micro["nuclear_norm"] - ref["nuclear_norm"]) > 1e-3 * ref["nuclear_norm"]


# ---- (g) no TensorBoard in report_to --------------------------------------------------------------


def test_own_writer_without_hf_tensorboard(tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    model = tiny_bert()
    cb = GradWatch(spectra=SpectraConfig(every=2), max_overhead=None, on_error="raise")
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=4, report_to="none"),
                      train_dataset=TokenDataset(), callbacks=[cb])
    assert not any(type(c).__name__ == "TensorBoardCallback" for c in trainer.callback_handler.callbacks)
    trainer.train()
    assert cb.log_dir is not None
    runs = os.path.join(str(tmp_path), "runs")
    assert os.path.dirname(os.path.realpath(cb.log_dir)) == os.path.realpath(runs)
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(cb.log_dir))
    assert cb.log_dir in capsys.readouterr().out  # the user is told where the files went
    scalars = read_scalars(cb.log_dir)
    assert "train/loss" not in scalars  # nobody else writes there
    series = scalars["grad_spectrum/frobenius_norm/classifier.weight"]
    assert set(series) == {1, 2, 4}
    assert all(v > 0 for v in series.values())


# ---- (h) per-example spectra ----------------------------------------------------------------------


def _per_example_reference(model: nn.Module, dataset: Any, indices: list[int],
                           names: list[str]) -> dict[str, dict[str, float]]:
    """Mean over examples of each layer's statistics of the single-example gradient (eval mode, the
    model's own loss on a batch of one)."""
    twin = copy.deepcopy(model).eval()
    sums: dict[str, dict[str, float]] = {n: dict.fromkeys(SPECTRUM_STATS, 0.0) for n in names}
    params = dict(twin.named_parameters())
    for i in indices:
        batch = default_collate([dataset[i]])
        twin.zero_grad(set_to_none=True)
        twin(**batch).loss.backward()
        for n in names:
            for stat, v in svd_statistics(params[n].grad.double().numpy()).items():
                sums[n][stat] += v / len(indices)
    return sums


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_per_example_spectra(tmp_path: Any, kind: str) -> None:
    # dropout on: the papers' protocol runs in eval mode, so the training-mode dropout must not leak in
    if kind == "bert":
        model, dataset = tiny_bert(dropout=0.1), TokenDataset()
        names = [f"bert.encoder.layer.{i}.attention.self.{p}.weight" for i in (0, 1) for p in ("query", "value")]
        names.append("classifier.weight")
    else:
        model, dataset = tiny_llama(dropout=0.1), TokenDataset(num_labels=None)
        names = [f"model.layers.{i}.{p}.weight" for i in (0, 1)
                 for p in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj")]
    initial = copy.deepcopy(model)
    cb = GradWatch(spectra=SpectraConfig(every=4, per_example=True, per_example_every=2, per_example_size=4),
                   max_overhead=None, on_error="raise")
    Trainer(model=model, args=training_args(tmp_path, max_steps=4), train_dataset=dataset, callbacks=[cb]).train()
    scalars = read_scalars(cb.log_dir)
    assert set(scalars["train/loss"]) == {1, 2, 3, 4}

    per_example = {stat: spectrum_tags(scalars, stat, "grad_spectrum/per_example") for stat in SPECTRUM_STATS}
    batch_tags = spectrum_tags(scalars, "nuclear_norm")
    assert set(per_example["nuclear_norm"]) == set(batch_tags)  # every watched layer, in both modes
    assert "lm_head.weight" not in batch_tags
    for stat in SPECTRUM_STATS:
        for tag, series in per_example[stat].items():
            assert set(series) == {1, 2, 4}, (stat, tag)  # per_example_every=2 (and step 1)
    for tag, series in batch_tags.items():
        assert set(series) == {1, 4}, tag  # every=4 (and step 1)

    # step 1: the weights are the initial ones, so the protocol can be recomputed independently
    indices = list(cb.watcher.probe().indices)[:4]
    assert len(set(indices)) == 4 and all(0 <= i < len(dataset) for i in indices)
    ref = _per_example_reference(initial, dataset, indices, names)
    for n in names:
        for stat in SPECTRUM_STATS:
            assert per_example[stat][n][1] == pytest.approx(ref[n][stat], rel=RTOL), (n, stat)
        # the mean of per-example spectra is not the spectrum of the mini-batch gradient
        assert abs(per_example["nuclear_norm"][n][1] - batch_tags[n][1]) > 1e-3 * batch_tags[n][1]
