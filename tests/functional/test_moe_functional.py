"""The MoE routing math (``gradwatch.functional.moe``) against numpy float64 references (``_support.moe.reference``),
and the closed forms its docstring states."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from _support.moe import reference

from gradwatch.functional.moe import load_statistics, router_statistics


def _numpy_router(z: np.ndarray, idx: np.ndarray) -> dict[str, Any]:
    return reference([(z, idx, None)])


@pytest.mark.parametrize("dtype, rel", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_router_and_load_statistics_against_numpy(dtype, rel):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 20, 6, generator=g, dtype=torch.float64) * 3
    indices = torch.randint(0, 6, (60, 2), generator=g)
    indices[::7, 1] = -1  # dropped (capacity)
    indices[::11, 0] = 6  # dropped (Hugging Face's "index E": skipped by the experts)
    stats = router_statistics(logits, indices=indices, dtype=dtype)
    ref = _numpy_router(logits.reshape(-1, 6).numpy(), indices.numpy())
    load = load_statistics(stats.counts)
    assert stats.tokens.item() == 60 and stats.slots.item() == 120
    assert stats.dropped.item() / stats.slots.item() == pytest.approx(ref["dropped"], rel=1e-15)
    np.testing.assert_allclose(load.share.numpy(), ref["load"], rtol=1e-15)
    for name, got in (("load_cv", load.cv), ("load_max", load.max_ratio), ("load_entropy", load.entropy),
                      ("entropy", stats.entropy_sum / stats.tokens), ("z_loss", stats.log_z_sq_sum / stats.tokens),
                      ("log_z", stats.log_z_sum / stats.tokens)):
        assert got.dtype == torch.float64 and got.item() == pytest.approx(ref[name], rel=rel), name
    # logits only: the top-k of each token, nothing dropped; a 0/1 dispatch mask: its zero rows dropped
    top = router_statistics(logits, top_k=2, dtype=dtype)
    np.testing.assert_array_equal(top.counts.numpy(), reference([(logits.reshape(-1, 6).numpy(), None, None)], 2)["load"] * 120)
    assert top.dropped.item() == 0
    mask = torch.nn.functional.one_hot(logits.reshape(-1, 6).argmax(-1), 6)
    mask[:10] = 0
    masked = router_statistics(logits, dispatch_mask=mask, dtype=dtype)
    assert masked.slots.item() == 60 and masked.dropped.item() == 10 and masked.counts.sum().item() == 50
    # balanced and collapsed loads: the closed forms of the docstring
    balanced, onto_two = load_statistics(torch.full((8,), 5.0)), load_statistics(torch.tensor([9.0, 9, 0, 0, 0, 0, 0, 0]))
    assert balanced.cv.item() == 0 and balanced.max_ratio.item() == 1 and balanced.entropy.item() == pytest.approx(math.log(8))
    assert onto_two.cv.item() == pytest.approx(math.sqrt(8 / 2 - 1)) and onto_two.entropy.item() == pytest.approx(math.log(2))
    assert math.isnan(load_statistics(torch.zeros(4)).cv.item())


def test_stable_for_large_and_masked_logits():
    logits = torch.tensor([[1e4, 0.0, -1e4], [-math.inf, 2.0, 2.0]], dtype=torch.float32)
    stats = router_statistics(logits, top_k=1)
    assert stats.entropy_sum.item() == pytest.approx(math.log(2), rel=1e-6)  # row 1: certain; row 2: two equal
    assert stats.log_z_sum.item() == pytest.approx(1e4 + 2 + math.log(2), rel=1e-6)
