"""What the family's alert rules share: the board behind ``stability/alert``, the optimizer settings that
remedies quote, and how they write numbers.

Each rule itself lives with the diagnostic whose carried state it reads (see the package docstring).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from gradwatch.metrics.base import Alert, StepContext


class AlertBoard:
    """Collects whether any diagnostic of the family raised an alert since the last ``stability/alert``.

    Every diagnostic of a built family reports to the board; only the one marked ``emits_flag`` (the last
    one built, computed last at a logging event) writes ``stability/alert``, so the tag is written once
    per logging event. A diagnostic built on its own (no board) writes its own flag.
    """

    def __init__(self) -> None:
        self.raised = False

    def report(self, alerts: Sequence[Alert]) -> None:
        self.raised = self.raised or bool(alerts)

    def take(self) -> bool:
        raised, self.raised = self.raised, False
        return raised


def _fmt(x: float) -> str:
    """1e-2 -> '0.01', 1e-8 -> '1e-8', 3e-4 -> '0.0003'."""
    return f"{x:.3g}".replace("e-0", "e-").replace("e+0", "e+")


def _optimizer_settings(ctx: StepContext) -> dict[str, float]:
    try:
        opt = ctx.optimizer
        group = opt.param_groups[0]
    except Exception:  # noqa: BLE001 - the settings only decorate remedies
        return {}
    out: dict[str, float] = {}
    for key in ("lr", "eps", "weight_decay"):
        value = group.get(key)
        if isinstance(value, Tensor):
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
    betas = group.get("betas")
    if betas is not None:
        out["beta2"] = float(betas[1])
    return out


def _lower_lr(settings: Mapping[str, float]) -> str:
    lr = settings.get("lr")
    if lr is None:
        return "lower the learning rate (e.g. by 3x)"
    return f"lower the learning rate from {_fmt(lr)} (e.g. to {_fmt(lr / 3)})"
