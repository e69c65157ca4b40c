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
