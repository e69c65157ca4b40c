"""Shared test fixtures."""

from __future__ import annotations

import os
from collections.abc import Callable

import pandas as pd
import pytest


def read_tb_scalars(log_dir: str | os.PathLike) -> pd.DataFrame:
    """Every scalar event under ``log_dir`` as a long DataFrame with columns step, tag, value."""
    from tbparse import SummaryReader

    return SummaryReader(str(log_dir)).scalars


@pytest.fixture
def tb_scalars() -> Callable[[str | os.PathLike], pd.DataFrame]:
    """``tb_scalars(log_dir)`` -> DataFrame(step, tag, value) read back from TensorBoard event files."""
    return read_tb_scalars


@pytest.fixture(autouse=True, scope="session")
def _one_thread_for_tiny_models():
    """Tiny test models run faster on one thread (two threads on two busy cores cost ~1 s per step)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def read_scalars(log_dir: str | os.PathLike) -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}`` of every scalar under ``log_dir`` (``from conftest import read_scalars``)."""
    df = read_tb_scalars(log_dir)
    out: dict[str, dict[int, float]] = {}
    for tag, step, value in zip(df["tag"], df["step"], df["value"]):
        out.setdefault(tag, {})[int(step)] = float(value)
    return out


class TokenData:
    """``n`` fixed random token sequences as a map-style dataset of HF causal-LM examples (labels = inputs)."""

    def __init__(self, n: int = 16, seq_len: int = 8, vocab: int = 50) -> None:
        import torch

        self.ids = torch.randint(1, vocab, (n, seq_len), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        import torch

        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.ids[i]}
