"""Attention-logit statistics against a dense float64 reference built from what the SDPA kernel received."""

from __future__ import annotations

import math

import pytest
import torch
from _stability_sites import armed, captured_sdpa, reference_statistics
from torch import nn

from gradwatch.functional.attention import (
    MASKED_BELOW,
    attention_logit_statistics,
    multihead_attention_qk,
    sampled_positions,
)
from gradwatch.metrics.stability import AttentionLogits, find_attention_modules

RTOL = 1e-4


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got.to(torch.float64), want.to(torch.float64), rtol=RTOL, atol=0.0)


def _call(q, k, mask=None, is_causal=False, scale=None, gqa=False):
    return {"query": q, "key": k, "attn_mask": mask, "is_causal": is_causal, "scale": scale, "enable_gqa": gqa}


# ---- the function on its own --------------------------------------------------------------------


def _qk(b=2, hq=4, hk=4, length=9, s=9, e=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, length, e, generator=g, dtype=dtype) * 2,
            torch.randn(b, hk, s, e, generator=g, dtype=dtype) * 2)


@pytest.mark.parametrize("case", ["plain", "bool", "float_min", "float_inf_bias", "causal", "gqa_causal",
                                  "scale", "cross", "old_bert_mask"])
def test_matches_reference(case: str) -> None:
    q, k = _qk()
    g = torch.Generator().manual_seed(1)
    call = _call(q, k)
    if case == "bool":
        m = torch.rand(2, 1, 9, 9, generator=g) > 0.3
        m[1, 0, 4] = False  # a query row that attends nothing is left out
        call["attn_mask"] = m
    elif case == "float_min":
        keep = torch.rand(2, 1, 1, 9, generator=g) > 0.3
        call["attn_mask"] = torch.zeros(2, 1, 1, 9).masked_fill(~keep, torch.finfo(torch.float32).min)
    elif case == "float_inf_bias":  # an additive bias (ALiBi-like) plus -inf masking, per head
        bias = -0.3 * torch.rand(1, 4, 9, 9, generator=g)
        call["attn_mask"] = bias.masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), -math.inf)
    elif case == "causal":
        call["is_causal"] = True
    elif case == "gqa_causal":
        q, k = _qk(hq=6, hk=2)
        call = _call(q, k, is_causal=True, gqa=True)
    elif case == "scale":
        call["scale"] = 0.05
    elif case == "cross":
        q, k = _qk(length=5, s=11)
        call = _call(q, k, mask=torch.rand(11, generator=g) > 0.2)
    elif case == "old_bert_mask":  # BERT's historical (1 - mask) * -10000: -1e4 counts as masked
        keep = torch.rand(2, 1, 1, 9, generator=g) > 0.3
        call["attn_mask"] = (1.0 - keep.float()) * -10000.0
        assert MASKED_BELOW == -1e4
    stats = attention_logit_statistics(call["query"], call["key"], call["attn_mask"], call["is_causal"],
                                       call["scale"], call["enable_gqa"])
    ref_max, ref_ent = reference_statistics(
        {**call, "attn_mask": (call["attn_mask"] > -1e4) if case == "old_bert_mask" else call["attn_mask"]})
    assert stats.exact
    _close(stats.max_logit, ref_max)
    _close(stats.entropy, ref_ent)


def test_causal_entropy_by_hand() -> None:
    """Identical keys: query i attends i + 1 keys uniformly, entropy ln(i + 1); max logit q.k * scale."""
    q = torch.ones(1, 1, 4, 2)
    k = torch.ones(1, 1, 4, 2)
    stats = attention_logit_statistics(q, k, is_causal=True)
    assert stats.max_logit.item() == pytest.approx(2 / math.sqrt(2))
    assert stats.entropy.item() == pytest.approx(sum(math.log(i + 1) for i in range(4)) / 4)


def test_lower_dims_and_broadcast_batch() -> None:
    q, k = _qk(b=1)
    ref_max, ref_ent = reference_statistics(_call(q, k))
    stats = attention_logit_statistics(q[0], k[0])  # (H, L, E)
    _close(stats.max_logit, ref_max)
    _close(stats.entropy, ref_ent)
    q5 = torch.randn(2, 3, 4, 6, 8)  # two batch dims
    k5 = torch.randn(2, 3, 4, 6, 8)
    m5 = torch.rand(3, 1, 6, 6) > 0.4
    ref_max, ref_ent = reference_statistics(_call(q5, k5, m5))
    stats = attention_logit_statistics(q5, k5, m5)
    _close(stats.max_logit, ref_max)
    _close(stats.entropy, ref_ent)


