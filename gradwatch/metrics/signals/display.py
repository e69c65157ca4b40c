"""How the ``signals`` family shows a probe step to a person: the ``signals/pairs`` text table (dataset
indices, labels, losses, the examples through ``decode``), the ``signals/pair_examples`` thumbnails when
the examples are pictures, and the ``signals/opposing_pair`` alert."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor

from gradwatch.functional.signals import MIN_CHANGES_FOR_PAIRS
from gradwatch.functional.thumbnails import as_image, thumbnail_grid
from gradwatch.metrics.base import Alert
from gradwatch.metrics.signals.representation import raw_label
from gradwatch.metrics.signals.rows import Pair, Row

MAX_PAIRS_SHOWN = 3
MAX_EXAMPLES_SHOWN = 8
MAX_CELL = 120


def finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def cell(text: Any) -> str:
    s = str(text).replace("\r", " ").replace("\n", " ").replace("|", "\\|")
    return s if len(s) <= MAX_CELL else s[:MAX_CELL - 1] + "…"


def label_text(example: Any) -> str:
    y = raw_label(example)
    if isinstance(y, Tensor):
        return str(y.item()) if y.numel() == 1 else f"tensor{tuple(y.shape)}"
    return "" if y is None else str(y)


def describe(value: Any) -> str:
    """A short text for a probe example when no ``decode`` is given (pictures are drawn, see :func:`pictures`)."""
    if isinstance(value, Mapping):
        if "input_ids" in value:
            ids = value["input_ids"]
            ids = ids.reshape(-1).tolist() if isinstance(ids, Tensor) else list(ids)
            return "ids " + " ".join(map(str, ids[:24])) + (" …" if len(ids) > 24 else "")
        return ", ".join(f"{k}: {describe(v)}" for k, v in list(value.items())[:3])
    if isinstance(value, (tuple, list)) and value:
        return describe(value[0])
    if isinstance(value, Tensor):
        flat = value.detach().reshape(-1)
        if flat.is_floating_point():
            shown = ", ".join(f"{x:.3g}" for x in flat[:8].tolist())
        else:
            shown = ", ".join(map(str, flat[:8].tolist()))
        more = ", …" if flat.numel() > 8 else ""
        return f"[{shown}{more}]" if value.ndim <= 1 else f"tensor{tuple(value.shape)} [{shown}{more}]"
    return repr(value)


def record(row: Row, alarm: float) -> dict[str, Any]:
    """The ``signals.jsonl`` row of a probe step."""
    return {"step": row.step, "changes": row.changes, "top1pct_share": finite(row.top1pct_share),
            "outliers": row.outliers,
            "pairs": [{"a": p.a, "b": p.b, "score": p.score, "alarm": p.alarm(alarm),
                       "correlation": p.correlation, "consistency": p.consistency, "share": p.share,
                       "gradient_cosine": finite(p.cosine), "shared_direction": finite(p.shared),
                       "relative_swing": finite(p.swing),
                       "followers": {"a": p.followers_a, "b": p.followers_b}} for p in row.pairs or ()]}


def opposing_pair_alert(rows: Sequence[Row], alarm: float) -> list[Alert]:
    """The ``signals/opposing_pair`` alert for the strongest alarming pair of the interval (none: [])."""
    best: tuple[Row, Pair] | None = None
    for row in rows:
        for p in row.pairs or ():
            if p.alarm(alarm) and (best is None or p.score >= best[1].score):
                best = (row, p)
    if best is None:
        return []
    row, p = best
    confirmed = ("their mean last-layer gradients point in opposite directions (cosine "
                 f"{p.cosine:.2f})" if math.isfinite(p.cosine) else "gradients not checked")
    message = (f"two groups of probe examples ({len(p.a)} and {len(p.b)}) move in anti-phase at step "
               f"{row.step}: correlation {p.correlation:.2f} of their mean one-step loss changes, opposite moves "
               f"at {p.consistency:.0%} of the last {row.changes} steps probed, {p.share:.0%} of the probe set's "
               f"loss movement, each side's loss swinging by {p.swing:.0%} of itself per step; the two sides "
               f"deviate from the rest of their classes in the same direction of the model's representation "
               f"(cosine {p.shared:.2f}): a feature they share; score {p.score:.2f} >= alarm {alarm:g}; {confirmed}")
    evidence = {"step": row.step, "a": p.a, "b": p.b, "correlation": p.correlation,
                "consistency": p.consistency, "share": p.share, "score": p.score, "alarm": alarm,
                "gradient_cosine": finite(p.cosine), "shared_direction": finite(p.shared),
                "relative_swing": finite(p.swing), "window": row.changes,
                "top1pct_share": finite(row.top1pct_share)}
    remedies = [
        "look at the two groups in the signals/pairs text table (dataset indices a and b): a feature they "
        "share (a background, a token, an artefact, a duplicate with another label) is being learnt and "
        "unlearnt in turn",
        "lower the learning rate or lengthen the warmup (the oscillation is the edge of stability along "
        "that feature's direction); gradient clipping bounds the swings",
        "an adaptive optimizer (Adam) or momentum damps such oscillations better than plain SGD "
        "(Rosenfeld and Risteski 2023)",
        "break the shortcut in the data: augment or rebalance the feature across labels, or fix mislabelled "
        "examples",
        f"if this is expected, raise SignalsConfig(alarm={alarm:g}) toward 1",
    ]
    return [Alert(rule="signals/opposing_pair", severity="warning", message=message, evidence=evidence,
                  remedies=remedies)]


def pairs_table(row: Row, alarm: float, examples: Mapping[int, Any], current: Mapping[int, float],
                show: Callable[[Any, tuple[int, int] | None], str],
                where: Mapping[int, tuple[int, int]] | None = None) -> str:
    """The pairs of ``row`` as a markdown table. ``current``: dataset index -> its latest loss; ``show``: how an
    example is written; ``where``: dataset index -> (row, column) in ``signals/pair_examples``."""
    where = where or {}
    if row.pairs is None:
        return (f"step {row.step}: {len(row.outliers)} outliers; pairs need {MIN_CHANGES_FOR_PAIRS} loss "
                f"changes, the window has {row.changes}")
    if not row.pairs:
        return f"step {row.step}: {len(row.outliers)} outliers, no opposing pair"
    lines = [f"step {row.step}: {len(row.pairs)} opposing pair(s), alarm at score >= {alarm:g}"
             + ("; the examples are pictured in the image signals/pair_examples (a row per side)" if where else ""),
             "", "| pair | score | side | dataset index | label | loss | example |",
             "|---|---|---|---|---|---|---|"]
    for n, p in enumerate(row.pairs[:MAX_PAIRS_SHOWN], 1):
        shared = f"{p.shared:.2f}" if math.isfinite(p.shared) else "undefined"
        followers = len(p.followers_a) + len(p.followers_b)
        head = (f"{p.score:.2f}{' (alarm)' if p.alarm(alarm) else ''}, corr {p.correlation:.2f}, "
                f"share {p.share:.0%}, shared direction {shared}"
                + (f", {followers} follower(s) left out (in signals.jsonl)" if followers else ""))
        for side, members in (("a", p.a), ("b", p.b)):
            for k, idx in enumerate(members[:MAX_EXAMPLES_SHOWN]):
                ex = examples.get(idx)
                loss = current.get(idx)
                lines.append(f"| {n if k == 0 else ''} | {head if k == 0 and side == 'a' else ''} | "
                             f"{side} ({len(members)})" + " | " +
                             f"{idx} | {cell(label_text(ex)) if ex is not None else ''} | "
                             f"{'' if loss is None else f'{loss:.4g}'} | {cell(show(ex, where.get(idx)))} |")
            if len(members) > MAX_EXAMPLES_SHOWN:
                lines.append(f"| | | {side} | … {len(members) - MAX_EXAMPLES_SHOWN} more | | | |")
    if len(row.pairs) > MAX_PAIRS_SHOWN:
        lines.append(f"\n{len(row.pairs) - MAX_PAIRS_SHOWN} weaker pair(s) in signals.jsonl")
    return "\n".join(lines)


def pictures(row: Row, examples: Mapping[int, Any]) -> tuple[Tensor, dict[int, tuple[int, int]]] | None:
    """The thumbnails of the shown pairs' examples when they are pictures: a grid with one row per side
    (pair 1 a, pair 1 b, pair 2 a, ...), and where each dataset index sits in it (row, column; 1-based)."""
    shown = (row.pairs or [])[:MAX_PAIRS_SHOWN]
    grid: list[list[Tensor]] = []
    where: dict[int, tuple[int, int]] = {}
    for p in shown:
        for members in (p.a, p.b):
            drawn = []
            for idx in members[:MAX_EXAMPLES_SHOWN]:
                picture = as_image(examples.get(idx))
                if picture is None:
                    return None  # not pictures: the table's text is all there is
                drawn.append(picture)
                where.setdefault(idx, (len(grid) + 1, len(drawn)))
            grid.append(drawn)
    return (thumbnail_grid(grid), where) if grid else None
