"""The stability family's options: :class:`StabilityConfig`, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from gradwatch.cadence import Cadence, as_cadence
from gradwatch.checks import check_bool, check_choice, check_float, check_int, fail
from gradwatch.functional.attention import MAX_EXACT_LEN

_BIG = 1e12


@dataclass(frozen=True)
class StabilityConfig:
    """Instability proxies (family ``stability``; off by default).

    Attributes:
        every: cadence of every quantity; the spike detectors log at this cadence and observe at
            ``spike_every``.
        attention, logits, activations, update_ratio, adam, spikes, noise_scale: switch each quantity.
            ``noise_scale=None`` (the default) logs B_simple where the run gives two batch sizes (gradient
            accumulation, or several ranks) and stays quiet where it does not; ``True`` says so once there.
        max_exact_seq_len: attention statistics are exact up to this many query positions; longer
            sequences are measured at this many evenly spaced query positions (first and last included).
        attention_precision: dtype of the recomputed attention logits (``"float64"`` or ``"float32"``).
        attention_logit_level: max attention logit that raises a warning.
        attention_logit_critical: max attention logit that raises a critical alert (>= the level).
        attention_growth: growth factor of the max attention logit over ``growth_window`` logging events
            that raises an alert.
        growth_window: logging events over which the growth is measured.
        growth_min_logit: the growth rule applies only once the max logit is at least this.
        entropy_floor: an attention module whose entropy_min (nats) falls below this raises an alert
            (0 turns the rule off).
        log_z_drift: drift of log_z_mean from its first logged value (nats) that raises an alert.
        update_ratio_factor: a parameter's update ratio above this many times its running median alerts.
        level_window: logged values in the running median of each update ratio.
        level_warmup: logged values needed before the update-ratio rule applies.
        eps_share_limit: Adam eps share of a parameter above which an alert is raised.
        spike_threshold: robust z-score (x - median) / (1.4826 MAD) above which a loss / gradient norm
            is a spike.
        spike_every: cadence at which the spike detectors observe (every step by default: a spike between
            two observations is not seen; each observation is a few small device ops and reads the
            gradients' norm).
        spike_window: observations in the spike detector's running window.
        spike_warmup: steps before the spike detector scores anything (<= ``spike_window``).
        sharpness_ratio_limit: with the sharpness family on, ``sharpness/ratio`` above this for
            ``sharpness_sustain`` estimates in a row raises an alert.
        sharpness_sustain: consecutive sharpness estimates above the limit that raise it.
    """

    every: int | Cadence = 10
    attention: bool = True
    logits: bool = True
    activations: bool = True
    update_ratio: bool = True
    adam: bool = True
    spikes: bool = True
    noise_scale: bool | None = None
    max_exact_seq_len: int = MAX_EXACT_LEN
    attention_precision: Literal["float64", "float32"] = "float64"
    attention_logit_level: float = 100.0
    attention_logit_critical: float = 1e4
    attention_growth: float = 4.0
    growth_window: int = 5
    growth_min_logit: float = 20.0
    entropy_floor: float = 0.1
    log_z_drift: float = 20.0
    update_ratio_factor: float = 10.0
    level_window: int = 20
    level_warmup: int = 3
    eps_share_limit: float = 0.5
    spike_threshold: float = 6.0
    spike_every: int | Cadence = 1
    spike_window: int = 100
    spike_warmup: int = 50
    sharpness_ratio_limit: float = 1.0
    sharpness_sustain: int = 3

    def __post_init__(self) -> None:
        name = "StabilityConfig"
        object.__setattr__(self, "every", as_cadence(f"{name}.every", self.every))
        object.__setattr__(self, "spike_every", as_cadence(f"{name}.spike_every", self.spike_every))
        for f in ("attention", "logits", "activations", "update_ratio", "adam", "spikes"):
            check_bool(f"{name}.{f}", getattr(self, f))
        if self.noise_scale is not None:
            check_bool(f"{name}.noise_scale", self.noise_scale)
        check_int(f"{name}.max_exact_seq_len", self.max_exact_seq_len, minimum=1)
        check_choice(f"{name}.attention_precision", self.attention_precision, ("float64", "float32"))
        floats = {
            "attention_logit_level": (0.0, _BIG, True), "attention_logit_critical": (0.0, _BIG, True),
            "attention_growth": (1.0, _BIG, True), "growth_min_logit": (0.0, _BIG, False),
            "entropy_floor": (0.0, 100.0, False), "log_z_drift": (0.0, _BIG, True),
            "update_ratio_factor": (1.0, _BIG, True), "eps_share_limit": (0.0, 1.0, True),
            "spike_threshold": (0.0, _BIG, True), "sharpness_ratio_limit": (0.0, _BIG, True),
        }
        for f, (low, high, open_low) in floats.items():
            object.__setattr__(self, f, check_float(f"{name}.{f}", getattr(self, f), low=low, high=high,
                                                    open_low=open_low))
        if self.attention_logit_critical < self.attention_logit_level:
            raise fail(f"{name}.attention_logit_critical", self.attention_logit_critical,
                       f"a number >= attention_logit_level ({self.attention_logit_level})")
        check_int(f"{name}.growth_window", self.growth_window, minimum=1)
        check_int(f"{name}.level_window", self.level_window, minimum=2)
        check_int(f"{name}.level_warmup", self.level_warmup, minimum=1)
        if self.level_warmup > self.level_window:
            raise fail(f"{name}.level_warmup", self.level_warmup, f"an int in [1, level_window={self.level_window}]")
        check_int(f"{name}.sharpness_sustain", self.sharpness_sustain, minimum=1)
        check_int(f"{name}.spike_window", self.spike_window, minimum=3)
        check_int(f"{name}.spike_warmup", self.spike_warmup, minimum=2)
        if self.spike_warmup > self.spike_window:
            raise fail(f"{name}.spike_warmup", self.spike_warmup, f"an int in [2, spike_window={self.spike_window}]")
