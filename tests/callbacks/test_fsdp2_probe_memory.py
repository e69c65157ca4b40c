"""Extra passes under FSDP2 without unsharding the whole model (2 gloo CPU ranks, one launch of
``_fsdp2_probe_memory_worker.py``; its docstring says what each phase does).

- signals' forward-only probe pass runs through FSDP2's own sharded forward: never more than one of the four
  parameter groups unsharded at once, no ``FSDPModule.unshard``, the probe losses equal to the plain model's
  (bitwise here), and a failure in one rank's loss code fails the step on both ranks without a hang;
- a pass with gradients over ``max_unshard_gb`` is refused with one message, the family is off after it
  (observed once, one NaN point) and training finishes with the plain model's weights;
- within the limit today's path stands: the whole model unsharded for the pass (4 of 4 groups).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import pytest
import torch

from gradwatch import WatchConfig

HERE = os.path.dirname(os.path.abspath(__file__))


def _requirements() -> str | None:
    dist = torch.distributed
    if not dist.is_available() or not dist.is_gloo_available():
        return "torch.distributed with the gloo backend is not available"
    try:
        from torch.distributed.fsdp import FSDPModule  # noqa: F401
    except ImportError:
        return "torch.distributed.fsdp.FSDPModule (FSDP2) is not available"
    return None


@pytest.fixture(scope="module")
def phases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    why = _requirements()
    if why:
        pytest.skip(why)
    from _support.launch import run_worker

    out = tmp_path_factory.mktemp("fsdp2_probe_memory") / "out.json"
    run_worker(os.path.join(HERE, "_fsdp2_probe_memory_worker.py"), str(out), timeout=240)
    return json.loads(out.read_text())


def test_signals_probe_pass_is_sharded_and_equals_the_plain_model(phases: dict[str, Any]) -> None:
    import _fsdp2_probe_memory_worker as worker

    got = phases["signals"]
    assert got["groups"] == 4
    assert got["peak_unsharded_groups"] == 1  # one Linear at a time; the whole-model path holds 4
    assert got["unshard_calls"] == 0
    assert got["worst_rel_loss_error"] <= 1e-6
    assert got["same_weights_as_plain"] and got["observed"] == worker.STEPS["signals"]
    share = got["logged"]["signals/top1pct_share"]  # step 2 (first change), then NaN for the failed step 3
    assert len(share) == 2 and 0 < share[0] < 1 and math.isnan(share[1])
    assert got["warnings"] == ["gradwatch: OpposingSignals (signals) failed at step 3 and logs NaN; training goes "
                               "on (said once; on_error='raise' makes this fatal): RuntimeError('gradwatch: "
                               "signals: the probe losses failed on another rank')"]


def test_a_pass_with_gradients_over_the_limit_is_refused_once_and_the_family_goes_quiet(
        phases: dict[str, Any]) -> None:
    got = phases["refused"]
    need = sum(n * 4 for n in (8 * 16 + 16, 16 * 16 + 16, 16 * 16 + 16, 16 * 3 + 3)) / 2**30
    assert got["warnings"] == [
        "gradwatch: this extra pass needs gradients through the whole model, so under FSDP2 every FSDP module is "
        f"unsharded on every rank for it: {need:.3g} GiB of parameters per rank, over max_unshard_gb=1e-09. "
        "Forward-only probe passes run sharded; this one cannot. Raise max_unshard_gb if the full parameters fit "
        "on each device beside training's own memory, or turn the family off. Sharpness (sharpness) is off for "
        "the rest of this run; training goes on"]
    assert got["observed"] == 1 and got["unshard_calls"] == 0 and got["peak_unsharded_groups"] == 0
    assert [math.isnan(v) for v in got["logged"]["sharpness/lambda_max"]] == [True]  # one gap, then quiet
    assert got["same_weights_as_plain"]


def test_within_the_limit_a_pass_with_gradients_unshards_the_whole_model(phases: dict[str, Any]) -> None:
    got = phases["unsharded"]
    assert got["peak_unsharded_groups"] == 4 and got["unshard_calls"] > 0
    values = got["logged"]["sharpness/lambda_max"]
    assert len(values) == 2 and all(0 < v < 10 for v in values)
    assert got["same_weights_as_plain"] and not got["warnings"]


@pytest.mark.parametrize("bad", [0, -1.0, True, "2", float("inf"), float("nan")])
def test_max_unshard_gb_is_validated(bad: object) -> None:
    with pytest.raises(ValueError, match=r"`max_unshard_gb` expected a number of GiB > 0, or None for no limit"):
        WatchConfig(max_unshard_gb=bad)  # type: ignore[arg-type]


def test_max_unshard_gb_default_and_knob() -> None:
    from gradwatch.knobs import config_from_knobs

    assert WatchConfig().max_unshard_gb is None and WatchConfig(max_unshard_gb=2).max_unshard_gb == 2.0
    assert config_from_knobs({"max_unshard_gb": 0.5}).max_unshard_gb == 0.5
