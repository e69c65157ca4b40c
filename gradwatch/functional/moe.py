"""Mixture-of-experts routing statistics on tensors: expert load, its balance, router entropy and log Z.

For one router call with logits z (N tokens x E experts; leading dims flattened), p_n = softmax(z_n) and
the token-to-expert assignments the router made (k per token for top-k routing):

- log Z: lse_n = logsumexp_e z_ne. ST-MoE's router z-loss (Zoph et al. 2022, "ST-MoE: designing stable
  and transferable sparse expert models", eq. 5) is (1/N) sum_n lse_n^2 before its coefficient (1e-3
  there): large router logits make the routing softmax and its gradients unstable in low precision.
- Router entropy: H_n = -sum_e p_ne ln p_ne (nats), averaged over tokens: ~ln E when the router is
  unsure, -> 0 when every token is routed with certainty.
- Expert load: c_e = assignments to expert e that were kept, share f_e = c_e / sum_e c_e. Its
  coefficient of variation CV = std_e(c) / mean_e(c) (population std) equals sqrt(E sum_e f_e^2 - 1):
  0 when balanced, sqrt(E/k - 1) when every token goes to the same k experts, sqrt(E - 1) for top-1 onto
  one expert; CV^2 + 1 = E / N_eff with N_eff = 1 / sum_e f_e^2 the effective number of experts. The
  entropy of the load H(f) = -sum_e f_e ln f_e is at most ln E. The max load ratio E max_e f_e is 1 when
  balanced (DeepSeek-V3's "MaxVio" is this minus 1). Load balance is what Shazeer et al. 2017 and Switch
  Transformers (Fedus et al. 2022) add an auxiliary loss for.
- Dropped assignments (expert capacity, Fedus et al. 2022): assignments a router made but did not keep,
  read from what the router returns: expert indices outside [0, E) (Hugging Face's experts modules skip
  index E; capacity-limited routers commonly write -1), or a 0/1 dispatch mask [N, E] (Switch
  Transformers' top-1 router zeroes a token's row when its expert is full).

:func:`router_statistics` reduces one call to sums (so calls over micro-batches, ranks and steps add up);
:func:`load_statistics` turns summed counts into the load statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class RouterStatistics:
    """Sums over the tokens of one or more router calls (float64 tensors, on the logits' device).

    Attributes:
        counts: (E,) kept assignments per expert.
        tokens: number of tokens (rows of logits).
        entropy_sum: sum over tokens of the routing softmax's entropy (nats).
        log_z_sum: sum over tokens of logsumexp of the logits.
        log_z_sq_sum: sum over tokens of (logsumexp of the logits)^2.
        slots: assignments made (N k); 0 when the call gave no assignments (no indices, no top-k).
        dropped: assignments made but not kept (0 for a router that reports none).
    """

    counts: Tensor
    tokens: Tensor
    entropy_sum: Tensor
    log_z_sum: Tensor
    log_z_sq_sum: Tensor
    slots: Tensor
    dropped: Tensor

    def __add__(self, other: RouterStatistics) -> RouterStatistics:
        return RouterStatistics(*(a + b for a, b in zip(self.fields(), other.fields())))

    def fields(self) -> tuple[Tensor, ...]:
        return (self.counts, self.tokens, self.entropy_sum, self.log_z_sum, self.log_z_sq_sum, self.slots,
                self.dropped)

    def sums(self) -> Tensor:
        """(6,) tokens, entropy_sum, log_z_sum, log_z_sq_sum, slots, dropped."""
        return torch.stack(self.fields()[1:])


#: The columns of :meth:`RouterStatistics.sums`.
SUM_FIELDS: tuple[str, ...] = ("tokens", "entropy_sum", "log_z_sum", "log_z_sq_sum", "slots", "dropped")


def router_statistics(logits: Tensor, *, indices: Tensor | None = None, dispatch_mask: Tensor | None = None,
                      top_k: int | None = None, dtype: torch.dtype = torch.float32) -> RouterStatistics:
    """Sums of one router call (see the module docstring).

    Args:
        logits: (..., E) router logits; leading dims are tokens.
        indices: (..., k) integer expert indices the router chose (entries outside [0, E) were dropped).
        dispatch_mask: (..., E) 0/1 mask of the kept assignments (used when ``indices`` is None); a token
            makes ``top_k`` (default 1) assignments.
        top_k: with neither indices nor mask, the assignments are the top ``top_k`` logits of each token
            (nothing dropped); None then: no assignments (counts and slots 0).
        dtype: precision of the per-token softmax, entropy and logsumexp (sums are float64).
    """
    num_experts = logits.shape[-1]
    z = logits.detach().reshape(-1, num_experts).to(dtype)
    n = z.shape[0]
    lse = torch.logsumexp(z, dim=-1)
    entropy = torch.special.entr(torch.softmax(z, dim=-1)).sum(-1)
    f64 = dict(dtype=torch.float64, device=z.device)
    counts = torch.zeros(num_experts, **f64)
    if indices is not None:
        idx = indices.detach().reshape(-1).to(z.device, torch.long)
        kept = (idx >= 0) & (idx < num_experts)
        counts.index_add_(0, idx[kept], torch.ones(idx.shape[0], **f64)[kept])
        slots = torch.tensor(float(idx.numel()), **f64)
    elif dispatch_mask is not None:
        counts = (dispatch_mask.detach().reshape(-1, num_experts) != 0).to(torch.float64).sum(0).to(z.device)
        slots = torch.tensor(float(n * (top_k or 1)), **f64)
    elif top_k is not None:
        idx = torch.topk(z, min(top_k, num_experts), dim=-1).indices.reshape(-1)
        counts.index_add_(0, idx, torch.ones(idx.shape[0], **f64))
        slots = torch.tensor(float(idx.numel()), **f64)
    else:
        slots = torch.zeros((), **f64)
    lse64 = lse.to(torch.float64)
    return RouterStatistics(counts=counts, tokens=torch.tensor(float(n), **f64),
                            entropy_sum=entropy.to(torch.float64).sum(), log_z_sum=lse64.sum(),
                            log_z_sq_sum=lse64.square().sum(), slots=slots, dropped=slots - counts.sum())


@dataclass(frozen=True)
class LoadStatistics:
    """Balance of summed expert counts (0-d tensors but ``share``; NaN where no assignment was counted).

    Attributes:
        share: (E,) f_e = c_e / sum c.
        cv: std_e(c) / mean_e(c), population std.
        max_ratio: E max_e f_e.
        entropy: -sum_e f_e ln f_e (nats; at most ln E).
    """

    share: Tensor
    cv: Tensor
    max_ratio: Tensor
    entropy: Tensor


def load_statistics(counts: Tensor) -> LoadStatistics:
    """:class:`LoadStatistics` of the (E,) kept assignments per expert."""
    counts = counts.to(torch.float64)
    total = counts.sum()
    share = counts / total  # NaN everywhere when total is 0
    mean = counts.mean()
    cv = counts.std(correction=0) / mean if counts.numel() > 1 else torch.zeros_like(mean) / (total > 0)
    return LoadStatistics(share=share, cv=cv, max_ratio=share.amax() * counts.numel(),
                          entropy=torch.special.entr(share).sum())


__all__ = ["SUM_FIELDS", "LoadStatistics", "RouterStatistics", "load_statistics", "router_statistics"]
