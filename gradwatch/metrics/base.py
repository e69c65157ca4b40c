"""What every gradwatch diagnostic is: a torchmetrics ``Metric`` that declares what it needs.

The engine builds each registered diagnostic once at train start, asks it when it is due, hands it a
:class:`StepContext` with lazy access to what it declared in ``needs``, and later calls ``compute()``
(a ``dict[tag, Tensor]``) and ``reset()``. A new diagnostic is one subclass plus one line in the
registry (``gradwatch.metrics.DIAGNOSTICS``); neither the engine nor the callbacks change.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from torch import Tensor, nn
from torchmetrics import Metric

from gradwatch.config import Cadence, WatchConfig


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

    def batches(self, limit: int | None = None, batch_size: int | None = None,
                drop_last: bool = False) -> list[Any]: ...

    def example_batches(self, limit: int | None = None) -> list[Any]: ...

    def per_example_loss(self, model: nn.Module, batch: Any) -> Tensor: ...

    def training_loss(self, model: nn.Module, batch: Any) -> Tensor: ...


@dataclass
class StepContext:
    """What the engine offers a diagnostic at one optimizer step. Accessors are lazy and cached.

    Attributes:
        step: the optimizer step being taken (1-based: the weights after it are those of step ``step``).
        model: the unwrapped model (observe only).
        optimizer: the torch optimizer about to step (host wrappers removed), or None.
        watched: the watched matrices, in discovery order.
        params: parameter name -> parameter, for the watched matrices.
        gradients: () -> (matrices, indices into ``watched``) of the current (pre-clip) gradients.
        probe: () -> the probe set (raises a ValueError with the options when no loss can be found).
        extra_pass: a context manager factory for observe-only extra passes (eval mode, RNG forked,
            math SDPA kernel, training mode restored).
    """

    step: int
    model: nn.Module
    optimizer: Any
    watched: Sequence[Watched]
    params: Mapping[str, nn.Parameter]
    gradients: Callable[[], tuple[list[Tensor], list[int]]]
    probe: Callable[[], ProbeAccess]
    extra_pass: Callable[[], Any]
    cache: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class HeatmapSpec:
    """A layer-by-step heatmap: for ``name``, one row per tag in ``tags`` (in that order)."""

    name: str
    rows: tuple[str, ...]
    labels: tuple[str, ...]
    log_scale: bool


class Diagnostic(Metric):
    """Base class of gradwatch's metrics.

    Class attributes:
        family: tag prefix (``grad_spectrum``), also the stem of the functional module.
        config_field: the field of :class:`WatchConfig` that switches it on and configures it.
        needs: what ``observe`` uses: ``"gradients"``, ``"probe"``, ``"optimizer"``.
    """

    family: ClassVar[str]
    config_field: ClassVar[str]
    needs: ClassVar[frozenset[str]] = frozenset()
    full_state_update: ClassVar[bool] = False
    higher_is_better: ClassVar[bool | None] = None

    @classmethod
    def from_watch(cls, config: WatchConfig, watched: Sequence[Watched]) -> list[Diagnostic]:
        """The instances this diagnostic contributes for ``config`` (none when switched off)."""
        raise NotImplementedError

    def cadence(self) -> Cadence:
        """When :meth:`observe` runs."""
        raise NotImplementedError

    def observe(self, ctx: StepContext) -> None:
        """Pull what it needs from ``ctx`` and call ``self.update(...)``."""
        raise NotImplementedError

    def layout(self) -> dict[str, dict[str, list]]:
        """TensorBoard custom-scalars layout: ``{category: {title: ["Multiline", [tags]]}}``."""
        return {}

    def heatmaps(self) -> list[HeatmapSpec]:
        """Layer-by-step heatmaps built from this diagnostic's logged values."""
        return []

    def heatmap_cadence(self) -> Cadence | None:
        return None
