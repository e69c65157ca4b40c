"""``gradwatch score-data`` and ``compare`` of two scorings: statistics against a float64 reference taken one
example at a time, determinism, resume, the bad-line message, RD on a known pair, the CLI end to end."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import _scoring_tiny as tiny  # noqa: E402

from gradwatch import cli  # noqa: E402
from gradwatch.scoring import compare as cmp  # noqa: E402
from gradwatch.scoring.data import load_examples, parse_record, write_jsonl  # noqa: E402
from gradwatch.scoring.groups import layer_groups, matrix_role, scored_matrices  # noqa: E402
from gradwatch.scoring.objectives import encode  # noqa: E402
from gradwatch.scoring.score import SCORE_STATS, ScoringOptions, read_scores, score_dataset  # noqa: E402

MAX_LENGTH = 48


def examples():
    return [parse_record(r, i, f"line {i + 1}") for i, r in enumerate(tiny.RECORDS)]


def tiny_bert(dtype: torch.dtype = torch.float64):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tiny.CHARS) + 2, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    config._attn_implementation = "eager"
    return BertModel(config).to(dtype).eval()


# --- the statistics against a float64 dense reference, one example at a time -----------------------------------


def reference_statistics(g: torch.Tensor) -> dict[str, float]:
    """The statistics of one gradient matrix from its float64 singular values, written out here on purpose."""
    s = torch.linalg.svdvals(g.double())
    p = s / s.sum()
    p = p[p > 0]
    return {"nuclear_norm": float(s.sum()), "spectral_norm": float(s[0]),
            "stable_rank": float((s * s).sum() / s[0] ** 2), "effective_rank": float(torch.exp(-(p * p.log()).sum())),
            "frobenius_norm": float(g.double().norm())}


def reference_matrices(model, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each scored tag's gradient matrix of ``loss``, by torch.autograd, fused GPT-2 c_attn split by hand."""
    params = dict(model.named_parameters())
    weights = [n for n in params if n.endswith("weight") and params[n].ndim == 2 and "emb" not in n and "wte" not in n
               and "wpe" not in n]
    grads = dict(zip(weights, torch.autograd.grad(loss, [params[n] for n in weights], allow_unused=True)))
    out = {}
    for name, g in grads.items():
        if g is None:
            continue
        if name.endswith("c_attn.weight"):
            for part, block in zip("qkv", g.chunk(3, dim=1)):
                out[f"{name}.{part}"] = block
        else:
            out[name] = g
    return out


