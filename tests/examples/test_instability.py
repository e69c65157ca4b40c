"""The instability example at its small size: without qk-layernorm at lr 0.1 the max attention logit grows by
orders of magnitude and the attention alert fires well before the loss falls behind; with qk-layernorm the
logits stay bounded and nothing fires (Wortsman et al. 2023; REFERENCE section 4)."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from _support.examples import load_example as _load


def load_example() -> Any:
    return _load('instability')


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    log_dir = tmp_path_factory.mktemp("instability")
    return load_example().main(["--small", "--log-dir", str(log_dir)])


def test_logits_grow_by_orders_of_magnitude_without_qk_norm(results: dict[str, Any]) -> None:
    r = results["no_qk_norm"]
    assert r["steps"][0] == 1 and r["steps"][-1] == 80
    assert max(r["max_logit"]) > 100 * r["max_logit"][0]
    assert max(r["max_logit"]) > 1000


def test_alert_fires_before_the_loss_falls_behind(results: dict[str, Any]) -> None:
    summary = results["summary"]
    alert, behind = summary["first_attention_alert"], summary["loss_falls_behind"]
    assert alert is not None and behind is not None
    assert alert < behind
    r = results["no_qk_norm"]
    records = [json.loads(line) for line in open(os.path.join(r["log_dir"], "alerts.jsonl"))]
    first = min((rec for rec in records if rec["rule"].startswith("stability/attention")), key=lambda rec: rec["step"])
    assert first["step"] == alert and first["remedies"]


def test_qk_norm_stays_bounded_with_no_alert(results: dict[str, Any]) -> None:
    r = results["qk_norm"]
    assert max(r["max_logit"]) < 100
    assert r["alerts"] == [] and r["first_attention_alert"] is None
    assert r["loss"][-1] < results["no_qk_norm"]["loss"][-1]


def test_outputs(results: dict[str, Any]) -> None:
    assert os.path.getsize(results["png"]) > 10_000
    for name in ("no_qk_norm", "qk_norm"):
        assert any(f.startswith("events.out.tfevents") for f in os.listdir(results[name]["log_dir"]))
