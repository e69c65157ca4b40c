"""Opposing signals as a torchmetric (family ``signals``): the training examples that pull the network apart.

Rosenfeld and Risteski 2023, "Outliers with opposing signals have an outsized effect on neural network
optimization". At each due step a **burst** begins: after the optimizer step the per-example losses of the
shared probe set are evaluated (forward only, eval mode, no grad, RNG forked, through the inferred
per-example loss or the user's ``loss_fn``), and again after each of the next ``burst`` steps, so that every
loss change is over one optimizer step (the paper's quantity; the engine runs a burst's steps through
:meth:`Diagnostic.continues`). The last ``window`` one-step changes are carried state (they survive resets
and are saved with checkpoints); from them :func:`gradwatch.functional.signals.opposing_signals` finds the
outliers, their groups and the pairs of groups in anti-phase, and scores each pair by its opposition, its
share of the loss movement, whether its two sides share a direction in the model's representation (the
input embeddings' output or the first layer's input, read by a hook during the probe forward; formulas
there) and how far they swing
against their own loss. A pair whose score reaches ``alarm`` is confirmed, where the model allows, by the
cosine of the two sides' mean last-layer gradients (one extra pass with gradients over the probe batches
holding the pair); a pair whose gradients turn out not to oppose (cosine >= 0) does not raise the alarm.

Tags (the last probe step of the logging interval that added a change; the first probe step of a burst
logs nothing): ``signals/outliers`` (count), ``signals/top1pct_share``, ``signals/opposing_score`` (score
of the strongest pair, 0 when there is none), ``signals/pairs`` (count), ``signals/alarm`` (0 or 1),
``signals/pair_loss/a`` and ``signals/pair_loss/b`` (mean current loss of each side of the strongest
pair). NaN where undefined: the pair tags before
:data:`~gradwatch.functional.signals.MIN_CHANGES_FOR_PAIRS` changes, the pair losses without a pair.
``signals.jsonl`` gets one row per probe step that adds a change (fields ``step``, ``changes``,
``top1pct_share``, ``outliers``, ``pairs``: ``a``, ``b``, ``score``, ``alarm``, ``correlation``,
``consistency``, ``share``, ``gradient_cosine``, ``shared_direction``, ``relative_swing``, ``followers``);
the text
``signals/pairs`` is a table of the current pairs with dataset indices, labels and the examples.

Ranks: the probe batches are split in contiguous blocks across ranks (under FSDP2 the forward is FSDP2's own
sharded one, a collective, so a rank with a shorter block runs stand-in forwards to keep in step), each rank
computes its block's losses and
representations, and the blocks are gathered in probe order (the representations only when a pair needs
them), so every rank holds the same window and makes the same report (rank zero's is written). Decisions
that lead to collectives (a burst going on, the representation gather, the confirmation pass) are taken
from that shared window, so every rank takes them together.

Cost: a burst is ``burst + 1`` forward passes over the probe set (no grad), plus the detection on the CPU
(a few milliseconds for 512 examples), plus, while a pair is alarming, a forward with grad over the probe
batches holding it and two backwards down to the last layer, once per ``window`` probe steps for the
same pair.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from gradwatch.cadence import Cadence
from gradwatch.checks import fail
from gradwatch.functional.signals import OpposingPair, gradient_cosine, opposing_signals
from gradwatch.functional.thumbnails import as_image
from gradwatch.metrics.base import ChartGroup, Diagnostic, PassRefused, Results, StepContext
from gradwatch.metrics.signals.config import SignalsConfig
from gradwatch.metrics.signals.display import describe, opposing_pair_alert, pairs_table, pictures, record
from gradwatch.metrics.signals.representation import LayerInputs, class_key, last_layer_name
from gradwatch.metrics.signals.rows import Pair, Row, append_row, decode_rows, drop_last_row

TAGS: tuple[str, ...] = ("signals/outliers", "signals/top1pct_share", "signals/opposing_score", "signals/pairs",
                         "signals/alarm", "signals/pair_loss/a", "signals/pair_loss/b")

Features = Tensor | Callable[[], Tensor | None] | None


class OpposingSignals(Diagnostic):
    """Outliers with opposing signals on the probe set (module docstring; math in ``functional/signals.py``).

    ``update(losses, step, indices=None, features=None, labels=None)`` takes the whole probe set's
    per-example losses at one probe step (shape [N], in probe order) with the probe's dataset indices, and
    optionally each example's representation [N, H] (or a callable giving it, called only when a pair needs
    it) and label; a change enters the window when the previous probe step was ``step - 1``. ``compute()``
    reports the interval's last probe step (scalars, pairs table), every probe step of the interval that
    added a change (``signals`` records) and an alert for the strongest alarming pair of the interval.
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
        # interval state: one encoded row per probe step (rows.Row.encode), each prefixed by its length
        self.add_state("rows", default=torch.zeros(0, dtype=torch.float64), dist_reduce_fx="cat", persistent=True)
        # carried state (see carried_state), on the CPU in float64: the window of one-step changes (oldest
        # first) with the step each ends at, the latest losses and their step, the probe's dataset indices
        self._changes = torch.zeros(0, 0, dtype=torch.float64)
        self._change_steps: list[int] = []
        self._last = torch.zeros(0, dtype=torch.float64)
        self._last_step: int | None = None
        self._indices: list[int] = []
        self._burst_left = 0
        self._no_confirm = False  # an FSDP2 model too large to unshard for the confirmation pass
        self._examples: dict[int, Any] = {}
        self._decode: Callable[[Any], str] | None = self.config.decode
        self._warned: set[str] = set()
        self._confirmed: tuple[set[int], set[int], float, int] | None = None  # (a, b, cosine, probe steps ago)

    # ---- cadence and declarations -----------------------------------------------------------------

    def observe_cadence(self) -> Cadence:
        return self.config.every  # type: ignore[return-value]

    def continues(self, step: int) -> bool:
        """A burst is under way: the previous probe step was ``step - 1`` and it has changes left to take."""
        return self._burst_left > 0 and self._last_step == step - 1

    def probe_size(self) -> int:
        return self.config.probe_size

    def charts(self) -> Sequence[ChartGroup]:
        return (ChartGroup("signals", "pair losses (a, b)", ("signals/pair_loss/a", "signals/pair_loss/b")),
                ChartGroup("signals", "opposing score and alarm", ("signals/opposing_score", "signals/alarm")),
                ChartGroup("signals", "outliers and pairs", ("signals/outliers", "signals/pairs")),
                ChartGroup("signals", "share of loss change in the top 1%", ("signals/top1pct_share",)))

    def failed_result(self) -> Results:
        return Results(scalars={t: torch.tensor(math.nan, dtype=torch.float64) for t in TAGS})

    # ---- observe: the probe losses (and representations) on every rank, gathered in probe order ------

    def observe(self, ctx: StepContext) -> None:
        probe = ctx.probe()
        batches = probe.batches(batch_size=self.config.batch_size)
        mine = self._my_batches(len(batches), ctx.rank, ctx.world_size)
        heads = LayerInputs.of_input(ctx.model)
        local, feats = [], []
        error: Exception | None = None
        try:
            with ctx.extra_pass(grad=False) as extra, heads.capturing():
                self._forwards(ctx, extra, probe, batches, mine, heads, local, feats)
        except Exception as exc:  # after the pass's own clean-up (under FSDP2: resharded, FSDP's state reset)
            error = exc
        if ctx.world_size > 1:  # decided together, before the gathers: a failure on one rank fails every rank
            flag = torch.tensor([0.0 if error is None else 1.0], device=getattr(probe, "device", None))
            if float(ctx.all_reduce(flag, "max")[0]) > 0 and error is None:
                error = RuntimeError("gradwatch: signals: the probe losses failed on another rank")
        if error is not None:
            raise error
        sizes, losses = self._gather(ctx, local, getattr(probe, "device", None))
        if losses.numel() != len(probe):
            raise ValueError(f"gradwatch: signals expected {len(probe)} per-example losses (one per probe "
                             f"example), got {losses.numel()}; a loss_fn must return a Tensor[batch_size]")
        self._examples = dict(zip(probe.indices, probe.examples))
        self._decode = self.config.decode or getattr(probe, "decode", None)
        labels = [class_key(ex) for ex in probe.examples]
        self.update(losses, ctx.step, probe.indices, features=lambda: self._gather_features(ctx, feats, len(probe), losses.device),
                    labels=labels)
        if self.config.confirm and not self._no_confirm:
            self._confirm_last(ctx, probe, batches, mine, sizes, [t.numel() for t in local])

    @staticmethod
    def _forwards(ctx: StepContext, extra: Any, probe: Any, batches: list[Any], mine: list[int], heads: LayerInputs,
                  local: list[Tensor], feats: list[Tensor | None]) -> None:
        """This rank's probe losses (into ``local``) and representations (``feats``). Under FSDP2 each forward
        is a collective (``extra.collective``): every rank runs ``ceil(batches / ranks)`` of them (stand-ins
        discarded), and after a failure in the loss code the rest still run before it is raised, so no rank
        waits alone in an all-gather. (A failure inside one rank's model forward, between two modules'
        all-gathers, leaves the ranks out of step: no extra pass can mend that, nor can training.)"""
        collective = bool(getattr(extra, "collective", False))
        count = -(-len(batches) // max(1, ctx.world_size)) if collective else len(mine)
        error: Exception | None = None
        for k in range(count):
            j = mine[k] if k < len(mine) else None
            batch = extra.cast(batches[0 if j is None else j])
            try:
                loss = probe.per_example_loss(extra.model, batch).detach().reshape(-1).float()
            except Exception as exc:
                if not collective:
                    raise
                error = error or exc
                heads.take(batch, 1)
                continue
            feat = heads.take(batch, loss.numel())
            if j is not None and error is None:
                local.append(loss)
                feats.append(feat)
        if error is not None:
            raise error

    @staticmethod
    def _my_batches(n: int, rank: int, world: int) -> list[int]:
        """This rank's contiguous block of the ``n`` probe batches (``ceil(n / world)`` of them, fewer at the
        end). Under FSDP2 a rank with fewer runs stand-in forwards (each forward is a collective)."""
        per = -(-n // max(1, world))
        return list(range(min(n, rank * per), min(n, (rank + 1) * per)))

    @staticmethod
    def _gather(ctx: StepContext, local: list[Tensor], device: Any = None) -> tuple[list[int], Tensor]:
        """(every rank's block size, the probe's values in probe order), the same on every rank (the blocks
        are contiguous and in rank order; ``all_gather`` takes 1-d tensors of different lengths)."""
        mine = torch.cat(local) if local else torch.zeros(0, device=device)
        blocks = [mine] if ctx.world_size <= 1 else ctx.all_gather(mine)
        return [b.numel() for b in blocks], torch.cat([b.to(mine.device) for b in blocks])

    def _gather_features(self, ctx: StepContext, feats: list[Tensor | None], n: int, device: Any) -> Tensor | None:
        """The probe's representations [n, H] in probe order, or None where a rank could not read them (said
        once). A collective: every rank calls it together (the decision to is taken from the shared window)."""
        widths = {f.shape[1] for f in feats if f is not None}
        bad = any(f is None for f in feats) or len(widths) > 1
        width = widths.pop() if len(widths) == 1 else 0
        # (any rank bad, the largest width, minus the smallest width of the ranks that hold batches)
        flags = torch.tensor([float(bad), float(width), -float(width) if feats else -1e9], dtype=torch.float64,
                             device=device)
        if ctx.world_size > 1:
            flags = ctx.all_reduce(flags, "max")
        bad, width = bool(flags[0] > 0) or float(flags[1]) != -float(flags[2]), int(flags[1])
        if bad or width <= 0:
            self._warn_once("features", "gradwatch: signals cannot read the model's input representation as one "
                                        "vector per probe example, so no pair can show a shared direction and "
                                        "none raises the alarm")
            return None
        mine = torch.cat([f.reshape(-1) for f in feats if f is not None]) if feats else \
            torch.zeros(0, device=device)
        _, flat = self._gather(ctx, [mine.float()], device)
        return flat.reshape(n, width) if flat.numel() == n * width else None

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
        rows = decode_rows(self.rows, self._indices)
        if not rows:
            return
        row = rows[-1]
        target = next((p for p in row.pairs or () if p.alarm(self.config.alarm)), None)
        name = None if target is None else last_layer_name(ctx.model)
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
        try:
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
        except PassRefused as exc:  # too large to unshard under FSDP2 (same on every rank): unconfirmed from now on
            self._warn_once("confirm", f"{exc}. signals confirms no pair by its gradients for the rest of this "
                                       "run (pairs alarm unconfirmed)")
            self._no_confirm = True
            return
        if ctx.world_size > 1:
            ga, gb = ctx.all_reduce(ga.clone()), ctx.all_reduce(gb.clone())
        target.cosine = float(gradient_cosine(ga, gb))
        self._confirmed = (set(target.a), set(target.b), target.cosine, 1)
        self._replace_last(row)

    # ---- update / compute -------------------------------------------------------------------------

    def update(self, losses: Tensor, step: int, indices: Sequence[int] | Tensor | None = None,  # type: ignore[override]
               features: Features = None, labels: Sequence[Any] | None = None) -> None:
        """Add the probe's per-example losses [N] at ``step``: a one-step change when the previous probe step
        was ``step - 1``, then what the window shows (module docstring)."""
        cfg = self.config
        x = losses.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
        idx = list(range(x.numel())) if indices is None else [int(i) for i in (indices.tolist() if isinstance(indices, Tensor) else indices)]
        if len(idx) != x.numel():
            raise ValueError(f"gradwatch: signals got {x.numel()} losses for {len(idx)} probe indices")
        step = int(step)
        if idx != self._indices:
            self._restart(idx, x.numel())
        if self._last_step is not None and step <= self._last_step:  # a run resumed from an earlier step
            keep = [k for k, s in enumerate(self._change_steps) if s <= step - 1]
            self._changes, self._change_steps = self._changes[keep], [self._change_steps[k] for k in keep]
            self._last_step = None
        if not torch.isfinite(x).all():
            self._warn_once("nonfinite", f"gradwatch: signals: per-example losses are not finite at step {step}; "
                                         "the window starts again")
            self._restart(idx, x.numel())
            self._append(Row(step, 0, math.nan, math.nan, math.nan, [], None))
            return
        chained = self._last_step == step - 1
        previous, self._last, self._last_step = self._last, x, step
        if not chained:  # the first probe step of a burst: nothing changed over one step yet
            self._burst_left = cfg.burst
            self._append(Row(step, 0, math.nan, math.nan, math.nan, [], None))
            return
        self._burst_left = max(0, self._burst_left - 1)
        self._changes = torch.cat([self._changes, (x - previous)[None]])[-cfg.window:]
        self._change_steps = (self._change_steps + [step])[-cfg.window:]
        options = dict(z_cut=cfg.z_cut, rho=cfg.rho, min_group=cfg.min_group, max_outliers=cfg.max_outliers,
                       full_share=cfg.full_share, full_shared=cfg.full_shared, full_swing=cfg.full_swing)
        rep = opposing_signals(self._changes, losses=x, **options)
        if rep.pairs and features is not None:  # the representations are gathered only when a pair needs them
            h = features() if callable(features) else features
            # unreadable: an empty representation, in which no pair shares a direction (score 0)
            h = torch.zeros(x.numel(), 0) if h is None else h
            rep = opposing_signals(self._changes, losses=x, features=h, labels=labels, **options)
        pairs = None if rep.pairs is None else [self._pair(p) for p in rep.pairs]
        loss_a = loss_b = math.nan
        if rep.pairs:
            loss_a = float(x[list(rep.pairs[0].a)].mean())
            loss_b = float(x[list(rep.pairs[0].b)].mean())
        self._append(Row(step, rep.changes, rep.top1pct_share, loss_a, loss_b, [idx[p] for p in rep.outliers],
                         pairs))

    def _restart(self, indices: list[int], n: int) -> None:
        self._indices = indices
        self._changes, self._change_steps = torch.zeros(0, n, dtype=torch.float64), []
        self._last, self._last_step, self._burst_left = torch.zeros(0, dtype=torch.float64), None, 0

    def _append(self, row: Row) -> None:
        self.rows = append_row(self.rows, row, self._indices)

    def _replace_last(self, row: Row) -> None:
        self.rows = drop_last_row(self.rows)
        self._append(row)

    def _pair(self, p: OpposingPair) -> Pair:
        ids = lambda positions: [self._indices[i] for i in positions]  # noqa: E731
        return Pair(ids(p.a), ids(p.b), p.correlation, p.consistency, p.share, p.score, math.nan, p.shared, p.swing,
                    ids(p.followers_a), ids(p.followers_b))

    def compute(self) -> Results:
        rows = [r for r in decode_rows(self.rows, self._indices) if r.changes > 0]
        if not rows:
            return Results()  # only burst starts (or a restart) in this interval: nothing to log
        alarm = self.config.alarm
        last = rows[-1]
        nan = math.nan
        values = [float(len(last.outliers)), last.top1pct_share, nan, nan, nan, last.loss_a, last.loss_b]
        if last.pairs is not None:
            values[2] = max((p.score for p in last.pairs), default=0.0)
            values[3] = float(len(last.pairs))
            values[4] = float(any(p.alarm(alarm) for p in last.pairs))
        device = self.rows.device
        scalars = {t: torch.tensor(v, dtype=torch.float64, device=device) for t, v in zip(TAGS, values)}
        records = [record(r, alarm) for r in rows]
        drawn = pictures(last, self._examples)
        where = drawn[1] if drawn is not None else {}
        current = dict(zip(self._indices, self._last.tolist())) if self._last_step == last.step else {}
        texts = {"signals/pairs": pairs_table(last, alarm, self._examples, current, self._show, where)}
        images = {"signals/pair_examples": drawn[0]} if drawn is not None else {}
        return Results(scalars=scalars, records={"signals": records}, texts=texts,
                       alerts=opposing_pair_alert(rows, alarm), images=images)

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
        return describe(example)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    # ---- carried state ------------------------------------------------------------------------------

    def carried_state(self) -> dict[str, Any]:
        return {"changes": self._changes.clone(), "change_steps": torch.tensor(self._change_steps, dtype=torch.long),
                "last": self._last.clone(), "last_step": torch.tensor(-1 if self._last_step is None else self._last_step),
                "burst_left": torch.tensor(self._burst_left), "indices": torch.tensor(self._indices, dtype=torch.long)}

    def load_carried_state(self, state: Mapping[str, Any]) -> None:
        indices = [int(i) for i in torch.as_tensor(state.get("indices", torch.zeros(0))).reshape(-1).tolist()]
        if "changes" not in state:  # saved by gradwatch < 0.2 (losses at probe steps): keep what is one step apart
            self._load_losses(state, indices)
            return
        changes = torch.as_tensor(state["changes"]).detach().to("cpu", torch.float64)
        steps = [int(s) for s in torch.as_tensor(state.get("change_steps", torch.zeros(0))).reshape(-1).tolist()]
        last = torch.as_tensor(state.get("last", torch.zeros(0))).detach().to("cpu", torch.float64).reshape(-1)
        if changes.ndim != 2 or changes.shape[0] != len(steps) or (len(steps) and changes.shape[1] != len(indices)) \
                or (last.numel() and last.numel() != len(indices)):
            raise ValueError(f"gradwatch: signals carried state expected changes [steps, examples] matching "
                             f"{len(steps)} steps and {len(indices)} indices, got {tuple(changes.shape)}")
        last_step = int(torch.as_tensor(state.get("last_step", -1)))
        keep = self.config.window
        self._indices, self._changes, self._change_steps = indices, changes[-keep:], steps[-keep:]
        self._last, self._last_step = last, (None if last_step < 0 or not last.numel() else last_step)
        self._burst_left = int(torch.as_tensor(state.get("burst_left", 0)))

    def _load_losses(self, state: Mapping[str, Any], indices: list[int]) -> None:
        losses = torch.as_tensor(state.get("losses", torch.zeros(0, 0))).detach().to("cpu", torch.float64)
        steps = [int(s) for s in torch.as_tensor(state.get("steps", torch.zeros(0))).reshape(-1).tolist()]
        if losses.ndim != 2 or losses.shape[0] != len(steps) or (len(steps) and losses.shape[1] != len(indices)):
            raise ValueError(f"gradwatch: signals carried state expected losses [steps, examples] matching "
                             f"{len(steps)} steps and {len(indices)} indices, got {tuple(losses.shape)}")
        self._restart(indices, len(indices))
        one_step = [k for k in range(1, len(steps)) if steps[k] == steps[k - 1] + 1]
        if one_step:
            self._changes = torch.stack([losses[k] - losses[k - 1] for k in one_step])[-self.config.window:]
            self._change_steps = [steps[k] for k in one_step][-self.config.window:]
        if steps:
            self._last, self._last_step = losses[-1], steps[-1]


def _same_side(known: set[int], side: Sequence[int], at_least: float = 0.8) -> bool:
    """Whether ``side`` is the same group as ``known``: Jaccard index |known & side| / |known | side| >= at_least."""
    new = set(side)
    return len(known & new) >= at_least * len(known | new)
