"""The edge-of-stability example at a reduced size: progressive sharpening at lr 0.05, hovering at 2/lr at
lr 0.2 (Cohen et al. 2021; REFERENCE section 2), measured by gradwatch's sharpness diagnostic."""

from __future__ import annotations

import os
from typing import Any

import pytest
from _support.examples import load_example as _load


def load_example() -> Any:
    return _load('edge_of_stability')


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    log_dir = tmp_path_factory.mktemp("eos")
    return load_example().main(["--log-dir", str(log_dir), "--runs", "gd_0.05", "gd_0.2", "--examples", "200",
                                "--probe-size", "200", "--steps-slow", "800", "--steps-fast", "200",
                                "--every", "50"])


def test_lr_0p2_hovers_at_two_over_lr(results: dict[str, Any]) -> None:
    r = results["gd_0.2"]
    assert r["threshold"] == pytest.approx(10.0)
    late = [lam for step, lam in zip(r["steps"], r["lambda_max"]) if step >= 100]
    assert len(late) >= 3
    assert all(0.9 * 10 <= lam <= 1.25 * 10 for lam in late), late
    assert r["lambda_max"][0] < 0.9 * 10  # it started below the threshold and rose to it
    assert all(c == 1.0 for c in r["converged"])


def test_lr_0p05_progressive_sharpening(results: dict[str, Any]) -> None:
    r = results["gd_0.05"]
    lam = r["lambda_max"]
    assert r["threshold"] == pytest.approx(40.0)
    assert r["steps"][0] == 1 and r["steps"][-1] == 800
    assert lam[-1] > 2.0 * lam[0], lam
    assert max(lam) < 40.0  # below the threshold: this is sharpening, not the edge of stability
    assert all(c == 1.0 for c in r["converged"])
    assert r["loss"][-1] < 0.5 * r["loss"][0]


def test_outputs_written(results: dict[str, Any]) -> None:
    png = results["gd_0.2"]["png"]
    assert os.path.getsize(png) > 10_000
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(results["gd_0.2"]["log_dir"]))
