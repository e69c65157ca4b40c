"""The diagnostic contract (engine v2): what a gradwatch diagnostic declares, receives and returns.

A diagnostic is a torchmetrics ``Metric`` whose *interval state* (``add_state``) aggregates observations
between two logging events and whose *carried state* (:meth:`Diagnostic.carried_state`) survives resets
(warm starts, previous probe losses, running windows). Both are saved in checkpoints.

Lifecycle, driven by the engine (``gradwatch.engine.watcher.Watcher``) from five host events:

=================  ===========================================================================
event              what the engine does
=================  ===========================================================================
step start         before the first micro-batch's forward of optimizer step t: decides what is due
                   at t (its cadence, or :meth:`Diagnostic.continues` for a burst under way), arms the
                   forward hooks of due diagnostics that need ``"activations"``
gradients ready    gradients final (accumulated, unscaled, all-reduced, pre-clip): disarms the hooks,
                   snapshots the watched weights for ``"weights_before"``, then runs ``observe`` of
                   due diagnostics whose ``phase`` is ``"gradients_ready"``
step end           after the optimizer step, with the step's loss: runs ``observe`` of due diagnostics
                   whose ``phase`` is ``"step_end"``; then every diagnostic whose *log* cadence is due
                   and that has observed since its last reset is computed, emitted and reset
exception, close   hooks removed, sinks flushed and closed
=================  ===========================================================================

Capabilities (``needs``), each a cached accessor of :class:`StepContext`:

- ``"gradients"``: the watched matrices' true gradients (unscaled, pre-clip; DTensor shards made whole on
  every rank, a collective the engine runs on every rank);
- ``"gradient_shards"``: :meth:`StepContext.gradient_shards`, this rank's part of each watched gradient
  without a collective (an FSDP2 row shard stays a shard; under DDP or one process, the whole gradient);
  with :meth:`StepContext.broadcast_` and :meth:`StepContext.reduce_` to combine them;
- ``"probe"``: the shared, seeded probe set, with :meth:`StepContext.extra_pass` (eval mode, RNG forked,
  math SDPA kernel, float32 copies swapped in for bf16/fp16 models, grad on or off);
- ``"optimizer"``: the torch optimizer behind host wrappers (its state is per rank: shards under FSDP2);
- ``"weights_before"``: the watched weights as they were before the optimizer step (``step_end`` only);
- ``"activations"``: what the diagnostic's :meth:`Diagnostic.activation_sites` reduced inside forward
  hooks during the step (armed on due steps only, once per micro-batch);
- ``"loss"``: the step's training loss (``step_end`` only);
- ``"micro_batches"``: :meth:`StepContext.batch_gradient_norms`, the step's gradient norms at two batch sizes
  (one micro-batch against a rank's accumulated gradient, or one rank against the all-reduced one), read by
  gradient hooks inside the user's backward on due steps only (hosts report each micro-batch);
- ``"logged"``: :meth:`StepContext.logged`, the latest value any family logged under a scalar tag (one
  family reading another's results, e.g. the sharpness ratio), with its step.

Ranks: every rank enters the engine. ``runs_on = "rank_zero"`` diagnostics observe on rank zero only;
``"all_ranks"`` ones observe everywhere (sharded state, passes through sharded modules) and must return
the same result on every rank (rank zero's is written). A failure on any rank is decided together.

Results (:class:`Results`): scalars (0-d tensors, stacked for one device-to-host transfer), vectors
(histograms), records (rows for ``<name>.jsonl`` in the run directory), texts, images, and :class:`Alert`\\ s
(once per rule with a cooldown; an optional user ``on_alert``; raised in strict mode). Chart hints
(:class:`ChartGroup`, :class:`Heatmap`) are neutral; the TensorBoard sink turns them into custom-scalar
layouts and images.

A family registers itself once (:class:`gradwatch.registry.Family`): its config class, public key, default,
tag stem and how it builds its diagnostics. Nothing shared changes when a family is added.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from gradwatch.cadence import Cadence

if TYPE_CHECKING:  # pragma: no cover
    pass

Capability = Literal["gradients", "gradient_shards", "probe", "optimizer", "weights_before", "activations", "loss", "micro_batches",
                     "logged"]
CAPABILITIES: tuple[str, ...] = ("gradients", "gradient_shards", "probe", "optimizer", "weights_before", "activations", "loss",
                                 "micro_batches", "logged")
RunsOn = Literal["rank_zero", "all_ranks"]
Phase = Literal["gradients_ready", "step_end"]
Severity = Literal["info", "warning", "critical"]


class Watched(Protocol):
    """One watched gradient matrix (see ``gradwatch.engine.layers.WatchedMatrix``)."""

    tag: str
    param_name: str

    @property
    def family(self) -> str: ...

    def matrix(self, grad: Tensor) -> Tensor: ...


class ProbeAccess(Protocol):
    """The fixed probe set (see ``gradwatch.engine.probe.ProbeSet``)."""

    indices: Sequence[int]
    examples: Sequence[Any]

    def __len__(self) -> int: ...

    def batches(self, limit: int | None = None, batch_size: int | None = None,
                drop_last: bool = False) -> list[Any]: ...

    def example_batches(self, limit: int | None = None) -> list[Any]: ...

    def per_example_loss(self, model: nn.Module, batch: Any) -> Tensor: ...

    def training_loss(self, model: nn.Module, batch: Any) -> Tensor: ...


# ---- results ------------------------------------------------------------------------------------


@dataclass
class Alert:
    """Something a person should look at now.

    Attributes:
        rule: a stable key (``stability/attention_logit_growth``); the engine says each rule once per
            cooldown.
        severity: ``info``, ``warning`` or ``critical``.
        message: one sentence: what was seen.
        evidence: the values, thresholds and trend that fired it (JSON-serialisable).
        remedies: what usually helps, with the current setting quoted.
        step: filled in by the engine.
    """

    rule: str
    severity: Severity
    message: str
    evidence: Mapping[str, Any] = field(default_factory=dict)
    remedies: Sequence[str] = ()
    step: int | None = None

    def as_record(self) -> dict[str, Any]:
        return {"step": self.step, "rule": self.rule, "severity": self.severity, "message": self.message,
                "evidence": dict(self.evidence), "remedies": list(self.remedies)}


@dataclass
class Results:
    """What one ``compute()`` returns (a plain dataclass: torchmetrics maps ``compute``'s value through its
    collection helpers, which refuse frozen ones).

    Attributes:
        scalars: tag -> 0-d tensor (any device); the engine stacks all of a step's scalars and moves them to
            the host in one transfer.
        vectors: tag -> 1-d tensor, written as histograms.
        records: file stem -> rows; each row becomes one JSON line of ``<stem>.jsonl`` in the run directory.
        texts: tag -> markdown, written as TensorBoard text.
        alerts: raised this interval.
        images: tag -> (C, H, W) tensor with values in [0, 1] (C = 1 or 3), written as TensorBoard images.
    """

    scalars: Mapping[str, Tensor] = field(default_factory=dict)
    vectors: Mapping[str, Tensor] = field(default_factory=dict)
    records: Mapping[str, Sequence[Mapping[str, Any]]] = field(default_factory=dict)
    texts: Mapping[str, str] = field(default_factory=dict)
    alerts: Sequence[Alert] = ()
    images: Mapping[str, Tensor] = field(default_factory=dict)

    @staticmethod
    def of(value: Results | Mapping[str, Tensor]) -> Results:
        """A plain ``{tag: 0-d Tensor}`` is shorthand for scalars only."""
        return value if isinstance(value, Results) else Results(scalars=dict(value))


@dataclass(frozen=True)
class ChartGroup:
    """A chart hint: ``tags`` drawn together on one chart titled ``title`` in section ``category``."""

    category: str
    title: str
    tags: tuple[str, ...]


@dataclass(frozen=True)
class Heatmap:
    """A layer-by-step heatmap hint: one row per tag of ``rows`` (labelled ``labels``), a column per logging
    event, drawn at ``every``; the sink keeps the column history."""

    name: str
    rows: tuple[str, ...]
    labels: tuple[str, ...]
    log_scale: bool
    every: Cadence


Chart = ChartGroup | Heatmap


# ---- activation capture -------------------------------------------------------------------------


@dataclass
class ActivationSite:
    """A module whose forward a diagnostic reduces while it is due (``needs`` has ``"activations"``).

    Attributes:
        name: the module's name in ``named_modules()``.
        module: the module.
        on_forward: ``on_forward(module, args, kwargs, output)`` called after the module's forward; it must
            reduce at once (a max, a sum) and keep no activation.
        on_attention: ``on_attention(query, key, attn_mask, is_causal, scale, enable_gqa)`` called for each
            ``torch.nn.functional.scaled_dot_product_attention`` call made inside the module's forward, with
            the tensors exactly as the kernel receives them.

    The engine calls each at most once per site per micro-batch forward of the user's model (gradient
    checkpointing re-runs forwards during backward; those are not counted again).
    """

    name: str
    module: nn.Module
    on_forward: Callable[[nn.Module, tuple, dict, Any], None] | None = None
    on_attention: Callable[..., None] | None = None


# ---- what a diagnostic receives -----------------------------------------------------------------


class PassRefused(RuntimeError):
    """An extra pass the engine will not run, with the reason (under FSDP2: the whole model would be unsharded
    on every rank and its parameter bytes exceed ``max_unshard_gb``). The engine says it once and switches the
    diagnostic off for the run; training goes on. A diagnostic with an optional pass may catch it and carry on
    without that pass."""


class StepContext(Protocol):
    """What the engine offers a diagnostic at one step; accessors are cached (see
    ``gradwatch.engine.context.EngineStepContext``)."""

    step: int
    phase: Phase
    model: nn.Module
    watched: Sequence[Watched]
    params: Mapping[str, nn.Parameter]
    rank: int
    world_size: int

    @property
    def optimizer(self) -> Any: ...

    def gradients(self) -> tuple[list[Tensor], list[int]]: ...

    def gradient_shards(self) -> Sequence[Any]:
        """``gradwatch.engine.layers.GradientShard`` of each watched matrix, in ``watched`` order."""

    @property
    def grad_scale(self) -> float | None: ...

    def probe(self) -> ProbeAccess: ...

    def extra_pass(self, *, grad: bool = True, float32: bool = True) -> Any:
        """A context manager yielding ``gradwatch.engine.context.ExtraPass`` (``.model``, ``.params`` to
        differentiate, ``.cast(batch)``, ``.collective``: each forward is a collective, so every rank must run
        the same number). Raises :class:`PassRefused` on entry when the pass is over a memory limit."""

    def say_once(self, key: str, message: str) -> None: ...

    def weights_before(self) -> dict[str, Tensor]: ...

    @property
    def loss(self) -> Tensor | None: ...

    def batch_gradient_norms(self) -> Any:
        """``gradwatch.engine.context.BatchGradientNorms`` of this step, or None (one batch size only)."""

    def logged(self, tag: str) -> tuple[int, float] | None:
        """(step, value) last logged under the scalar ``tag`` by any diagnostic, or None."""

    def all_reduce(self, tensor: Tensor, op: Literal["sum", "max", "min"] = "sum") -> Tensor: ...

    def all_gather(self, tensor: Tensor) -> list[Tensor]: ...

    def broadcast_(self, tensor: Tensor, src: int) -> Tensor: ...

    def reduce_(self, tensor: Tensor, dst: int) -> Tensor: ...


# ---- the diagnostic -----------------------------------------------------------------------------


class LayersFailed(Exception):
    """Raised by ``observe`` after it recorded its update with some layers left as gaps (NaN for this
    observation) because computing them failed on this rank, every collective having been completed: the
    engine warns once (raises when strict) and keeps the rest of the interval. ``layer`` names the first
    failed layer; ``cause`` is the original exception."""

    def __init__(self, message: str, layer: str | None = None, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.layer = layer
        self.cause = cause


class Diagnostic(Metric):
    """Base class of gradwatch's diagnostics.

    Class attributes:
        stem: the tag prefix (``grad_spectrum``), also the stem of its functional and metrics modules.
        needs: capabilities ``observe`` uses (see the module docstring).
        runs_on: ``"rank_zero"`` or ``"all_ranks"``.
        phase: the event at which ``observe`` runs (``"gradients_ready"`` or ``"step_end"``).
        enters_every_collective: an all-ranks ``observe`` that enters every one of its collectives on every
            rank whatever fails (it catches its own errors, e.g. spread spectra); the others' collectives are
            fenced (:meth:`gradwatch.engine.ranks.Ranks.fenced`), one control all-reduce each.

    Subclasses implement :meth:`observe` (pull from the context, call ``update``), ``update`` and
    ``compute`` (a :class:`Results` or a ``{tag: 0-d Tensor}``), and say when they are due with
    :meth:`observe_cadence` and :meth:`log_cadence` (by default an interval is one observation).
    ``compute`` runs only after at least one ``update`` since the last reset.
    """

    stem: ClassVar[str]
    needs: ClassVar[frozenset[str]] = frozenset()
    runs_on: ClassVar[RunsOn] = "rank_zero"
    phase: ClassVar[Phase] = "gradients_ready"
    enters_every_collective: ClassVar[bool] = False
    full_state_update: ClassVar[bool] = False

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("sync_on_compute", False)  # the engine decides what crosses ranks
        super().__init__(**kwargs)

    def observe_cadence(self) -> Cadence:
        """When :meth:`observe` runs."""
        raise NotImplementedError

    def log_cadence(self) -> Cadence | None:
        """When ``compute`` is emitted and the interval state reset; None (the default): right after every
        observation, so an interval holds one observation. A cheap quantity observed every step and logged
        every k returns ``Cadence.every(k)`` here, and its ``compute`` documents the mean or max it takes."""
        return None

    def continues(self, step: int) -> bool:
        """Whether observing at ``step`` continues work begun at an earlier step (a burst of consecutive
        probe steps): the engine then runs it at ``step`` whatever its cadence, never postponed by the
        budget, and counts its cost into the run it continues. The answer must be the same on every rank.
        Default: never."""
        return False

    def observe(self, ctx: StepContext) -> None:
        """Pull what it needs from ``ctx`` and call ``self.update(...)``."""
        raise NotImplementedError

    def failed_result(self) -> Results:
        """What is logged for an interval in which every observation failed (NaNs of the main tags)."""
        return Results()

    def charts(self) -> Sequence[Chart]:
        """Chart hints for the sinks."""
        return ()

    def activation_sites(self, model: nn.Module) -> Sequence[ActivationSite]:
        """The modules to capture while due (only read when ``"activations"`` is in ``needs``)."""
        return ()

    def probe_size(self) -> int:
        """Probe examples this diagnostic uses (0: none)."""
        return 0

    # carried state: what survives ``reset()`` and must be in checkpoints ------------------------------

    def carried_state(self) -> dict[str, Any]:
        """State that outlives an interval (tensors, numbers, lists), saved with checkpoints."""
        return {}

    def load_carried_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`carried_state` returned."""


def tensors_to(value: Any, device: torch.device | str) -> Any:
    """``value`` with every tensor inside lists, tuples and dicts moved to ``device``."""
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: tensors_to(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(tensors_to(v, device) for v in value)
    return value


__all__ = ["CAPABILITIES", "ActivationSite", "Alert", "Capability", "Chart", "ChartGroup", "Diagnostic",
           "Heatmap", "LayersFailed", "PassRefused", "Phase", "ProbeAccess", "Results", "RunsOn", "Severity", "StepContext", "Watched",
           "tensors_to"]
