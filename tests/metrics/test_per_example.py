"""Per-example spectra: the vmap route equals the loop, and models vmap cannot trace fall back to the loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.engine import Watcher
from gradwatch.engine.probe import ProbeSet
from gradwatch.metrics.grad_spectrum import PerExampleGradSpectrum


def _per_example(model: nn.Module, dataset: list, use_vmap: bool) -> tuple[dict[str, float], bool]:
    watcher = Watcher(gradwatch.WatchConfig(
        spectra=gradwatch.SpectraConfig(every=1000, per_example=True, per_example_every=1, per_example_size=8),
        max_overhead=None, on_error="raise"))
    watcher.attach(model, probe_source=lambda n: ProbeSet.from_dataset(dataset, n, device=torch.device("cpu")))
    metric = next(d for d in watcher.diagnostics if isinstance(d, PerExampleGradSpectrum))
    metric.use_vmap = use_vmap
    out = watcher.run_step(2)  # step 2: only the per-example mode is due
    return {k: v for k, v in out.items() if k.startswith("grad_spectrum/per_example/")}, metric.use_vmap


def _reference(model: nn.Module, dataset: list, tag_param: str) -> float:
    """Mean nuclear norm of the per-example gradients of one layer, float64 numpy, one example at a time."""
    probe = ProbeSet.from_dataset(dataset, 8, device=torch.device("cpu"))
    param = dict(model.named_parameters())[tag_param]
    model.eval()
    values = []
    for batch in probe.example_batches(8):
        (g,) = torch.autograd.grad(probe.per_example_loss(model, batch).sum(), [param])
        values.append(np.linalg.svd(g.double().numpy(), compute_uv=False).sum())
    model.train()
    return float(np.mean(values))


def test_vmap_equals_loop_and_reference_on_a_plain_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    dataset = [(torch.randn(6), torch.tensor(i % 3)) for i in range(32)]
    vmapped, still_vmap = _per_example(model, dataset, use_vmap=True)
    looped, _ = _per_example(model, dataset, use_vmap=False)
    assert still_vmap  # vmap traced this model
    assert vmapped.keys() == looped.keys() and len(vmapped) == 2 * 6
    for k in looped:
        assert vmapped[k] == pytest.approx(looped[k], rel=1e-5)
    ref = _reference(model, dataset, "2.weight")
    assert vmapped["grad_spectrum/per_example/nuclear_norm/2.weight"] == pytest.approx(ref, rel=1e-5)


def test_hf_model_falls_back_to_the_loop_with_the_same_numbers():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                     intermediate_size=64, vocab_size=100, num_labels=3))
    dataset = [{"input_ids": torch.randint(0, 100, (12,)), "attention_mask": torch.ones(12, dtype=torch.long),
                "labels": torch.tensor(i % 3)} for i in range(32)]
    tried, still_vmap = _per_example(model, dataset, use_vmap=True)
    looped, _ = _per_example(model, dataset, use_vmap=False)
    assert not still_vmap  # HF's mask code branches on tensor values: vmap cannot trace it
    for k in looped:
        assert tried[k] == pytest.approx(looped[k], rel=1e-12)
    tag = "bert.encoder.layer.0.attention.self.query.weight"
    assert tried[f"grad_spectrum/per_example/nuclear_norm/{tag}"] == pytest.approx(
        _reference(model, dataset, tag), rel=1e-5)
