"""The family's registration: which diagnostics :func:`build` makes for a model, and :data:`FAMILY`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gradwatch.cadence import Cadence
from gradwatch.metrics.base import Diagnostic
from gradwatch.metrics.stability.activations import ActivationRMS
from gradwatch.metrics.stability.adam_eps import AdamEpsShare
from gradwatch.metrics.stability.alerts import AlertBoard
from gradwatch.metrics.stability.attention import AttentionLogits
from gradwatch.metrics.stability.base import _StabilityDiagnostic
from gradwatch.metrics.stability.config import StabilityConfig
from gradwatch.metrics.stability.discovery import find_attention_modules, find_blocks, find_logits_module
from gradwatch.metrics.stability.noise_scale import NoiseScale
from gradwatch.metrics.stability.output_logits import OutputLogits
from gradwatch.metrics.stability.sharpness_ratio import SharpnessRatio
from gradwatch.metrics.stability.spikes import GradNormSpikes, LossSpikes
from gradwatch.metrics.stability.update_ratio import UpdateRatio
from gradwatch.registry import BuildInputs, Family


def _unique_params(watched: Sequence[Any]) -> list[str]:
    return list(dict.fromkeys(w.param_name for w in watched))


def build(config: StabilityConfig, inputs: BuildInputs) -> list[Diagnostic]:
    """The family's diagnostics for ``inputs.model``; the last one built writes ``stability/alert`` (the loss
    spike detector when it observes every step, else the last of the others)."""
    model = inputs.model
    out: list[_StabilityDiagnostic] = []
    params = _unique_params(inputs.watched)
    # first: these two may log at fewer events than the others (one batch size: quiet; no new estimate)
    if config.noise_scale is not False and params:
        out.append(NoiseScale(config))
    families = getattr(inputs.config, "families", None) or {}
    if "sharpness" in families:
        out.append(SharpnessRatio(config))
    attention = find_attention_modules(model) if model is not None else []
    if config.attention and attention:
        out.append(AttentionLogits([n for n, _ in attention], [k for _, k in attention], config))
    if config.logits and model is not None:
        name, source = find_logits_module(model)
        out.append(OutputLogits(name, source, config))
    if config.activations and attention:
        blocks = find_blocks(model, [n for n, _ in attention])
        if blocks:
            out.append(ActivationRMS(blocks, config))
    if config.update_ratio and params:
        out.append(UpdateRatio(params, config))
    if config.adam and params:
        out.append(AdamEpsShare(params, config))
    spikes: list[_StabilityDiagnostic] = []
    if config.spikes:
        if inputs.watched:
            spikes.append(GradNormSpikes(config))
        spikes.append(LossSpikes(config))
    # the last one writes stability/alert: it must log at every logging event (the engine computes in build
    # order), which the spike detectors do when they observe every step
    out = out + spikes if config.spike_every == Cadence.every(1) else spikes + out
    board = AlertBoard()
    for d in out:
        d.board, d.emits_flag = board, False
    if out:
        out[-1].emits_flag = True
    return list(out)


FAMILY = Family(key="stability", stem="stability", config_class=StabilityConfig, default_on=False, build=build,
                report="gradwatch.integrations.report.page:stability_section",
                summary="attention-logit growth, attention entropy, output log Z, update/weight ratios, Adam eps "
                        "share, loss and gradient spikes, with alerts",
                knobs=("max_exact_seq_len", "attention_logit_level", "attention_growth", "entropy_floor",
                       "log_z_drift", "update_ratio_factor", "spike_threshold", "spike_every", "spike_window",
                       "spike_warmup", "sharpness_ratio_limit"))
