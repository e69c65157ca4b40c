"""Lightning's demo transformer with the Lightning callback, at a small size and offline: the fused attention
projections of ``nn.Transformer`` are split into q, k and v, and heatmaps are drawn."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("lightning")

from conftest import read_scalars  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))


def test_python_reference_words() -> None:
    import lightning_transformer as example

    ids, vocab = example.python_reference_words(vocab_size=300)
    assert len(vocab) == 300 and vocab[:2] == [example.UNKNOWN, example.END]
    assert int(ids.max()) < 300 and len(ids) > 50_000  # the language reference is real, and long
    assert {"the", "class", "return"} <= set(vocab)
    inputs, target = example.Blocks(ids)[3]
    assert inputs.shape == target.shape == (example.BLOCK,)
    assert (inputs[1:] == target[:-1]).all()  # the demo's next-word pairs


@pytest.mark.slow
def test_lightning_transformer_small_run(tmp_path: Path) -> None:
    import lightning_transformer as example

    result = example.main(["--small", "--log-dir", str(tmp_path)])
    assert result["steps"] == 12
    assert Path(result["log_dir"]) == tmp_path / "lightning_transformer" / "version_0"
    scalars = read_scalars(result["log_dir"])
    assert "train_loss" in scalars
    for stack, attention in (("encoder", "self_attn"), ("decoder", "self_attn"), ("decoder", "multihead_attn")):
        for layer in (0, 1):
            for part in ("q", "k", "v"):  # nn.MultiheadAttention.in_proj_weight, split
                tag = f"grad_spectrum/effective_rank/model.transformer.{stack}.layers.{layer}.{attention}.in_proj_weight.{part}"
                assert set(scalars[tag]) == {1, 4, 8, 12}, tag
            assert f"grad_spectrum/nuclear_norm/model.transformer.{stack}.layers.{layer}.{attention}.out_proj.weight" \
                in scalars
    assert set(scalars["grad_spectrum/mad/nuclear_norm/model.transformer.encoder.layers.*.self_attn.in_proj_weight.q"]) \
        == {1, 4, 8, 12}

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(result["log_dir"], size_guidance={"images": 0})
    events.Reload()
    assert "grad_spectrum/heatmap/effective_rank" in events.Tags()["images"]
    assert [e.step for e in events.Images("grad_spectrum/heatmap/effective_rank")] == [12]
