"""Saying, once per layer, why a watched layer's spectrum statistics are NaN at a step: its gradient held an
inf/NaN, it had no gradient (a parameter the forward did not use), it was all zeros (norms 0; stable rank,
effective rank and top1 ratio are 0/0), or it has no entries (a 0-size weight)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


def say_faults(ctx: Any, tags: Sequence[str], matrices: Sequence[Tensor], indices: Sequence[int],
               nonfinite: Tensor) -> None:
    """One ``ctx.say_once`` per layer and kind of fault seen at this step (one small transfer per step)."""
    step = ctx.step
    have = set(indices)
    for i, tag in enumerate(tags):
        if i not in have:
            ctx.say_once(f"spectra:no_grad:{tag}", f"gradwatch: {tag} has no gradient at step {step} (not used in "
                         "the forward, or its gradient was set to None); its spectrum logs NaN (said once)")
    if not matrices:
        return
    flags = torch.stack([nonfinite.to(torch.bool).cpu(),
                         torch.stack([m.count_nonzero() == 0 for m in matrices]).cpu()]).tolist()
    for k, i in enumerate(indices):
        tag, m = tags[i], matrices[k]
        if m.numel() == 0:
            ctx.say_once(f"spectra:empty:{tag}", f"gradwatch: {tag} is a 0-size weight {tuple(m.shape)}: it has no "
                         "spectrum, and its statistics log NaN (said once)")
        elif flags[0][k]:
            ctx.say_once(f"spectra:nonfinite:{tag}", f"gradwatch: the gradient of {tag} held inf/NaN at step {step}; "
                         "its spectrum logs NaN at such steps, counted in grad_spectrum/nonfinite_layers (said once)")
        elif flags[1][k]:
            ctx.say_once(f"spectra:zero:{tag}", f"gradwatch: the gradient of {tag} is all zeros at step {step}: its "
                         "norms are 0 and its stable rank, effective rank and top1 ratio are undefined (NaN) "
                         "(said once)")
