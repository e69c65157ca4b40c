"""The user's random streams, left as they were: what gradwatch reads or runs inside :func:`preserved_rng`
(probe examples read from a dataset that augments, collate functions that mask at random, extra forward
passes with dropout) draws from the global torch, numpy and Python ``random`` generators and puts every one
back afterwards, so the run's data order and dropout masks are those of a run without gradwatch."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Sequence

import numpy as np
import torch


def _devices() -> list[int]:
    return [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []


@contextlib.contextmanager
def preserved_rng(devices: Sequence[int] | None = None) -> Iterator[None]:
    """Fork torch's CPU (and current CUDA) generator, and save and restore numpy's and Python's global ones."""
    py, npy = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=_devices() if devices is None else list(devices)):
            yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