def test_chunking_and_precision() -> None:
    q, k = _qk(length=33, s=33)
    whole = attention_logit_statistics(q, k, is_causal=True)
    chunked = attention_logit_statistics(q, k, is_causal=True, chunk_elements=50)
    _close(chunked.max_logit, whole.max_logit)
    _close(chunked.entropy, whole.entropy)
    single = attention_logit_statistics(q, k, is_causal=True, dtype=torch.float32)
    assert single.max_logit.dtype == torch.float32
    torch.testing.assert_close(single.entropy.double(), whole.entropy, rtol=1e-5, atol=0.0)
    bf = attention_logit_statistics(q.bfloat16(), k.bfloat16(), is_causal=True)
    ref_max, _ = reference_statistics(_call(q.bfloat16(), k.bfloat16(), is_causal=True))
    _close(bf.max_logit, ref_max)  # exact from the kernel's own bf16 inputs


@pytest.mark.parametrize("chunk", [1 << 22, 4 * 9 * 9 * 2, 4 * 9 * 9, 4 * 9 * 3])  # all; 2, 1 rows; 3 queries
def test_batch_and_query_chunks_with_per_example_masks(chunk: int) -> None:
    q, k = _qk(b=5)
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(5, 1, 9, 9, generator=g) > 0.3
    mask[2, 0, 4] = False  # a row that attends nothing, in one example only
    stats = attention_logit_statistics(q, k, mask, chunk_elements=chunk)
    ref_max, ref_ent = reference_statistics(_call(q, k, mask))
    _close(stats.max_logit, ref_max)
    _close(stats.entropy, ref_ent)
    assert stats.rows.tolist() == [5 * 9 - 1] * 4


def test_long_sequences_are_sampled_deterministically() -> None:
    pos = sampled_positions(1000, 7)
    assert pos.tolist() == [0, 167, 333, 500, 666, 833, 999]  # 999 i / 6, halves up
    assert torch.equal(sampled_positions(5, 7), torch.arange(5))
    q, k = _qk(length=40, s=40)
    stats = attention_logit_statistics(q, k, is_causal=True, max_exact_len=8)
    assert not stats.exact
    assert stats.rows.tolist() == [2 * 8] * 4  # 8 sampled queries x 2 batch elements per head
    picked = sampled_positions(40, 8)
    s = torch.einsum("bhld,bhsd->bhls", q.double(), k.double()) / math.sqrt(8)
    keep = torch.ones(40, 40, dtype=torch.bool).tril()[picked]
    s = s[:, :, picked].masked_fill(~keep, -math.inf)
    _close(stats.max_logit, s.amax(dim=(0, 2, 3)))
    a = torch.softmax(s, -1)
    ent = -torch.where(a > 0, a * a.log(), torch.zeros_like(a)).sum(-1).mean(dim=(0, 2))
    _close(stats.entropy, ent)


def test_heads_must_group() -> None:
    q, k = _qk(hq=4, hk=3)
    with pytest.raises(ValueError, match="cannot share"):
        attention_logit_statistics(q, k)


# ---- through real attention modules -------------------------------------------------------------


def _through_sites(model: nn.Module, run) -> tuple[AttentionLogits, list[dict], list[str]]:
    found = find_attention_modules(model)
    diag = AttentionLogits([n for n, _ in found], [k for _, k in found])
    calls: list[dict] = []
    with captured_sdpa(calls), armed(diag.activation_sites(model)):
        run()
    return diag, calls, [n for n, _ in found]


def _check_per_call(diag: AttentionLogits, calls: list[dict]) -> None:
    assert len(calls) == len(diag.names) and set(diag._pending) == set(range(len(calls)))
    for i, call in enumerate(calls):  # each module makes one SDPA call, in order
        ref_max, ref_ent = reference_statistics(call)
        got_max, ent_sum, rows = diag._pending[i]
        _close(got_max, ref_max)
        _close(ent_sum / rows, ref_ent)


def _ids(b=3, t=10, vocab=50, seed=0):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def _padding(b=3, t=10):
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    return mask


@pytest.mark.parametrize("padded", [False, True])
def test_llama_rotary_gqa(padded: bool) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))
    kwargs = {"attention_mask": _padding()} if padded else {}
    diag, calls, names = _through_sites(model, lambda: model(input_ids=_ids(), **kwargs))
    assert names == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    _check_per_call(diag, calls)
    if not padded:  # grouped keys reach the kernel as 2 heads for 4 query heads
        assert calls[0]["key"].shape[1] == 2 and calls[0]["query"].shape[1] == 4
        assert calls[0]["enable_gqa"] and calls[0]["is_causal"]
    # rotary: the kernel's q is not the q_proj output
    q_proj = model.model.layers[0].self_attn.q_proj
    seen = []
    h = q_proj.register_forward_hook(lambda m, a, o: seen.append(o.detach()))
    _through_sites(model, lambda: model(input_ids=_ids(), **kwargs))
    h.remove()
    raw = seen[0].view(3, 10, 4, 8).transpose(1, 2)
    assert not torch.allclose(raw[:, :, 1:], calls[0]["query"][:, :, 1:])


