"""Layer discovery on tiny models built from configs: what is watched, how each gradient reads as a matrix."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from gradwatch.engine.layers import (
    discover_matrices,
    gradient_matrices,
    gradient_shards,
    layer_family,
    layer_index,
    unwrap_model,
)

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")
logging.getLogger("transformers").setLevel(logging.ERROR)

LLAMA_KW = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=100)
GPT2_KW = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0)
BERT_KW = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100)


def llama() -> nn.Module:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_KW))


def gpt2(**kw) -> nn.Module:
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**GPT2_KW, **kw}))


def bert() -> nn.Module:
    torch.manual_seed(0)
    return transformers.BertForMaskedLM(transformers.BertConfig(**BERT_KW))


def torch_transformer() -> nn.Module:
    torch.manual_seed(0)
    return nn.Transformer(d_model=16, nhead=2, num_encoder_layers=2, num_decoder_layers=1, dim_feedforward=32,
                          dropout=0.0)


def tags(discovery) -> list[str]:
    return [w.tag for w in discovery.matrices]


def lm_backward(model: nn.Module) -> None:
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()


# ---- names and families ----------------------------------------------------------------------------------


def test_layer_family_and_index() -> None:
    assert layer_family("model.layers.1.self_attn.q_proj.weight") == "model.layers.*.self_attn.q_proj.weight"
    assert layer_family("transformer.h.11.attn.c_attn.weight.q") == "transformer.h.*.attn.c_attn.weight.q"
    assert layer_family("0.weight") == "*.weight"
    assert layer_family("blocks.2.experts.10.w1.weight") == "blocks.*.experts.*.w1.weight"
    assert layer_family("lm_head.weight") == "lm_head.weight"
    assert layer_family("layer2.conv1.weight") == "layer2.conv1.weight"  # a digit inside a word is no index
    assert layer_index("blocks.2.experts.10.w1.weight") == (2, 10)
    assert layer_index("lm_head.weight") == ()


# ---- Llama ------------------------------------------------------------------------------------------------


def test_llama_default() -> None:
    model = llama()
    d = discover_matrices(model)
    expected = [f"model.layers.{i}.{p}.weight" for i in range(2)
                for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert tags(d) == expected
    assert set(d.params) == set(expected)
    assert d.frozen == ()
    shapes = {w.tag: tuple(w.matrix(d.params[w.param_name].detach()).shape) for w in d.matrices}
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (32, 32)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (16, 32)  # 2 kv heads of 8
    assert shapes["model.layers.1.mlp.down_proj.weight"] == (32, 64)
    assert {w.family for w in d.matrices} == {layer_family(t) for t in expected}
    assert all(w.kind == "linear" and w.block is None and not w.transpose for w in d.matrices)


def test_llama_embeddings_and_head_opt_in() -> None:
    model = llama()
    assert model.lm_head.weight is not model.model.embed_tokens.weight  # Llama's head is untied
    d = discover_matrices(model, embeddings=True)
    assert "model.embed_tokens.weight" in tags(d) and "lm_head.weight" not in tags(d)
    assert next(w for w in d.matrices if w.tag == "model.embed_tokens.weight").kind == "embedding"
    d = discover_matrices(model, output_head=True)
    assert "lm_head.weight" in tags(d) and "model.embed_tokens.weight" not in tags(d)
    d = discover_matrices(model, embeddings=True, output_head=True)
    assert len(d.matrices) == 16


# ---- GPT-2 -----------------------------------------------------------------------------------------------


def test_gpt2_default_split_and_transpose() -> None:
    model = gpt2()
    d = discover_matrices(model)
    expected = []
    for i in range(2):
        expected += [f"transformer.h.{i}.attn.c_attn.weight.{s}" for s in "qkv"]
        expected += [f"transformer.h.{i}.attn.c_proj.weight", f"transformer.h.{i}.mlp.c_fc.weight",
                     f"transformer.h.{i}.mlp.c_proj.weight"]
    assert tags(d) == expected
    # wte and the tied lm_head are not watched by default
    assert model.lm_head.weight is model.transformer.wte.weight
    assert not any("wte" in t or "lm_head" in t or "wpe" in t for t in tags(d))
    q = d.matrices[0]
    assert (q.param_name, q.kind, q.block, q.transpose) == ("transformer.h.0.attn.c_attn.weight", "fused_qkv",
                                                              (0, 3), True)
    assert q.family == "transformer.h.*.attn.c_attn.weight.q"


def test_gpt2_matrices_after_backward() -> None:
    model = gpt2()
    d = discover_matrices(model)
    lm_backward(model)
    mats, idx = gradient_matrices(d)
    assert idx == list(range(len(d.matrices)))
    by_tag = {d.matrices[i].tag: m for i, m in zip(idx, mats)}
    g_attn = model.transformer.h[1].attn.c_attn.weight.grad  # (in, out) = (32, 96)
    assert g_attn.shape == (32, 96)
    for j, s in enumerate("qkv"):
        m = by_tag[f"transformer.h.1.attn.c_attn.weight.{s}"]
        assert m.shape == (32, 32)
        assert torch.equal(m, g_attn.t()[32 * j:32 * (j + 1)])
        assert torch.equal(m, g_attn[:, 32 * j:32 * (j + 1)].t())
        assert m.data_ptr() == g_attn[:, 32 * j:].data_ptr()  # a view, no copy
    g_fc = model.transformer.h[0].mlp.c_fc.weight.grad  # (32, 128)
    assert torch.equal(by_tag["transformer.h.0.mlp.c_fc.weight"], g_fc.t())
    assert by_tag["transformer.h.0.mlp.c_fc.weight"].shape == (128, 32)  # (out, in)
    g_proj = model.transformer.h[0].mlp.c_proj.weight.grad  # (128, 32)
    assert by_tag["transformer.h.0.mlp.c_proj.weight"].shape == (32, 128)
    assert torch.equal(by_tag["transformer.h.0.mlp.c_proj.weight"], g_proj.t())
    assert torch.equal(by_tag["transformer.h.0.attn.c_proj.weight"], model.transformer.h[0].attn.c_proj.weight.grad.t())


def test_gradient_shards_of_plain_gradients_are_the_watched_blocks_of_the_stored_ones() -> None:
    # one process (or DDP): every "shard" is the whole stored gradient; its watched block, in the stored
    # orientation, is the watched (out, in) matrix or its transpose (GPT-2's Conv1D), views without a copy
    model = gpt2()
    d = discover_matrices(model)
    lm_backward(model)
    mats, _ = gradient_matrices(d)
    shards = gradient_shards(d, world_size=1)
    assert len(shards) == len(d.matrices) == len(mats)
    for w, m, s in zip(d.matrices, mats, shards):
        grad = d.params[w.param_name].grad
        assert not s.sharded and s.stored_rows == grad.shape[0] and s.shape == tuple(grad.shape)
        block = s.stored[s.rows[0]:s.rows[1], s.cols[0]:s.cols[1]]
        assert torch.equal(block.t() if w.transpose else block, m), w.tag
        assert block.data_ptr() == m.data_ptr()


def test_gpt2_tied_head_opt_in() -> None:
    model = gpt2()
    d = discover_matrices(model, output_head=True)
    assert "lm_head.weight" in tags(d)
    d = discover_matrices(model, embeddings=True, output_head=True)
    # the tied table is watched once, under its first name
    assert "transformer.wte.weight" in tags(d) and "lm_head.weight" not in tags(d)
    assert "transformer.wpe.weight" in tags(d)


def test_gpt2_cross_attention_fused_kv() -> None:
    """Cross-attention's c_attn is (E, 2E) = [k | v]; it must not be cut into three."""
    model = gpt2(n_embd=48, n_layer=1, add_cross_attention=True)
    d = discover_matrices(model)
    blocks = [w for w in d.matrices if w.param_name == "transformer.h.0.crossattention.c_attn.weight"]
    assert [w.tag for w in blocks] == ["transformer.h.0.crossattention.c_attn.weight.k",
                                       "transformer.h.0.crossattention.c_attn.weight.v"]
    g = torch.randn(48, 96)
    assert torch.equal(blocks[0].matrix(g), g[:, :48].t())
    assert torch.equal(blocks[1].matrix(g), g[:, 48:].t())
    assert "transformer.h.0.crossattention.q_attn.weight" in tags(d)
    assert [w.tag for w in d.matrices if w.param_name == "transformer.h.0.attn.c_attn.weight"] == [
        f"transformer.h.0.attn.c_attn.weight.{s}" for s in "qkv"]


