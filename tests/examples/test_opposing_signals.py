"""The opposing-signals example at its small size, over three seeds: the planted groups are the most often
reported outliers (recall >= 0.9, precision >= 0.8), the two sides of one pair (purity >= 0.9) raising the
alarm; the same data without the planted feature raises none; the digits run reports what it finds; the PNG
is written. All through Lightning, read back from signals.jsonl, alerts.jsonl and TensorBoard."""

from __future__ import annotations

import os
from typing import Any

import pytest
from _support.examples import load_example as _load

SEEDS = (0, 1, 2)


def load_example() -> Any:
    return _load('opposing_signals')


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("signals")
    return load_example().main(["--small", "--log-dir", str(root), "--seeds", *map(str, SEEDS)])


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_planted_groups_are_found_and_raise_the_alarm(results: dict[str, Any], seed: int) -> None:
    run = results["planted"][seed]
    f = run["figures"]
    assert f["planted_in_probe"] >= 30
    assert f["recall"] >= 0.9 and f["precision"] >= 0.8, f
    assert f["purity"] >= 0.9, f
    assert f["alarm_share"] >= 0.5 and f["max_score"] >= 0.9, f
    rules = [a["rule"] for a in run["alerts"]]
    assert rules and set(rules) == {"signals/opposing_pair"}
    evidence = run["alerts"][0]["evidence"]
    assert evidence["score"] >= 0.6 and evidence["correlation"] < 0 and evidence["gradient_cosine"] < 0


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_without_the_planted_feature_no_pair_raises_the_alarm(results: dict[str, Any], seed: int) -> None:
    run = results["control"][seed]
    assert run["records"] and all(not p["alarm"] for r in run["records"] for p in r["pairs"])
    assert run["figures"]["max_score"] < 0.6 and run["alerts"] == []


@pytest.mark.slow
def test_digits_run_and_figure(results: dict[str, Any]) -> None:
    from conftest import read_scalars

    run = results["digits"]
    assert len(run["records"]) == 149  # one row per probe step after the first
    scalars = read_scalars(run["run_dir"])
    assert set(scalars["signals/outliers"]) == set(range(2, 151))  # step 1 has no one-step change yet
    assert os.path.getsize(results["png"]) > 10_000
