"""Attention-logit statistics from the query and key an attention kernel receives.

For one attention call with queries q_i and keys k_j (per batch element and head) the logits are
z_ij = scale * q_i . k_j (``scale`` defaults to 1/sqrt(d_head), as in
``torch.nn.functional.scaled_dot_product_attention``) and the attention weights are
A_ij = softmax_j(z_ij + m_ij), with m the mask (0 where attended, -inf where not, or the additive float
mask as given). :func:`attention_logit_statistics` returns, per query head,

- ``max_logit``  = max over batch, queries and *attended* pairs (i, j) of z_ij (the additive mask not
  included: the quantity Wortsman et al. 2023, "Small-scale proxies for large-scale Transformer training
  instabilities", track; every run of theirs whose max attention logit passed ~1e4 diverged);
- ``entropy``    = mean over batch and queries of -sum_j A_ij ln A_ij (Zhai et al. 2023, "Stabilizing
  Transformer training by preventing attention entropy collapse").

Masks follow torch's SDPA semantics: a bool ``attn_mask`` is True where a query may attend; a float one is
added to the logits before the softmax, and an entry <= :data:`MASKED_BELOW` (-1e4: BERT's historical
-10000, ``finfo.min`` and -inf all qualify) counts as "not attended"; ``is_causal`` keeps key j <= query i
(top-left aligned, like torch). Query rows with no attended key (fully padded) are left out of both
statistics. Grouped-query attention (``enable_gqa``, or fewer key heads than query heads) repeats each
key head over its group of query heads, as the kernel does.

Exact over every query position up to ``max_exact_len`` (default 1024) positions; beyond it a deterministic
sample of ``max_exact_len`` query positions evenly spaced from the first to the last (always including
both) is used, each against all of its keys. The logits are formed in ``dtype`` (float64 by default) in
chunks of query positions bounded by ``chunk_elements`` logits at a time, so the T x T matrix is never
held whole.

:func:`multihead_attention_qk` rebuilds the kernel's q, k and mask for ``nn.MultiheadAttention`` from its
weights and inputs, for the calls that never reach SDPA (``need_weights=True``, the fused fast path).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

#: An additive mask entry at or below this counts as "masked" (not attended).
MASKED_BELOW: float = -1e4
#: Default number of query positions measured exactly; longer sequences are sampled.
MAX_EXACT_LEN: int = 1024


@dataclass(frozen=True)
class AttentionStatistics:
    """Per-head statistics of one attention call.

    Attributes:
        max_logit: (H,) max over batch, queries and attended keys of scale * q.k (-inf for a head that
            attended nothing).
        entropy_sum: (H,) sum over the measured (batch, query) rows of the row's attention entropy (nats).
        rows: (H,) number of measured rows with at least one attended key.
        exact: False when query positions were sampled (sequence longer than ``max_exact_len``).
    """

    max_logit: Tensor
    entropy_sum: Tensor
    rows: Tensor
    exact: bool

    @property
    def entropy(self) -> Tensor:
        """(H,) mean entropy per head (NaN for a head with no measured row)."""
        return self.entropy_sum / self.rows


def sampled_positions(length: int, max_exact_len: int = MAX_EXACT_LEN, device: torch.device | None = None) -> Tensor:
    """Query positions measured for a sequence of ``length``: all of them up to ``max_exact_len``, else
    ``max_exact_len`` positions evenly spaced over [0, length - 1]: round(i (length - 1) / (max_exact_len - 1)),
    halves rounded up, i = 0 .. max_exact_len - 1 (first and last included)."""
    if length <= max_exact_len:
        return torch.arange(length, device=device)
    if max_exact_len == 1:
        return torch.tensor([length - 1], device=device)
    i = torch.arange(max_exact_len, dtype=torch.int64)
    pos = (2 * i * (length - 1) + (max_exact_len - 1)) // (2 * (max_exact_len - 1))  # i (L-1)/(n-1), half up
    return pos.to(device)


def _as_bhle(x: Tensor) -> Tensor:
    """(..., H, L, E) -> (B, H, L, E), with missing leading dims added as 1."""
    if x.dim() == 2:
        return x[None, None]
    if x.dim() == 3:
        return x[None]
    return x.reshape(-1, *x.shape[-3:])


def attention_logit_statistics(query: Tensor, key: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False,
                               scale: float | None = None, enable_gqa: bool = False, *,
                               max_exact_len: int = MAX_EXACT_LEN, dtype: torch.dtype = torch.float64,
                               chunk_elements: int = 1 << 22) -> AttentionStatistics:
    """Max attention logit and attention entropy per query head, from the kernel's own arguments.

    Args:
        query: (..., Hq, L, E), as passed to ``scaled_dot_product_attention``.
        key: (..., Hk, S, E); Hk divides Hq (grouped-query attention) or equals it.
        attn_mask: None, a bool mask (True = attend) or an additive float mask, broadcastable to
            (..., Hq, L, S).
        is_causal: torch's causal flag (key j attended by query i iff j <= i).
        scale: the logit scale; None means 1/sqrt(E).
        enable_gqa: torch's flag; key heads are repeated to the query heads whenever Hk < Hq.
        max_exact_len: query positions measured exactly (see :func:`sampled_positions`).
        dtype: precision of the logits and the softmax.
        chunk_elements: logits formed at once at most (bounds the extra memory).

    Returns:
        :class:`AttentionStatistics` with tensors of shape (Hq,) on ``query.device``, in ``dtype``.
    """
    del enable_gqa  # the shapes say it: Hk < Hq means grouped keys, whatever the flag
    with torch.no_grad():
        q = _as_bhle(query.detach())
        k = _as_bhle(key.detach())
        if k.shape[0] != q.shape[0]:
            shape = torch.broadcast_shapes(q.shape[:1], k.shape[:1])
            q, k = q.expand(shape[0], *q.shape[1:]), k.expand(shape[0], *k.shape[1:])
        nb, hq, length, e = q.shape
        hk, s_len = k.shape[1], k.shape[2]
        if hq != hk:
            if hq % hk:
                raise ValueError(f"gradwatch: {hq} query heads cannot share {hk} key heads")
            k = k.repeat_interleave(hq // hk, dim=1)
        if scale is None:
            scale = 1.0 / math.sqrt(e)
        mask = None
        if attn_mask is not None:
            m = attn_mask.detach()
            lead = tuple(query.shape[:-3])
            if m.dim() < len(lead) + 3:
                m = m.reshape((1,) * (len(lead) + 3 - m.dim()) + tuple(m.shape))
            m_lead = torch.broadcast_shapes(tuple(m.shape[:-3]), lead)
            mask = m.expand(*m_lead, *m.shape[-3:]).reshape(-1, *m.shape[-3:])  # (B | 1, H | 1, L | 1, S | 1)
        positions = sampled_positions(length, max_exact_len, device=q.device)
        n_pos = positions.numel()
        cq = max(1, min(n_pos, chunk_elements // max(1, hq * s_len)))  # query positions per chunk
        cb = max(1, chunk_elements // max(1, hq * cq * s_len))  # batch rows per chunk (a few kernels, not B)
        key_idx = torch.arange(s_len, device=q.device)
        max_logit = torch.full((hq,), -math.inf, dtype=dtype, device=q.device)
        ent_sum = torch.zeros(hq, dtype=dtype, device=q.device)
        rows = torch.zeros(hq, dtype=dtype, device=q.device)
        for b0 in range(0, nb, cb):
            b1 = min(nb, b0 + cb)
            kb = k[b0:b1].to(dtype)  # (b, H, S, E)
            mb = None if mask is None else (mask[b0:b1] if mask.shape[0] > 1 else mask[:1])  # (b|1, H|1, L|1, S|1)
            for start in range(0, n_pos, cq):
                pos = positions[start:start + cq]
                qb = q[b0:b1, :, pos].to(dtype)  # (b, H, c, E)
                logits = torch.matmul(qb, kb.transpose(-1, -2)) * scale  # (b, H, c, S)
                attended = torch.ones(1, 1, pos.numel(), s_len, dtype=torch.bool, device=q.device)
                bias = None
                if mb is not None:
                    mc = mb[:, :, pos] if mb.shape[2] > 1 else mb
                    if mc.dtype == torch.bool:
                        attended = attended & mc
                    else:
                        mc = mc.to(dtype)
                        attended = attended & (mc > MASKED_BELOW)
                        bias = mc
                if is_causal:
                    attended = attended & (key_idx[None, None, None, :] <= pos[None, None, :, None])
                attended = attended.expand(b1 - b0, hq, -1, -1)
                masked_logits = logits.masked_fill(~attended, -math.inf)
                max_logit = torch.maximum(max_logit, masked_logits.amax(dim=(0, 2, 3)))
                scores = masked_logits if bias is None else (masked_logits + bias).masked_fill(~attended, -math.inf)
                has_key = attended.any(dim=-1)  # (b, H, c)
                log_p = torch.log_softmax(scores.masked_fill(~has_key[..., None], 0.0), dim=-1)
                row_entropy = -(log_p.exp() * log_p.masked_fill(~attended, 0.0)).sum(-1)  # (b, H, c)
                ent_sum = ent_sum + row_entropy.masked_fill(~has_key, 0.0).sum(dim=(0, 2))
                rows = rows + has_key.sum(dim=(0, 2)).to(dtype)
        return AttentionStatistics(max_logit=max_logit, entropy_sum=ent_sum, rows=rows,
                                   exact=n_pos == length)


@dataclass(frozen=True)
class KernelInputs:
    """What SDPA would receive for one ``nn.MultiheadAttention`` call: q (B, H, L, E), k (B, H, S, E), a bool
    mask broadcastable to (B, H, L, S) (True = attend) or None, an additive float mask or None, and the scale."""

    query: Tensor
    key: Tensor
    attn_mask: Tensor | None
    scale: float


def multihead_attention_qk(module: nn.MultiheadAttention, query: Tensor, key: Tensor,
                           key_padding_mask: Tensor | None = None, attn_mask: Tensor | None = None,
                           is_causal: bool = False) -> KernelInputs:
    """The q, k and mask an ``nn.MultiheadAttention`` forward attends with, rebuilt from its weights.

    q = query W_q^T + b_q and k = key W_k^T + b_k (from ``in_proj_weight``/``in_proj_bias``, or
    ``q_proj_weight``/``k_proj_weight`` when the key dimension differs), split into heads; ``bias_k`` and
    ``add_zero_attn`` append their key positions as the module does. ``batch_first`` is respected. The
    masks follow the module's conventions (bool True = *not* attended, float = additive; ``attn_mask``
    (L, S) or (B*H, L, S); ``key_padding_mask`` (B, S)) and come back combined in SDPA's convention (a float
    additive mask, -inf where masked), or None. ``is_causal`` is only a hint to the module (it requires
    ``attn_mask``), so the mask decides.
    """
    del is_causal
    with torch.no_grad():
        if module.batch_first and query.dim() == 3:
            query, key = query.transpose(0, 1), key.transpose(0, 1)
        unbatched = query.dim() == 2
        if unbatched:
            query, key = query[:, None], key[:, None]
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask[None]
        tgt_len, bsz, embed = query.shape
        heads = module.num_heads
        head_dim = embed // heads
        if module._qkv_same_embed_dim:
            w_q, w_k = module.in_proj_weight[:embed], module.in_proj_weight[embed:2 * embed]
        else:
            w_q, w_k = module.q_proj_weight, module.k_proj_weight
        b_q = b_k = None
        if module.in_proj_bias is not None:
            b_q, b_k = module.in_proj_bias[:embed], module.in_proj_bias[embed:2 * embed]
        q = nn.functional.linear(query, w_q, b_q)
        k = nn.functional.linear(key, w_k, b_k)  # (S, B, E)
        float_dtype = q.dtype if q.is_floating_point() else torch.float32

        def additive(mask: Tensor | None) -> Tensor | None:
            if mask is None:
                return None
            if mask.dtype == torch.bool:
                return torch.zeros(mask.shape, dtype=float_dtype, device=mask.device).masked_fill(mask, -math.inf)
            return mask.to(float_dtype)

        am = additive(attn_mask)
        kpm = additive(key_padding_mask)
        if module.bias_k is not None:
            k = torch.cat([k, module.bias_k.repeat(1, bsz, 1)])
            am = None if am is None else nn.functional.pad(am, (0, 1))
            kpm = None if kpm is None else nn.functional.pad(kpm, (0, 1))
        q = q.reshape(tgt_len, bsz * heads, head_dim).transpose(0, 1)
        k = k.reshape(k.shape[0], bsz * heads, head_dim).transpose(0, 1)
        if module.add_zero_attn:
            k = torch.cat([k, k.new_zeros(bsz * heads, 1, head_dim)], dim=1)
            am = None if am is None else nn.functional.pad(am, (0, 1))
            kpm = None if kpm is None else nn.functional.pad(kpm, (0, 1))
        src_len = k.shape[1]
        q = q.reshape(bsz, heads, tgt_len, head_dim)
        k = k.reshape(bsz, heads, src_len, head_dim)
        mask = None
        if am is not None:
            mask = am.reshape(1, 1, tgt_len, src_len) if am.dim() == 2 else am.reshape(bsz, heads, tgt_len, src_len)
        if kpm is not None:
            kp = kpm.reshape(bsz, 1, 1, src_len)
            mask = kp if mask is None else mask + kp
        return KernelInputs(query=q, key=k, attn_mask=mask, scale=1.0 / math.sqrt(head_dim))


__all__ = ["MASKED_BELOW", "MAX_EXACT_LEN", "AttentionStatistics", "KernelInputs", "attention_logit_statistics",
           "multihead_attention_qk", "sampled_positions"]