# ---- BERT ------------------------------------------------------------------------------------------------


def test_bert() -> None:
    model = bert()
    d = discover_matrices(model)
    found = tags(d)
    for i in range(2):
        for p in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                  "intermediate.dense", "output.dense"):
            assert f"bert.encoder.layer.{i}.{p}.weight" in found
    assert not any("embeddings" in t for t in found)
    assert "cls.predictions.decoder.weight" not in found  # tied to word_embeddings: an output head
    assert layer_family("bert.encoder.layer.1.attention.self.query.weight") in {w.family for w in d.matrices}
    d = discover_matrices(model, embeddings=True)
    assert {"bert.embeddings.word_embeddings.weight", "bert.embeddings.position_embeddings.weight",
            "bert.embeddings.token_type_embeddings.weight"} <= set(tags(d))


# ---- nn.Transformer --------------------------------------------------------------------------------------


def test_torch_transformer() -> None:
    model = torch_transformer()
    d = discover_matrices(model)
    expected = []
    for i in range(2):
        p = f"encoder.layers.{i}"
        expected += [f"{p}.self_attn.in_proj_weight.{s}" for s in "qkv"]
        expected += [f"{p}.self_attn.out_proj.weight", f"{p}.linear1.weight", f"{p}.linear2.weight"]
    p = "decoder.layers.0"
    expected += [f"{p}.self_attn.in_proj_weight.{s}" for s in "qkv"] + [f"{p}.self_attn.out_proj.weight"]
    expected += [f"{p}.multihead_attn.in_proj_weight.{s}" for s in "qkv"] + [f"{p}.multihead_attn.out_proj.weight"]
    expected += [f"{p}.linear1.weight", f"{p}.linear2.weight"]
    assert tags(d) == expected
    w_k = next(w for w in d.matrices if w.tag == "encoder.layers.1.self_attn.in_proj_weight.k")
    assert (w_k.kind, w_k.block, w_k.transpose) == ("mha_in_proj", (1, 3), False)

    src = torch.randn(5, 2, 16, generator=torch.Generator().manual_seed(0))
    tgt = torch.randn(4, 2, 16, generator=torch.Generator().manual_seed(1))
    model(src, tgt).square().mean().backward()
    mats, idx = gradient_matrices(d)
    by_tag = {d.matrices[i].tag: m for i, m in zip(idx, mats)}
    g = model.encoder.layers[1].self_attn.in_proj_weight.grad  # (48, 16)
    for j, s in enumerate("qkv"):
        m = by_tag[f"encoder.layers.1.self_attn.in_proj_weight.{s}"]
        assert m.shape == (16, 16)
        assert torch.equal(m, g[16 * j:16 * (j + 1)])
    assert by_tag["encoder.layers.0.linear1.weight"].shape == (32, 16)
    assert by_tag["encoder.layers.0.linear2.weight"].shape == (16, 32)


