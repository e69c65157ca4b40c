"""Alerts on their way out of the engine: once per rule within a cooldown, stamped with the step, handed to
the user's ``on_alert`` on rank zero, and fatal on every rank together under ``on_error="raise"``."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from gradwatch.engine.ranks import Ranks
from gradwatch.metrics.base import Alert


class GradWatchError(RuntimeError):
    """A diagnostic failed while ``on_error="raise"``."""


class GradWatchAlert(GradWatchError):
    """An alert fired while ``on_error="raise"`` (strict mode)."""

    def __init__(self, alert: Alert) -> None:
        super().__init__(f"gradwatch alert {alert.rule} at step {alert.step}: {alert.message}")
        self.alert = alert


class AlertGate:
    """What becomes of the alerts a logging event's results carry.

    Args:
        cooldown: steps within which a rule that fired stays quiet (``WatchConfig.alert_cooldown``).
        on_alert: the user's callback, called on rank zero with each admitted alert; None for none.
        strict: ``on_error == "raise"``: an alert (or a failing ``on_alert``) raises.
        ranks: strict mode stops every rank together, as rank zero decides.
        say_once: ``say_once(key, message)`` warns once per key.
    """

    def __init__(self, cooldown: int, on_alert: Callable[[Alert], object] | None, *, strict: bool, ranks: Ranks,
                 say_once: Callable[[str, str], None]) -> None:
        self.cooldown = cooldown
        self.on_alert = on_alert
        self.strict = strict
        self.ranks = ranks
        self._say_once = say_once
        self.last: dict[str, int] = {}  # rule -> the step it last fired at (saved in checkpoints)

    def admit(self, step: int, alerts: Sequence[Alert]) -> list[Alert]:
        """Once per rule within ``cooldown`` steps; the engine stamps the step."""
        admitted = []
        for a in alerts:
            last = self.last.get(a.rule)
            if last is not None and step - last < self.cooldown:
                continue
            self.last[a.rule] = step
            admitted.append(Alert(a.rule, a.severity, a.message, dict(a.evidence), tuple(a.remedies), step))
        return admitted

    def handle(self, alerts: Sequence[Alert]) -> None:
        """Call ``on_alert`` (rank zero); in strict mode raise on every rank when rank zero has an alert. Every
        rank calls it at each logging event, with or without alerts, so the decision is taken together."""
        if self.ranks.is_zero and self.on_alert is not None:
            for a in alerts:
                try:
                    self.on_alert(a)
                except Exception as exc:
                    if self.strict:
                        raise GradWatchError(f"gradwatch: on_alert raised for {a.rule}: {exc!r}") from exc
                    self._say_once("on_alert", f"gradwatch: on_alert raised for {a.rule} and is ignored; training "
                                               f"goes on (on_error='raise' makes this fatal): {exc!r}")
        if not self.strict:
            return
        fire = self.ranks.from_zero(bool(alerts))  # every rank stops together
        if alerts:
            raise GradWatchAlert(alerts[0])
        if fire:
            raise GradWatchError("gradwatch: an alert fired on rank zero (strict mode)")
