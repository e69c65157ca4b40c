"""Opposing signals as a torchmetric (family ``signals``): the training examples that pull the network apart.

Rosenfeld and Risteski 2023, "Outliers with opposing signals have an outsized effect on neural network
optimization". Every ``every`` steps, after the optimizer step, the per-example losses of the shared probe
set are evaluated (forward only, eval mode, no grad, RNG forked, through the inferred per-example loss or
the user's ``loss_fn``). The losses of the last ``window + 1`` probe steps are carried state (they survive
resets and are saved with checkpoints); from their changes :func:`gradwatch.functional.signals.find_opposing_signals`
finds the outliers, their groups and the pairs of groups in anti-phase (formulas there). A pair whose
score reaches ``alarm`` is confirmed, where the model allows, by the cosine of the two sides' mean
last-layer gradients (one extra pass with gradients over the probe batches holding the pair); a pair
whose gradients turn out not to oppose (cosine >= 0) does not raise the alarm.

Tags (the last probe step of the logging interval): ``signals/outliers`` (count), ``signals/top1pct_share``,
``signals/opposing_score`` (score of the strongest pair, 0 when there is none), ``signals/pairs`` (count),
``signals/alarm`` (0 or 1), ``signals/pair_loss/a`` and ``signals/pair_loss/b`` (mean current loss of each
side of the strongest pair). NaN where undefined: everything before two probe steps, the pair tags
before :data:`~gradwatch.functional.signals.MIN_CHANGES_FOR_PAIRS` changes, the pair losses without a
pair. ``signals.jsonl`` gets one row per probe step that has a change; the text ``signals/pairs`` is a
table of the current pairs with dataset indices, labels and the examples (through ``decode``).

Ranks: the probe batches are split in contiguous blocks across ranks (inside an extra pass a forward is
local: FSDP2 modules are unsharded for the pass), each rank computes its block's losses, and the blocks are
gathered in probe order, so every rank holds the same window and makes the same report (rank zero's is
written). The confirmation pass is decided from that shared window, so every rank enters it or none does.

Cost: one forward pass over the probe set per probe step (no grad), plus the detection on the CPU (a few
milliseconds for 512 examples), plus, while a pair is alarming, a forward with grad over the probe batches
holding it and two backwards down to the last layer, once per ``window`` probe steps for the same pair.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from gradwatch.config import Cadence, as_cadence, check_bool, check_float, check_int, fail
from gradwatch.functional.signals import (
    MIN_CHANGES_FOR_PAIRS,
    OpposingPair,
    find_opposing_signals,
    gradient_cosine,
)
from gradwatch.functional.thumbnails import as_image, thumbnail_grid
from gradwatch.metrics.base import Alert, ChartGroup, Diagnostic, Results, StepContext
from gradwatch.registry import BuildInputs, Family

TAGS: tuple[str, ...] = ("signals/outliers", "signals/top1pct_share", "signals/opposing_score", "signals/pairs",
                         "signals/alarm", "signals/pair_loss/a", "signals/pair_loss/b")
WINDOW_RANGE = (MIN_CHANGES_FOR_PAIRS, 1000)
MAX_PAIRS_SHOWN = 3
MAX_EXAMPLES_SHOWN = 8
MAX_CELL = 120


@dataclass(frozen=True)
class SignalsConfig:
    """Opposing signals (family ``signals``, Rosenfeld and Risteski 2023), on the shared probe set.

    Attributes:
        every: cadence of the probe steps (one forward pass over the probe set each). The default,
            ``Cadence.within_budget(minimum=10)``, probes at step 1 and then as often as the overhead budget
            allows, at most every 10 steps: the engine measures a probe step against a training step (about
            ``probe_size / batch`` forwards against one forward and backward) and spaces them evenly. Give an
            int (``every=10``) for a fixed cadence.
        window: loss changes kept (``window + 1`` probe steps), 5..1000; groups and pairs are read from the
            change series over this window (pairs once it holds at least 5 changes).
        alarm: pair score in (0, 1] from which a pair raises the alarm (``signals/alarm``, an alert). The
            default 0.6 needs, e.g., a correlation of -0.8 with opposite moves at 3 of 4 steps by a pair
            carrying half the loss movement.
        probe_size: probe examples used (the engine draws the largest any family asks for).
        z_cut: robust z-score of an example's movement from which it is an outlier (3.5: Iglewicz and
            Hoaglin 1993).
        rho: correlation in (0, 1) from which two outliers' change series are in one group; two groups are
            a pair when their mean series correlate at most ``-rho``.
        min_group: smallest group (examples).
        max_outliers: at most this many outliers (the most extreme) are grouped and recorded.
        full_share: share in (0, 1] of the probe set's loss movement at which a pair's strength is full.
        confirm: confirm an alarming pair by the cosine of its two sides' mean last-layer gradients.
        batch_size: probe batch size for the loss passes (None: the engine's).
        decode: ``decode(example) -> str`` shows a raw probe example in the pairs table (e.g. a tokenizer's
            decode of its ``input_ids``); None: a short description of its tensors.
    """

    every: int | Cadence = Cadence.within_budget(minimum=10)
    window: int = 20
    alarm: float = 0.6
    probe_size: int = 512
    z_cut: float = 3.5
    rho: float = 0.8
    min_group: int = 2
    max_outliers: int = 128
    full_share: float = 0.5
    confirm: bool = True
    batch_size: int | None = None
    decode: Callable[[Any], str] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "every", as_cadence("SignalsConfig.every", self.every))
        low, high = WINDOW_RANGE
        if isinstance(self.window, bool) or not isinstance(self.window, int) or not low <= self.window <= high:
            raise fail("SignalsConfig.window", self.window, f"an int in {low}..{high} (loss changes kept)")
        check_float("SignalsConfig.alarm", self.alarm, low=0.0, high=1.0)
        check_int("SignalsConfig.probe_size", self.probe_size, minimum=8)
        check_float("SignalsConfig.z_cut", self.z_cut, low=0.0, high=100.0)
        check_float("SignalsConfig.rho", self.rho, low=0.0, high=1.0)
        if self.rho >= 1.0:
            raise fail("SignalsConfig.rho", self.rho, "a number in (0.0, 1.0)")
        check_int("SignalsConfig.min_group", self.min_group, minimum=1)
        check_int("SignalsConfig.max_outliers", self.max_outliers, minimum=2)
        check_float("SignalsConfig.full_share", self.full_share, low=0.0, high=1.0)
        check_bool("SignalsConfig.confirm", self.confirm)
        if self.batch_size is not None:
            check_int("SignalsConfig.batch_size", self.batch_size, minimum=1)
        if self.decode is not None and not callable(self.decode):
            raise fail("SignalsConfig.decode", self.decode, "a callable decode(example) -> str, or None")


# ---- one probe step, as a row of numbers (the interval state is one flat tensor of such rows) -----------


@dataclass
class _Pair:
    a: list[int]  # dataset indices
    b: list[int]
    correlation: float
    consistency: float
    share: float
    score: float
    cosine: float = math.nan

    def alarm(self, threshold: float) -> bool:
        return self.score >= threshold and not (math.isfinite(self.cosine) and self.cosine >= 0)


@dataclass
class _Row:
    step: int
    changes: int  # W in the window (0: nothing known yet)
    top1pct_share: float
    loss_a: float
    loss_b: float
    outliers: list[int]  # dataset indices, most extreme first
    pairs: list[_Pair] | None  # None: too few changes for pairs

    def encode(self, position: Mapping[int, int]) -> Tensor:
        """The row as numbers; examples as their positions in the probe (small ints, exact in any float dtype
        a state may be cast to, where a dataset index may not be)."""
        pos = lambda ids: [position[i] for i in ids]  # noqa: E731
        out: list[float] = [self.step, self.changes, self.top1pct_share, self.loss_a, self.loss_b,
                            len(self.outliers), *pos(self.outliers), -1 if self.pairs is None else len(self.pairs)]
        for p in self.pairs or ():
            out += [len(p.a), *pos(p.a), len(p.b), *pos(p.b), p.correlation, p.consistency, p.share, p.score,
                    p.cosine]
        return torch.tensor(out, dtype=torch.float64)

    @staticmethod
    def decode(row: Tensor, indices: Sequence[int]) -> _Row:
        """:meth:`encode` undone, positions mapped back to the dataset ``indices`` of the probe."""
        v = row.detach().cpu().double().tolist()
        ids = lambda xs: [indices[int(round(x))] for x in xs]  # noqa: E731
        n_out = int(v[5])
        i = 6 + n_out
        outs = ids(v[6:i])
        n_pairs = int(v[i])
        i += 1
        pairs: list[_Pair] | None = None if n_pairs < 0 else []
        for _ in range(max(0, n_pairs)):
            na = int(v[i])
            a = ids(v[i + 1:i + 1 + na])
            i += 1 + na
            nb = int(v[i])
            b = ids(v[i + 1:i + 1 + nb])
            i += 1 + nb
            pairs.append(_Pair(a, b, *v[i:i + 5]))  # type: ignore[union-attr]
            i += 5
        return _Row(int(v[0]), int(v[1]), v[2], v[3], v[4], outs, pairs)


# ---- the diagnostic --------------------------------------------------------------------------------


def _cell(text: Any) -> str:
    s = str(text).replace("\r", " ").replace("\n", " ").replace("|", "\\|")
    return s if len(s) <= MAX_CELL else s[:MAX_CELL - 1] + "…"


def _label(example: Any) -> str:
    y: Any = None
    if isinstance(example, Mapping):
        y = example.get("labels", example.get("label"))
    elif isinstance(example, (tuple, list)) and len(example) >= 2:
        y = example[1]
    if isinstance(y, Tensor):
        return str(y.item()) if y.numel() == 1 else f"tensor{tuple(y.shape)}"
    return "" if y is None else str(y)


def _describe(value: Any) -> str:
    """A short text for a probe example when no ``decode`` is given (pictures are drawn, see ``_pictures``)."""
    if isinstance(value, Mapping):
        if "input_ids" in value:
            ids = value["input_ids"]
            ids = ids.reshape(-1).tolist() if isinstance(ids, Tensor) else list(ids)
            return "ids " + " ".join(map(str, ids[:24])) + (" …" if len(ids) > 24 else "")
        return ", ".join(f"{k}: {_describe(v)}" for k, v in list(value.items())[:3])
    if isinstance(value, (tuple, list)) and value:
        return _describe(value[0])
    if isinstance(value, Tensor):
        flat = value.detach().reshape(-1)
        if flat.is_floating_point():
            shown = ", ".join(f"{x:.3g}" for x in flat[:8].tolist())
        else:
            shown = ", ".join(map(str, flat[:8].tolist()))
        more = ", …" if flat.numel() > 8 else ""
        return f"[{shown}{more}]" if value.ndim <= 1 else f"tensor{tuple(value.shape)} [{shown}{more}]"
    return repr(value)


def _last_layer_name(model: nn.Module) -> str | None:
    """The weight the confirmation reads: the output embeddings of a model that declares them (Hugging
    Face's ``get_output_embeddings``), else the last 2-D trainable parameter."""
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            head = getter()
        except Exception:  # noqa: BLE001 - a model may not implement it
            head = None
        weight = getattr(head, "weight", None)
        if isinstance(weight, Tensor):
            for name, p in model.named_parameters(remove_duplicate=False):
                if p is weight:
                    return name
    name = None
    for n, p in model.named_parameters():
        if p.ndim == 2 and p.requires_grad:
            name = n
    return name


class OpposingSignals(Diagnostic):
    """Outliers with opposing signals on the probe set (module docstring; math in ``functional/signals.py``).

    ``update(losses, step, indices=None)`` takes the whole probe set's per-example losses at one probe step
    (shape [N], in probe order) with the probe's dataset indices; ``compute()`` reports the interval's last
    probe step (scalars, pairs table), every probe step of the interval (``signals`` records) and an alert
    for the strongest alarming pair of the interval.
    """

    stem = "signals"
    needs = frozenset({"probe"})
    runs_on = "all_ranks"
    phase = "step_end"

    def __init__(self, config: SignalsConfig | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.config = config if config is not None else SignalsConfig()
        if not isinstance(self.config, SignalsConfig):
            raise fail("config", config, "a gradwatch.SignalsConfig")
        # interval state: one encoded row per probe step (``_Row.encode``), each prefixed by its length
        self.add_state("rows", default=torch.zeros(0, dtype=torch.float64), dist_reduce_fx="cat", persistent=True)
        # carried state (see carried_state): the window of probe losses, oldest first, on the CPU in float64
        self._losses = torch.zeros(0, 0, dtype=torch.float64)
        self._steps: list[int] = []
        self._indices: list[int] = []
        self._examples: dict[int, Any] = {}
        self._decode: Callable[[Any], str] | None = self.config.decode
        self._warned: set[str] = set()
        self._confirmed: tuple[set[int], set[int], float, int] | None = None  # (a, b, cosine, probe steps ago)

    # ---- cadence and declarations -----------------------------------------------------------------

    def observe_cadence(self) -> Cadence:
        return self.config.every  # type: ignore[return-value]

    def probe_size(self) -> int:
        return self.config.probe_size

    def charts(self) -> Sequence[ChartGroup]:
        return (ChartGroup("signals", "pair losses (a, b)", ("signals/pair_loss/a", "signals/pair_loss/b")),
                ChartGroup("signals", "opposing score and alarm", ("signals/opposing_score", "signals/alarm")),
                ChartGroup("signals", "outliers and pairs", ("signals/outliers", "signals/pairs")),
                ChartGroup("signals", "share of loss change in the top 1%", ("signals/top1pct_share",)))

    def failed_result(self) -> Results:
        return Results(scalars={t: torch.tensor(math.nan, dtype=torch.float64) for t in TAGS})

    # ---- observe: the probe losses on every rank, gathered in probe order ---------------------------

    def observe(self, ctx: StepContext) -> None:
        probe = ctx.probe()
        batches = probe.batches(batch_size=self.config.batch_size)
        mine = self._my_batches(len(batches), ctx.rank, ctx.world_size)
        with ctx.extra_pass(grad=False) as extra:
            local = [probe.per_example_loss(extra.model, extra.cast(batches[j])).detach().reshape(-1).float()
                     for j in mine]
        sizes, losses = self._gather(ctx, local, getattr(probe, "device", None))
        if losses.numel() != len(probe):
            raise ValueError(f"gradwatch: signals expected {len(probe)} per-example losses (one per probe "
                             f"example), got {losses.numel()}; a loss_fn must return a Tensor[batch_size]")
        self._examples = dict(zip(probe.indices, probe.examples))
        self._decode = self.config.decode or getattr(probe, "decode", None)
        self.update(losses, ctx.step, probe.indices)
        if self.config.confirm:
            self._confirm_last(ctx, probe, batches, mine, sizes, [t.numel() for t in local])

    @staticmethod
    def _my_batches(n: int, rank: int, world: int) -> list[int]:
        """This rank's contiguous block of the ``n`` probe batches (``ceil(n / world)`` of them, fewer at the
        end). Inside an extra pass a forward is local (FSDP2 modules are unsharded for the pass), so the
        blocks need not be equal."""
        per = -(-n // max(1, world))
        return list(range(min(n, rank * per), min(n, (rank + 1) * per)))

    @staticmethod
    def _gather(ctx: StepContext, local: list[Tensor], device: Any = None) -> tuple[list[int], Tensor]:
        """(every rank's block size, the probe's losses in probe order), the same on every rank (the blocks
        are contiguous and in rank order; ``all_gather`` takes 1-d tensors of different lengths)."""
        mine = torch.cat(local) if local else torch.zeros(0, device=device)
        blocks = [mine] if ctx.world_size <= 1 else ctx.all_gather(mine)
        return [b.numel() for b in blocks], torch.cat([b.to(mine.device) for b in blocks])

    def _confirm_last(self, ctx: StepContext, probe: Any, batches: list[Any], mine: list[int], sizes: list[int],
                      lengths: list[int]) -> None:
        """Cosine of the mean last-layer gradients of the two sides of the strongest alarming pair of the
        latest row, written into that row.

        Each side's mean gradient is the gradient of its mean loss (one backward per side per probe batch
        holding members of the pair, down to the last layer only), summed over ranks. A pair that stays (both
        sides overlapping the last confirmed one by a Jaccard index of at least 0.8) keeps its cosine and is
        confirmed again after ``window`` probe steps. Every rank takes the same decisions (the rows are the
        same everywhere), so the pass (a collective under FSDP2) lines up.
        """
        rows = self._rows()
        if not rows:
            return
        row = rows[-1]
        target = next((p for p in row.pairs or () if p.alarm(self.config.alarm)), None)
        name = None if target is None else _last_layer_name(ctx.model)
        if target is None or name is None:
            return
        if self._confirmed is not None:
            a, b, cosine, age = self._confirmed
            if age < self.config.window and _same_side(a, target.a) and _same_side(b, target.b):
                self._confirmed = (a, b, cosine, age + 1)
                target.cosine = cosine
                self._replace_last(row)
                return
        position = {idx: k for k, idx in enumerate(self._indices)}
        side = torch.zeros(len(self._indices), dtype=torch.long)
        side[[position[i] for i in target.a]] = 1
        side[[position[i] for i in target.b]] = 2
        start = sum(sizes[:ctx.rank])
        lengths = list(lengths)
        grads: list[Tensor | None] = [None, None]
        with ctx.extra_pass(grad=True) as extra:
            weight = extra.params.get(name)
            if weight is None or not weight.requires_grad:
                return
            for j in mine:
                n = lengths.pop(0)
                here = side[start:start + n]
                start += n
                if not bool((here > 0).any()):
                    continue
                loss = probe.per_example_loss(extra.model, extra.cast(batches[j])).reshape(-1)
                here = here.to(loss.device)
                for k, (count, code) in enumerate(((len(target.a), 1), (len(target.b), 2))):
                    mask = (here == code).to(loss.dtype)
                    if not bool(mask.any()):
                        continue
                    (g,) = torch.autograd.grad((loss * mask).sum() / count, weight, retain_graph=k == 0,
                                               allow_unused=True)
                    if g is not None:
                        grads[k] = g.detach() if grads[k] is None else grads[k] + g.detach()
            ga = grads[0] if grads[0] is not None else torch.zeros_like(weight.detach())
            gb = grads[1] if grads[1] is not None else torch.zeros_like(weight.detach())
        if ctx.world_size > 1:
            ga, gb = ctx.all_reduce(ga.clone()), ctx.all_reduce(gb.clone())
        target.cosine = float(gradient_cosine(ga, gb))
        self._confirmed = (set(target.a), set(target.b), target.cosine, 1)
        self._replace_last(row)

    # ---- update / compute -------------------------------------------------------------------------

    def update(self, losses: Tensor, step: int, indices: Sequence[int] | Tensor | None = None) -> None:  # type: ignore[override]
        """Add the probe's per-example losses [N] at ``step`` to the window and record what it shows."""
        cfg = self.config
        x = losses.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
        idx = list(range(x.numel())) if indices is None else [int(i) for i in (indices.tolist() if isinstance(indices, Tensor) else indices)]
        if len(idx) != x.numel():
            raise ValueError(f"gradwatch: signals got {x.numel()} losses for {len(idx)} probe indices")
        step = int(step)
        if idx != self._indices:
            self._losses, self._steps, self._indices = x.new_zeros(0, x.numel()), [], idx
        keep = [k for k, s in enumerate(self._steps) if s < step]  # a run resumed from an earlier step
        if len(keep) < len(self._steps):
            self._losses, self._steps = self._losses[keep], [self._steps[k] for k in keep]
        if not torch.isfinite(x).all():
            self._warn_once("nonfinite", f"gradwatch: signals: per-example losses are not finite at step {step}; "
                                         "the window starts again")
            self._losses, self._steps = x.new_zeros(0, x.numel()), []
            self._append(_Row(step, 0, math.nan, math.nan, math.nan, [], None))
            return
        self._losses = torch.cat([self._losses, x[None]])[-(cfg.window + 1):]
        self._steps = (self._steps + [step])[-(cfg.window + 1):]
        if self._losses.shape[0] < 2:
            self._append(_Row(step, 0, math.nan, math.nan, math.nan, [], None))
            return
        rep = find_opposing_signals(self._losses, z_cut=cfg.z_cut, rho=cfg.rho, min_group=cfg.min_group,
                                    max_outliers=cfg.max_outliers, full_share=cfg.full_share)
        pairs = None if rep.pairs is None else [self._pair(p) for p in rep.pairs]
        loss_a = loss_b = math.nan
        if rep.pairs:
            loss_a = float(x[list(rep.pairs[0].a)].mean())
            loss_b = float(x[list(rep.pairs[0].b)].mean())
        self._append(_Row(step, rep.changes, rep.top1pct_share, loss_a, loss_b, [idx[p] for p in rep.outliers],
                          pairs))

    def _append(self, row: _Row) -> None:
        code = row.encode({idx: k for k, idx in enumerate(self._indices)})
        code = torch.cat([code.new_tensor([code.numel()]), code]).to(self.rows.device, self.rows.dtype)
        self.rows = torch.cat([self.rows, code])

    def _rows(self) -> list[_Row]:
        flat, out, i = self.rows.detach().cpu(), [], 0
        while i < flat.numel():
            n = int(flat[i])
            out.append(_Row.decode(flat[i + 1:i + 1 + n], self._indices))
            i += 1 + n
        return out

    def _replace_last(self, row: _Row) -> None:
        flat, i, last = self.rows.detach().cpu(), 0, 0
        while i < flat.numel():
            last, i = i, i + 1 + int(flat[i])
        self.rows = self.rows[:last]
        self._append(row)

    def _pair(self, p: OpposingPair) -> _Pair:
        return _Pair([self._indices[i] for i in p.a], [self._indices[i] for i in p.b], p.correlation,
                     p.consistency, p.share, p.score)

    def compute(self) -> Results:
        rows = self._rows()
        if not rows:
            return self.failed_result()
        alarm = self.config.alarm
        last = rows[-1]
        nan = math.nan
        if last.changes == 0:
            values = [nan] * len(TAGS)
        else:
            values = [float(len(last.outliers)), last.top1pct_share, nan, nan, nan, last.loss_a, last.loss_b]
            if last.pairs is not None:
                values[2] = max((p.score for p in last.pairs), default=0.0)
                values[3] = float(len(last.pairs))
                values[4] = float(any(p.alarm(alarm) for p in last.pairs))
        device = self.rows.device
        scalars = {t: torch.tensor(v, dtype=torch.float64, device=device) for t, v in zip(TAGS, values)}
        records = [self._record(r) for r in rows if r.changes > 0]
        pictures = self._pictures(last) if last.changes > 0 else None
        where = pictures[1] if pictures is not None else {}
        texts = {"signals/pairs": self._table(last, where)} if last.changes > 0 else {}
        images = {"signals/pair_examples": pictures[0]} if pictures is not None else {}
        return Results(scalars=scalars, records={"signals": records}, texts=texts, alerts=self._alerts(rows),
                       images=images)

    def _record(self, row: _Row) -> dict[str, Any]:
        alarm = self.config.alarm
        return {"step": row.step, "changes": row.changes, "top1pct_share": _finite(row.top1pct_share),
                "outliers": row.outliers,
                "pairs": [{"a": p.a, "b": p.b, "score": p.score, "alarm": p.alarm(alarm),
                           "correlation": p.correlation, "consistency": p.consistency, "share": p.share,
                           "gradient_cosine": _finite(p.cosine)} for p in row.pairs or ()]}

    def _alerts(self, rows: list[_Row]) -> list[Alert]:
        alarm = self.config.alarm
        best: tuple[_Row, _Pair] | None = None
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
                   f"{row.step}: correlation {p.correlation:.2f} of their mean loss changes, opposite moves at "
                   f"{p.consistency:.0%} of the last {row.changes} probe steps, {p.share:.0%} of the probe set's "
                   f"loss movement; score {p.score:.2f} >= alarm {alarm:g}; {confirmed}")
        evidence = {"step": row.step, "a": p.a, "b": p.b, "correlation": p.correlation,
                    "consistency": p.consistency, "share": p.share, "score": p.score, "alarm": alarm,
                    "gradient_cosine": _finite(p.cosine), "window": row.changes,
                    "top1pct_share": _finite(row.top1pct_share)}
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

    def _table(self, row: _Row, where: Mapping[int, tuple[int, int]] | None = None) -> str:
        """The pairs as a markdown table; ``where``: dataset index -> (row, column) in signals/pair_examples."""
        where = where or {}
        if row.pairs is None:
            return (f"step {row.step}: {len(row.outliers)} outliers; pairs need {MIN_CHANGES_FOR_PAIRS} loss "
                    f"changes, the window has {row.changes}")
        if not row.pairs:
            return f"step {row.step}: {len(row.outliers)} outliers, no opposing pair"
        current = dict(zip(self._indices, self._losses[-1].tolist())) if len(self._steps) and \
            self._steps[-1] == row.step else {}
        lines = [f"step {row.step}: {len(row.pairs)} opposing pair(s), alarm at score >= {self.config.alarm:g}"
                 + ("; the examples are pictured in the image signals/pair_examples (a row per side)" if where else ""),
                 "", "| pair | score | side | dataset index | label | loss | example |",
                 "|---|---|---|---|---|---|---|"]
        for n, p in enumerate(row.pairs[:MAX_PAIRS_SHOWN], 1):
            head = (f"{p.score:.2f}{' (alarm)' if p.alarm(self.config.alarm) else ''}, corr {p.correlation:.2f}, "
                    f"share {p.share:.0%}")
            for side, members in (("a", p.a), ("b", p.b)):
                for k, idx in enumerate(members[:MAX_EXAMPLES_SHOWN]):
                    ex = self._examples.get(idx)
                    loss = current.get(idx)
                    lines.append(f"| {n if k == 0 else ''} | {head if k == 0 and side == 'a' else ''} | "
                                 f"{side} ({len(members)})" + " | " +
                                 f"{idx} | {_cell(_label(ex)) if ex is not None else ''} | "
                                 f"{'' if loss is None else f'{loss:.4g}'} | {_cell(self._show(ex, where.get(idx)))} |")
                if len(members) > MAX_EXAMPLES_SHOWN:
                    lines.append(f"| | | {side} | … {len(members) - MAX_EXAMPLES_SHOWN} more | | | |")
        if len(row.pairs) > MAX_PAIRS_SHOWN:
            lines.append(f"\n{len(row.pairs) - MAX_PAIRS_SHOWN} weaker pair(s) in signals.jsonl")
        return "\n".join(lines)

    def _pictures(self, row: _Row) -> tuple[Tensor, dict[int, tuple[int, int]]] | None:
        """The thumbnails of the shown pairs' examples when they are pictures: a grid with one row per side
        (pair 1 a, pair 1 b, pair 2 a, ...), and where each dataset index sits in it (row, column; 1-based)."""
        shown = (row.pairs or [])[:MAX_PAIRS_SHOWN]
        rows: list[list[Tensor]] = []
        where: dict[int, tuple[int, int]] = {}
        for p in shown:
            for members in (p.a, p.b):
                pictures = []
                for idx in members[:MAX_EXAMPLES_SHOWN]:
                    picture = as_image(self._examples.get(idx))
                    if picture is None:
                        return None  # not pictures: the table's text is all there is
                    pictures.append(picture)
                    where.setdefault(idx, (len(rows) + 1, len(pictures)))
                rows.append(pictures)
        return (thumbnail_grid(rows), where) if rows else None

    def _show(self, example: Any, pictured: tuple[int, int] | None = None) -> str:
        if example is None:
            return ""
        if pictured is not None and self._decode is None:
            picture = as_image(example)
            shape = "x".join(map(str, picture.shape)) if picture is not None else ""
            return f"picture {shape}: signals/pair_examples row {pictured[0]}, column {pictured[1]}"
        if self._decode is not None:
            try:
                return str(self._decode(example))
            except Exception as exc:  # noqa: BLE001 - a user's decode must not stop the report
                self._warn_once("decode", f"gradwatch: signals: decode(example) failed ({exc!r}); showing the "
                                          "raw example")
        return _describe(example)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    # ---- carried state ------------------------------------------------------------------------------

    def carried_state(self) -> dict[str, Any]:
        return {"losses": self._losses.clone(), "steps": torch.tensor(self._steps, dtype=torch.long),
                "indices": torch.tensor(self._indices, dtype=torch.long)}

    def load_carried_state(self, state: Mapping[str, Any]) -> None:
        losses = torch.as_tensor(state.get("losses", torch.zeros(0, 0))).detach().to("cpu", torch.float64)
        steps = [int(s) for s in torch.as_tensor(state.get("steps", torch.zeros(0))).reshape(-1).tolist()]
        indices = [int(i) for i in torch.as_tensor(state.get("indices", torch.zeros(0))).reshape(-1).tolist()]
        if losses.ndim != 2 or losses.shape[0] != len(steps) or (len(steps) and losses.shape[1] != len(indices)):
            raise ValueError(f"gradwatch: signals carried state expected losses [steps, examples] matching "
                             f"{len(steps)} steps and {len(indices)} indices, got {tuple(losses.shape)}")
        keep = self.config.window + 1
        self._losses, self._steps, self._indices = losses[-keep:], steps[-keep:], indices


def _same_side(known: set[int], side: Sequence[int], at_least: float = 0.8) -> bool:
    """Whether ``side`` is the same group as ``known``: Jaccard index |known & side| / |known | side| >= at_least."""
    new = set(side)
    return len(known & new) >= at_least * len(known | new)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _build(config: SignalsConfig, inputs: BuildInputs) -> list[Diagnostic]:
    return [OpposingSignals(config)]


FAMILY = Family(key="signals", stem="signals", config_class=SignalsConfig, default_on=False, build=_build,
                summary="per-example loss changes on the probe set: outliers and pairs of groups with opposing "
                        "signals (Rosenfeld and Risteski 2023)",
                knobs=("window", "alarm", "probe_size"))

__all__ = ["FAMILY", "TAGS", "OpposingSignals", "SignalsConfig"]