def test_mha_separate_projections_and_conv() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, kdim=6, vdim=4)
            self.conv = nn.Conv2d(3, 5, 3)
            self.blocks = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))

    d = discover_matrices(Net())
    assert tags(d) == ["attn.q_proj_weight", "attn.k_proj_weight", "attn.v_proj_weight", "attn.out_proj.weight",
                       "conv.weight", "blocks.0.weight", "blocks.2.weight"]
    conv = next(w for w in d.matrices if w.tag == "conv.weight")
    assert conv.kind == "conv"
    assert conv.matrix(torch.zeros(5, 3, 3, 3)).shape == (5, 27)
    k = next(w for w in d.matrices if w.tag == "attn.k_proj_weight")
    assert k.matrix(torch.zeros(8, 6)).shape == (8, 6)
    assert next(w for w in d.matrices if w.tag == "blocks.0.weight").family == "blocks.*.weight"


# ---- frozen, include/exclude -----------------------------------------------------------------------------


def test_frozen_params_listed_not_watched() -> None:
    model = llama()
    for p in model.model.layers[0].parameters():
        p.requires_grad_(False)
    d = discover_matrices(model)
    assert d.frozen == tuple(f"model.layers.0.{p}.weight" for p in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
    assert all(t.startswith("model.layers.1.") for t in tags(d))
    assert len(d.matrices) == 7
    assert not any(n.startswith("model.layers.0.") for n in d.params)


def test_include_exclude_globs() -> None:
    model = llama()
    d = discover_matrices(model, include=["*.self_attn.*"])
    assert tags(d) == [f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(2) for p in "qkvo"]
    d = discover_matrices(model, include=["*.self_attn.*"], exclude=["*.layers.1.*", "*.o_proj.weight"])
    assert tags(d) == [f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"]
    d = discover_matrices(model, exclude=["*mlp*"])
    assert len(d.matrices) == 8
    # a norm weight matches the include pattern but is no matrix: nothing is watched, nothing raises
    assert discover_matrices(model, include=["model.norm.weight"]).matrices == ()


def test_include_exclude_split_tags() -> None:
    model = gpt2()
    d = discover_matrices(model, include=["*.c_attn.weight.q"])
    assert tags(d) == ["transformer.h.0.attn.c_attn.weight.q", "transformer.h.1.attn.c_attn.weight.q"]
    d = discover_matrices(model, include=["*.c_attn.weight"], exclude=["*.weight.k"])
    assert tags(d) == [f"transformer.h.{i}.attn.c_attn.weight.{s}" for i in range(2) for s in "qv"]
    assert set(d.params) == {f"transformer.h.{i}.attn.c_attn.weight" for i in range(2)}


@pytest.mark.parametrize("field", ["include", "exclude"])
def test_pattern_matching_nothing_raises(field: str) -> None:
    model = llama()
    with pytest.raises(ValueError, match=rf"`{field}` pattern '\*\.q_projj\.weight' matches no parameter of "
                                         r"LlamaForCausalLM; parameter names look like: model\.embed_tokens\.weight"):
        discover_matrices(model, **{field: ["*.q_projj.weight"]})


# ---- reading gradients -----------------------------------------------------------------------------------


def test_gradient_matrices_never_writes_grad() -> None:
    model = llama()
    d = discover_matrices(model)
    assert gradient_matrices(d) == ([], [])  # no backward yet: nothing to read
    lm_backward(model)
    before = {n: (p.grad.clone(), p.grad.data_ptr()) for n, p in model.named_parameters()}
    mats, idx = gradient_matrices(d)
    scaled, idx2 = gradient_matrices(d, scale=0.5)
    mats2, _ = gradient_matrices(d)
    for n, p in model.named_parameters():
        g, ptr = before[n]
        assert p.grad.data_ptr() == ptr
        assert torch.equal(p.grad, g), n
    assert idx == idx2 == list(range(14))
    for w, m, s, m2 in zip(d.matrices, mats, scaled, mats2):
        grad = d.params[w.param_name].grad
        assert m.shape == grad.shape and torch.equal(m, grad)
        assert m.data_ptr() == grad.data_ptr()  # views
        assert not m.requires_grad
        assert torch.equal(s, 0.5 * grad)
        assert torch.equal(m2, m)


def test_gradient_matrices_skips_missing_grads() -> None:
    model = torch_transformer()
    d = discover_matrices(model)
    model.encoder.layers[0].linear1.weight.grad = torch.ones(32, 16)
    model.decoder.layers[0].self_attn.in_proj_weight.grad = torch.arange(48 * 16.0).reshape(48, 16)
    mats, idx = gradient_matrices(d)
    assert [d.matrices[i].tag for i in idx] == ["encoder.layers.0.linear1.weight"] + [
        f"decoder.layers.0.self_attn.in_proj_weight.{s}" for s in "qkv"]
    assert torch.equal(mats[3], torch.arange(32 * 16.0, 48 * 16.0).reshape(16, 16))


def test_sparse_embedding_gradient_read_densely() -> None:
    """``nn.Embedding(sparse=True)`` gives a sparse COO gradient (repeated ids as separate entries); with
    embeddings opted in it is read as the dense matrix, duplicates summed, and its spectrum is that of
    the dense gradient."""
    from gradwatch.functional.spectra import gradient_spectrum_statistics

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 3))
    model(torch.tensor([1, 3, 3, 7])).square().sum().backward()
    assert model[0].weight.grad.is_sparse
    d = discover_matrices(model, embeddings=True)
    mats, idx = gradient_matrices(d)
    tags = [d.matrices[i].tag for i in idx]
    emb = mats[tags.index("0.weight")]
    assert not emb.is_sparse
    assert torch.equal(emb, model[0].weight.grad.to_dense())
    assert torch.count_nonzero(emb.abs().sum(1)).item() == 3  # rows 1, 3 (twice, summed) and 7
    values, bad = gradient_spectrum_statistics(mats)
    assert not bad.any()
    dense_ref = torch.linalg.svdvals(emb.double())
    assert values["nuclear_norm"][tags.index("0.weight")].item() == pytest.approx(dense_ref.sum().item(), rel=1e-6)


def test_unwrap_model() -> None:
    inner = nn.Linear(2, 2)

    class Wrapper(nn.Module):
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

    assert unwrap_model(Wrapper(Wrapper(inner))) is inner
    assert unwrap_model(inner) is inner