def reference_causal_loss(model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(model(input_ids=ids[None]).logits[0, :-1], dim=-1)
    target = labels[1:]
    rows = (target != -100).nonzero().squeeze(1)
    return -logp[rows, target[rows]].mean()


def reference_pair_loss(model, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    ea = model(input_ids=a[None]).last_hidden_state[0].mean(0)
    eb = model(input_ids=b[None]).last_hidden_state[0].mean(0)
    return 1 - (ea @ eb) / (ea.norm() * eb.norm())


def check_against_reference(model, objective: str, tmp_path: Path, batch_size: int, rel: float) -> int:
    tok = tiny.tokenizer()
    exs = examples()
    result = score_dataset(model, tok, exs, tmp_path / f"out{batch_size}", ScoringOptions(
        objective=objective, max_length=MAX_LENGTH, batch_size=batch_size), progress=False, figures=False)
    tags = result.summary["matrices"]
    records = {r["index"]: r for r in read_scores(result.out_dir / "scores.jsonl")}
    checked = 0
    for ex in exs:
        enc = encode(tok, ex, objective, MAX_LENGTH)
        if objective == "causal_lm":
            loss = reference_causal_loss(model, enc["input_ids"], enc["labels"])
        else:
            loss = reference_pair_loss(model, enc["input_ids_a"], enc["input_ids_b"])
        ref = reference_matrices(model, loss)
        assert set(tags) <= set(ref), set(tags) - set(ref)
        record = records[ex.index]
        assert math.isclose(record["loss"], loss.item(), rel_tol=1e-6)
        for j, tag in enumerate(tags):
            want = reference_statistics(ref[tag])
            for stat in SCORE_STATS:
                got = record["layers"][stat][j]
                assert math.isclose(got, want[stat], rel_tol=rel), (ex.index, tag, stat, got, want[stat])
                checked += 1
        groups = layer_groups(scored_matrices(model))
        for stat in SCORE_STATS:  # group values are the means of their matrices' values
            for g, rows in groups.items():
                want = sum(record["layers"][stat][j] for j in rows) / len(rows)
                assert math.isclose(record["groups"][stat][g], want, rel_tol=1e-12)
    return checked


@pytest.mark.parametrize("batch_size", [4, 1], ids=["vmap", "one-at-a-time"])
def test_causal_lm_statistics_equal_float64_reference(tmp_path: Path, batch_size: int) -> None:
    assert check_against_reference(tiny.gpt2(dtype=torch.float64), "causal_lm", tmp_path, batch_size, 1e-5) > 500


def tiny_llama(dtype: torch.dtype = torch.float64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=3, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tiny.CHARS) + 2, max_position_embeddings=128,
                         pad_token_id=1, eos_token_id=1, bos_token_id=1, tie_word_embeddings=False)
    config._attn_implementation = "eager"
    config.architectures = ["LlamaForCausalLM"]
    return LlamaForCausalLM(config).to(dtype).eval()


def test_llama_statistics_equal_float64_reference(tmp_path: Path) -> None:
    """The seed papers' model family (q/k/v/o_proj, gate/up/down_proj; grouped-query attention, rotary)."""
    assert check_against_reference(tiny_llama(), "causal_lm", tmp_path, 4, 1e-5) > 500


def test_pair_cosine_statistics_equal_float64_reference(tmp_path: Path) -> None:
    assert check_against_reference(tiny_bert(), "pair_cosine", tmp_path, 4, 1e-5) > 500


def test_float32_model_statistics_equal_float64_spectra_of_its_own_gradients(tmp_path: Path) -> None:
    """A float32 model: the statistics are those of each example's own float32 gradient (autograd, unpadded),
    whose spectrum is taken in float64, within 1e-5 although the batched gradients were padded."""
    assert check_against_reference(tiny.gpt2(dtype=torch.float32), "causal_lm", tmp_path, 4, 1e-5) > 500


# --- determinism, resume ----------------------------------------------------------------------------------------

FILES = ("run.json", "scores.jsonl", "summary.json", "ranking.jsonl")


def test_same_dataset_scored_twice_gives_identical_files(tmp_path: Path) -> None:
    for name in ("a", "b"):
        score_dataset(tiny.gpt2(), tiny.tokenizer(), examples(), tmp_path / name,
                      ScoringOptions(max_length=MAX_LENGTH, batch_size=3), progress=False, figures=False)
    for f in FILES:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


class Stop(Exception):
    pass


def test_resume_after_a_stop_and_a_torn_line_gives_the_uninterrupted_output(tmp_path: Path) -> None:
    options = ScoringOptions(max_length=MAX_LENGTH, batch_size=2)
    full = score_dataset(tiny.gpt2(), tiny.tokenizer(), examples(), tmp_path / "full", options, progress=False,
                         figures=False)
    assert full.scored_now == 7 and full.resumed == 0

    def stop_after_two_chunks(done: int) -> None:
        if done >= 4:
            raise Stop

    with pytest.raises(Stop):
        score_dataset(tiny.gpt2(), tiny.tokenizer(), examples(), tmp_path / "part", options, progress=False,
                      figures=False, on_chunk=stop_after_two_chunks)
    scores = tmp_path / "part" / "scores.jsonl"
    lines = scores.read_text().splitlines(keepends=True)
    assert len(lines) == 4
    scores.write_text("".join(lines[:3]) + lines[3][:25])  # the 4th record cut mid-write
    again = score_dataset(tiny.gpt2(), tiny.tokenizer(), examples(), tmp_path / "part", options, progress=False,
                          figures=False)
    assert again.resumed == 3 and again.scored_now == 4
    for f in FILES:
        assert (tmp_path / "full" / f).read_bytes() == (tmp_path / "part" / f).read_bytes(), f
    done = score_dataset(tiny.gpt2(), tiny.tokenizer(), examples(), tmp_path / "part", options, progress=False,
                         figures=False)
    assert done.scored_now == 0 and done.resumed == 7


def test_resume_refuses_other_settings(tmp_path: Path) -> None:
    score_dataset(tiny.gpt2(), tiny.tokenizer(), examples()[:3], tmp_path, ScoringOptions(max_length=MAX_LENGTH),
                  progress=False, figures=False)
    with pytest.raises(ValueError, match=r"other settings \(dataset_sha256, examples differ\)"):
        score_dataset(tiny.gpt2(), tiny.tokenizer(), examples(), tmp_path, ScoringOptions(max_length=MAX_LENGTH),
                      progress=False, figures=False)
    with pytest.raises(ValueError, match=r"options.max_length"):
        score_dataset(tiny.gpt2(), tiny.tokenizer(), examples()[:3], tmp_path, ScoringOptions(max_length=40),
                      progress=False, figures=False)
    (tmp_path / "run.json").unlink()
    with pytest.raises(ValueError, match=r"has a scores.jsonl but no run.json"):
        score_dataset(tiny.gpt2(), tiny.tokenizer(), examples()[:3], tmp_path, ScoringOptions(max_length=MAX_LENGTH),
                      progress=False, figures=False)


# --- reading datasets -------------------------------------------------------------------------------------------


def test_formats_read_alike(tmp_path: Path) -> None:
    exs = examples()
    assert exs[0].prompt_text == "what is two plus two?" and exs[0].response == "four."
    assert exs[2].prompt[0].role == "user" and exs[2].response == "hello, how are you?"
    assert exs[3].prompt_text == "count to three\n\nslowly" and exs[3].response == "one, two, three."
    assert exs[5].response == "good 42" and [m.role for m in exs[5].prompt] == ["system", "user", "assistant", "user"]
    write_jsonl(tmp_path / "d.jsonl", tiny.RECORDS)
    assert load_examples(tmp_path / "d.jsonl") == exs
    assert load_examples(tmp_path / "d.jsonl", limit=2) == exs[:2]


BAD = [
    ('{"instruction": "a", "response": "b"}\n{"instruction": "a", "response": }\n', 2, "not valid JSON"),
    ('{"instruction": "a", "response": "b"}\n\n{"instruction": "a", "reply": "b"}\n', 3, "found keys: instruction, reply"),
    ('["a", "b"]\n', 1, "not an object"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', 1, "no assistant turn"),
    ('{"instruction": "a", "response": 3}\n', 1, "'response' is a int, not a string"),
]


@pytest.mark.parametrize("text,line,what", BAD)
def test_a_bad_line_gets_one_message_naming_it(tmp_path: Path, text: str, line: int, what: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        load_examples(path)
    message = str(info.value)
    assert message.startswith(f"{path} line {line}: ") and what in message and "expected" in message


def test_cli_bad_line_exits_with_the_message(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = tiny.save_tiny_model(tmp_path / "model")
    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "a", "response": "b"}\n{"instruction": "a" "response": "b"}\n')
    capsys.readouterr()
    assert cli.main(["score-data", str(model), str(data), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"gradwatch score-data: {data} line 2: not valid JSON")
    assert not (tmp_path / "out").exists()  # nothing scored


def in_memory_dataset(rows: list[dict]):
    """``datasets.Dataset.from_list(rows)`` with a given fingerprint (from_list hashes with dill, which fails on
    some pyarrow versions; loading is what is tested here)."""
    import datasets
    import pyarrow as pa
    from datasets.table import InMemoryTable

    return datasets.Dataset(InMemoryTable(pa.Table.from_pylist(rows)), fingerprint=f"rows{len(rows)}")


def test_datasets_folder(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rows = [{"instruction": r["instruction"], "response": r["response"]} for r in tiny.RECORDS if "response" in r]
    in_memory_dataset(rows).save_to_disk(str(tmp_path / "ds"))
    exs = load_examples(tmp_path / "ds")
    assert [e.response for e in exs] == [r["response"] for r in rows]
    datasets.DatasetDict({"train": in_memory_dataset(rows), "bad": in_memory_dataset(
        [{"instruction": "x", "answer": None}])}).save_to_disk(str(tmp_path / "dd"))
    assert len(load_examples(tmp_path / "dd")) == len(rows)
    with pytest.raises(ValueError, match=r"dd row 0: "):
        load_examples(tmp_path / "dd", split="bad")


# --- groups, compare --------------------------------------------------------------------------------------------


def test_roles_of_gpt2_bert_and_llama_matrices() -> None:
    assert [matrix_role(t) for t in ("transformer.h.0.attn.c_attn.weight.q", "transformer.h.0.attn.c_attn.weight.v",
                                     "transformer.h.0.attn.c_proj.weight", "transformer.h.0.mlp.c_proj.weight",
                                     "encoder.layer.1.attention.self.key.weight", "encoder.layer.1.attention.output.dense.weight",
                                     "encoder.layer.1.intermediate.dense.weight", "encoder.layer.1.output.dense.weight",
                                     "model.layers.2.self_attn.o_proj.weight", "model.layers.2.mlp.gate_proj.weight",
                                     "pooler.dense.weight", "layers.1.self_attn.in_proj_weight.k",
                                     "layers.1.self_attn.out_proj.weight")] == [
        "q", "v", "o", "mlp", "k", "o", "mlp", "mlp", "o", "mlp", None, "k", "o"]
    groups = layer_groups(scored_matrices(tiny.gpt2()))
    assert groups["q"] == [0, 6, 12] and groups["mlp/late"] == [16, 17] and groups["all/early"] == [0, 1, 2, 3, 4, 5]


def fake_scoring(folder: Path, per_layer: list[float], dataset: str) -> Path:
    folder.mkdir()
    matrices = [{"tag": f"h.{i}.attn.q.weight", "role": "q", "block": i, "shape": [2, 2]} for i in range(3)]
    groups = {"all": [0, 1, 2], "q": [0, 1, 2], "q/early": [0], "q/late": [2]}
    stat_groups = {g: {"count": 1, "mean": sum(per_layer[j] for j in rows) / len(rows)} for g, rows in groups.items()}
    (folder / "run.json").write_text(json.dumps({"groups": groups, "matrices": matrices}))
    (folder / "summary.json").write_text(json.dumps({
        "kind": "gradwatch-score-data", "dataset": dataset, "scored": 1, "objective": "causal_lm",
        "matrices": [m["tag"] for m in matrices], "per_layer": {"nuclear_norm": per_layer},
        "groups": {"nuclear_norm": stat_groups}}))
    return folder


def test_rd_on_a_known_pair(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a = fake_scoring(tmp_path / "a", [1.0, 2.0, 4.0], "clean")
    b = fake_scoring(tmp_path / "b", [2.0, 2.0, 2.0], "noisy")
    assert cmp.relative_difference([1.0, 2.0, 4.0], [2.0, 2.0, 2.0]) == (0.5, 3)
    diffs = {d.group: d for d in cmp.compare_scorings(cmp.load_scoring(a), cmp.load_scoring(b))}
    assert diffs["all"].rd == pytest.approx(0.5) and diffs["q/early"].rd == pytest.approx(1.0)
    assert diffs["q/late"].rd == pytest.approx(0.5) and diffs["all"].change == pytest.approx(-1 / 7)
    assert cli.main(["compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "RD = mean over the group's matrices" in out
    row = next(line.split() for line in out.splitlines() if line.startswith("nuclear_norm") and line.split()[1] == "all")
    assert row[2:] == ["2.3333", "2", "-14.29%", "0.5", "3"]


def test_compare_refuses_different_models(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a = fake_scoring(tmp_path / "a", [1.0, 2.0, 4.0], "clean")
    b = fake_scoring(tmp_path / "b", [2.0, 2.0, 2.0], "noisy")
    summary = json.loads((b / "summary.json").read_text())
    summary["matrices"][0] = "other"
    (b / "summary.json").write_text(json.dumps(summary))
    assert cli.main(["compare", str(a), str(b)]) == 2
    assert "score different matrices" in capsys.readouterr().err


# --- the command end to end -------------------------------------------------------------------------------------


def test_cli_scores_and_compares(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = tiny.save_tiny_model(tmp_path / "model")
    clean = tmp_path / "clean.jsonl"
    write_jsonl(clean, tiny.RECORDS)
    noisy = tmp_path / "noisy.jsonl"
    write_jsonl(noisy, [{"instruction": r.get("instruction", "x"), "response": "zq xv " * 4} for r in tiny.RECORDS])
    for data, out in ((clean, "c"), (noisy, "n")):
        assert cli.main(["score-data", str(model), str(data), "-o", str(tmp_path / out), "--max-length",
                         str(MAX_LENGTH), "--no-progress", "--no-figures"]) == 0
    printed = capsys.readouterr().out
    assert "7 of 7 examples scored" in printed and "causal_lm loss, 18 matrices" in printed
    ranking = [json.loads(x) for x in (tmp_path / "c" / "ranking.jsonl").read_text().splitlines()]
    values = [r["value"] for r in ranking]
    assert [r["rank"] for r in ranking] == list(range(1, 8)) and values == sorted(values, reverse=True)
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert summary["scored"] == 7 and set(summary["groups"]["effective_rank"]) >= {"all", "q", "mlp", "o/late"}
    assert cli.main(["compare", str(tmp_path / "c"), str(tmp_path / "n")]) == 0
    table = capsys.readouterr().out
    assert "effective_rank  all" in table.replace("  ", "  ") or "effective_rank" in table


def test_progress_counter_without_tqdm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm -> ImportError
    score_dataset(tiny.gpt2(), tiny.tokenizer(), examples()[:3], tmp_path, ScoringOptions(max_length=MAX_LENGTH),
                  progress=True, figures=False)
    err = capsys.readouterr().err
    assert "gradwatch score-data: scored 0/3" in err and "gradwatch score-data: scored 3/3" in err


def test_parquet_and_page(tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    pytest.importorskip("matplotlib")
    score_dataset(tiny.gpt2(), tiny.tokenizer(), examples()[:3], tmp_path, ScoringOptions(max_length=MAX_LENGTH),
                  progress=False, figures=True)
    table = pq.read_table(tmp_path / "scores.parquet").to_pylist()
    assert [r["index"] for r in table] == [0, 1, 2] and "effective_rank/q/late" in table[0]
    assert (tmp_path / "index.html").is_file() and (tmp_path / "per_layer_effective_rank.png").is_file()


def test_memory_cap_and_untraceable_models_take_one_example_at_a_time(tmp_path: Path) -> None:
    from gradwatch.scoring.score import Scorer

    tok = tiny.tokenizer()
    assert Scorer(tiny.gpt2(), tok, ScoringOptions(max_length=MAX_LENGTH)).chunk > 8
    capped = score_dataset(tiny.gpt2(), tok, examples(), tmp_path / "capped",
                           ScoringOptions(max_length=MAX_LENGTH, max_memory_mb=0.01), progress=False, figures=False)
    assert capped.how == {"loop"}

    class Branchy(torch.nn.Module):  # data-dependent control flow: vmap cannot trace it
        def __init__(self) -> None:
            super().__init__()
            self.inner = tiny.gpt2()
            self.config = self.inner.config

        def forward(self, input_ids, attention_mask=None):
            if bool(input_ids.sum() >= 0):
                return self.inner(input_ids=input_ids, attention_mask=attention_mask)
            raise AssertionError

    with pytest.warns(UserWarning, match="vmap cannot trace this model"):
        branchy = score_dataset(Branchy(), tok, examples(), tmp_path / "branchy",
                                ScoringOptions(max_length=MAX_LENGTH, batch_size=3), progress=False, figures=False)
    assert branchy.how == {"loop"}
    a = read_scores(tmp_path / "capped" / "scores.jsonl")
    b = read_scores(tmp_path / "branchy" / "scores.jsonl")
    for x, y in zip(a, b):  # the same model inside: the same statistics
        assert x["groups"]["effective_rank"]["all"] == pytest.approx(y["groups"]["effective_rank"]["all"], rel=1e-6)


def test_a_long_prompt_is_cut_from_its_start_and_the_response_kept(tmp_path: Path) -> None:
    tok = tiny.tokenizer()
    long_prompt = parse_record({"instruction": "x" * 80, "response": "yes, indeed"}, 0, "line 1")
    enc = encode(tok, long_prompt, "causal_lm", MAX_LENGTH)
    assert enc["input_ids"].numel() == MAX_LENGTH and int((enc["labels"] != -100).sum()) == len("yes, indeed") + 1
    assert tok.decode(enc["input_ids"][-12:-1]) .replace(" ", "") == "yes,indeed"
    result = score_dataset(tiny.gpt2(), tok, [long_prompt, *examples()[1:3]], tmp_path,
                           ScoringOptions(max_length=MAX_LENGTH), progress=False, figures=False)
    assert result.summary["scored"] == 3 and not result.summary["failed"]


def test_cli_messages_for_a_model_path_and_options(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "d.jsonl"
    write_jsonl(data, tiny.RECORDS[:2])
    assert cli.main(["score-data", str(tmp_path / "nowhere"), str(data)]) == 2
    assert "not a local Hugging Face model folder (no config.json)" in capsys.readouterr().err
    assert cli.main(["score-data", str(tmp_path), str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl: no such file or folder" in capsys.readouterr().err
    model = tiny.save_tiny_model(tmp_path / "model")
    capsys.readouterr()
    assert cli.main(["score-data", str(model), str(data), "--rank-by", "effective_rank", "-o", str(tmp_path / "o")]) == 2
    assert "rank_by expected 'loss' or '<stat>/<group>'" in capsys.readouterr().err
    assert cli.main(["score-data", str(model), str(data), "--rank-by", "effective_rank/x", "-o", str(tmp_path / "o")]) == 2
    assert "no layer group 'x' in this model; its groups are ['all', 'q'," in capsys.readouterr().err
    out = tmp_path / "resumed"
    args = ["score-data", str(model), str(data), "-o", str(out), "--no-progress", "--no-figures", "--max-length", "32"]
    assert cli.main(args) == 0 and cli.main(args) == 0
    assert "2 of 2 examples scored (2 from before, 0 now" in capsys.readouterr().out
    assert cli.main([*args[:-1], "40"]) == 2
    err = capsys.readouterr().err
    assert "holds a scoring with other settings (" in err and "options.max_length differ" in err


def test_loss_is_on_the_response_tokens_only_with_and_without_a_chat_template() -> None:
    tok = tiny.tokenizer()
    ex = examples()[5]  # a conversation: system, user, assistant, user, then the scored assistant turn
    response = tok(ex.response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    for template in (None, "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                           "{% if add_generation_prompt %}assistant: {% endif %}"):
        tok.chat_template = template
        enc = encode(tok, ex, "causal_lm", 200)
        labels, ids = enc["labels"].tolist(), enc["input_ids"].tolist()
        start = len(ids) - len(response)
        assert ids[start:] == response and labels[start:] == response and set(labels[:start]) == {-100}
        prompt = tok.decode(ids[:start]).replace(" ", "")
        if template is None:
            assert prompt == "###Instruction:\nsystem:bebrief\n\nuser:why?\n\nassistant:because.\n\nuser:ok\n\n###Response:\n"
        else:
            assert prompt == "system:bebrief\nuser:why?\nassistant:because.\nuser:ok\nassistant:".replace(" ", "")