def test_gpt2_fused_c_attn() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=32))
    diag, calls, names = _through_sites(model, lambda: model(input_ids=_ids(), attention_mask=_padding()))
    assert names == ["transformer.h.0.attn", "transformer.h.1.attn"]
    _check_per_call(diag, calls)


def test_bert_with_padding() -> None:
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=64, max_position_embeddings=32))
    diag, calls, names = _through_sites(model, lambda: model(input_ids=_ids(), attention_mask=_padding()))
    assert names == ["bert.encoder.layer.0.attention.self", "bert.encoder.layer.1.attention.self"]
    assert calls[0]["attn_mask"] is not None  # the padding reached the kernel
    _check_per_call(diag, calls)


def test_nn_transformer_masks() -> None:
    torch.manual_seed(0)
    model = nn.Transformer(d_model=16, nhead=4, num_encoder_layers=2, num_decoder_layers=1, dim_feedforward=32,
                           dropout=0.0, batch_first=True)
    src, tgt = torch.randn(2, 7, 16), torch.randn(2, 5, 16)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 5:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    diag, calls, names = _through_sites(model, lambda: model(src, tgt, src_key_padding_mask=pad, tgt_mask=causal,
                                                             tgt_is_causal=True, memory_key_padding_mask=pad))
    assert len(names) == 4
    _check_per_call(diag, calls)


def test_transformer_encoder_layer_float_mask() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0)  # sequence first
    x = torch.randn(6, 3, 16)
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    pad = torch.zeros(3, 6)
    pad[0, 4:] = -math.inf
    diag, calls, _ = _through_sites(layer, lambda: layer(x, src_mask=causal, src_key_padding_mask=pad))
    _check_per_call(diag, calls)


@pytest.mark.parametrize("variant", ["packed", "kdim", "bias_kv_zero_attn", "batch_first_float"])
def test_multihead_attention_need_weights(variant: str) -> None:
    """need_weights=True never reaches SDPA: q and k are rebuilt from the weights. The reference comes from
    the kernel's inputs of the same call with need_weights=False, and from the returned weights."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    kw = {"kdim": 12, "vdim": 12} if variant == "kdim" else {}
    if variant == "bias_kv_zero_attn":
        kw = {"add_bias_kv": True, "add_zero_attn": True}
    batch_first = variant == "batch_first_float"
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first, **kw)
    kdim = 12 if variant == "kdim" else 16
    q = torch.randn(6, 2, 16, generator=g)
    kv = torch.randn(8, 2, kdim, generator=g)
    if batch_first:
        q, kv = q.transpose(0, 1), kv.transpose(0, 1)
    if variant == "batch_first_float":
        attn_mask = torch.randn(6, 8, generator=g).clamp_max(0.5)
        attn_mask[0, 1:] = -math.inf
        pad = torch.zeros(2, 8)
        pad[1, 6:] = -math.inf
    else:
        attn_mask = torch.rand(6, 8, generator=g) > 0.8  # True = not attended (module convention)
        attn_mask[:, 0] = False
        pad = torch.zeros(2, 8, dtype=torch.bool)
        pad[0, 5:] = True
    holder = nn.ModuleDict({"mha": mha})
    diag = AttentionLogits(["mha"], ["mha"])
    calls: list[dict] = []
    with captured_sdpa(calls), armed(diag.activation_sites(holder)):
        _, weights = mha(q, kv, kv, key_padding_mask=pad, attn_mask=attn_mask, need_weights=True,
                         average_attn_weights=False)
    assert calls == []  # no SDPA: the fallback measured it
    got_max, ent_sum, rows = diag._pending[0]
    with captured_sdpa(calls):
        mha(q, kv, kv, key_padding_mask=pad, attn_mask=attn_mask, need_weights=False)
    ref_max, ref_ent = reference_statistics(calls[0])
    _close(got_max, ref_max)
    _close(ent_sum / rows, ref_ent)
    w = weights.double()
    _close(ent_sum / rows, -torch.where(w > 0, w * w.log(), torch.zeros_like(w)).sum(-1).mean(dim=(0, 2)))


def test_multihead_attention_qk_unbatched() -> None:
    mha = nn.MultiheadAttention(8, 2)
    x = torch.randn(5, 8)
    inputs = multihead_attention_qk(mha, x, x)
    assert inputs.query.shape == (1, 2, 5, 4) and inputs.attn_mask is None
    assert inputs.scale == pytest.approx(0.5)
