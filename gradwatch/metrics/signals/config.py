"""The options of the ``signals`` family (opposing signals, Rosenfeld and Risteski 2023)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gradwatch.cadence import Cadence, as_cadence
from gradwatch.checks import check_bool, check_float, check_int, fail
from gradwatch.functional.signals import MIN_CHANGES_FOR_PAIRS

WINDOW_RANGE = (MIN_CHANGES_FOR_PAIRS, 1000)
BURST_RANGE = (1, 100)


@dataclass(frozen=True)
class SignalsConfig:
    """Opposing signals (family ``signals``, Rosenfeld and Risteski 2023), on the shared probe set.

    Attributes:
        every: cadence of the probe bursts. At each due step the probe set's losses are evaluated (one
            forward pass over it, no grad) and again after each of the next ``burst`` optimizer steps, so a
            burst gives ``burst`` one-step loss changes. The default, ``Cadence.within_budget(minimum=10)``,
            starts a burst at step 1 and then as often as the overhead budget allows, at most every 10 steps:
            the engine measures a whole burst against training steps and spaces the bursts evenly. Give an int
            (``every=25``) for a fixed cadence; ``every=1`` probes every step.
        burst: one-step changes per burst (``burst + 1`` probe evaluations), 1..100. The oscillation of the
            paper has a period of about two optimizer steps; a change across a longer gap aliases it away, so
            only changes over one step enter the window.
        window: one-step loss changes kept (across bursts), 5..1000; groups and pairs are read from the change
            series over this window (pairs once it holds at least 5 changes).
        alarm: pair score in (0, 1] from which a pair raises the alarm (``signals/alarm``, an alert). The
            default 0.6 needs, e.g., a correlation of -0.8 with opposite moves at 3 of 4 steps by a pair
            carrying half the loss movement whose sides share a direction (``shared >= full_shared``) and swing
            by at least ``full_swing`` of their own loss per step.
        probe_size: probe examples used (the engine draws the largest any family asks for; each family uses
            the first of that draw it asks for).
        z_cut: robust z-score of an example's movement from which it is an outlier (3.5: Iglewicz and
            Hoaglin 1993).
        rho: correlation in (0, 1) from which two outliers' change series are in one group; two groups are
            a pair when their mean series correlate at most ``-rho``.
        min_group: smallest group (examples).
        max_outliers: at most this many outliers (the most extreme) are grouped and recorded.
        full_share: share in (0, 1] of the probe set's loss movement at which a pair's strength is full.
        full_shared: cosine in (0, 1] of the two sides' deviations in the model's representation at which a
            pair's sharedness is full (0 at a cosine <= 0: the two sides of a decision margin).
        full_swing: per-step change of each side's mean loss, relative to its loss, at which a pair's
            swinginess is full (> 0).
        confirm: confirm an alarming pair by the cosine of its two sides' mean last-layer gradients.
        batch_size: probe batch size for the loss passes (None: the engine's).
        decode: ``decode(example) -> str`` shows a raw probe example in the pairs table (e.g. a tokenizer's
            decode of its ``input_ids``); None: a short description of its tensors.
    """

    every: int | Cadence = Cadence.within_budget(minimum=10)
    burst: int = 5
    window: int = 20
    alarm: float = 0.6
    probe_size: int = 512
    z_cut: float = 3.5
    rho: float = 0.8
    min_group: int = 2
    max_outliers: int = 128
    full_share: float = 0.5
    full_shared: float = 0.5
    full_swing: float = 0.1
    confirm: bool = True
    batch_size: int | None = None
    decode: Callable[[Any], str] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "every", as_cadence("SignalsConfig.every", self.every))
        for name, (low, high), what in (("window", WINDOW_RANGE, "loss changes kept"),
                                        ("burst", BURST_RANGE, "one-step changes per burst")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise fail(f"SignalsConfig.{name}", value, f"an int in {low}..{high} ({what})")
        check_float("SignalsConfig.alarm", self.alarm, low=0.0, high=1.0)
        check_int("SignalsConfig.probe_size", self.probe_size, minimum=8)
        check_float("SignalsConfig.z_cut", self.z_cut, low=0.0, high=100.0)
        check_float("SignalsConfig.rho", self.rho, low=0.0, high=1.0)
        if self.rho >= 1.0:
            raise fail("SignalsConfig.rho", self.rho, "a number in (0.0, 1.0)")
        check_int("SignalsConfig.min_group", self.min_group, minimum=1)
        check_int("SignalsConfig.max_outliers", self.max_outliers, minimum=2)
        check_float("SignalsConfig.full_share", self.full_share, low=0.0, high=1.0)
        check_float("SignalsConfig.full_shared", self.full_shared, low=0.0, high=1.0)
        check_float("SignalsConfig.full_swing", self.full_swing, low=0.0, high=100.0)
        check_bool("SignalsConfig.confirm", self.confirm)
        if self.batch_size is not None:
            check_int("SignalsConfig.batch_size", self.batch_size, minimum=1)
        if self.decode is not None and not callable(self.decode):
            raise fail("SignalsConfig.decode", self.decode, "a callable decode(example) -> str, or None")
