"""What the engine hands a diagnostic: :class:`EngineStepContext` (cached accessors, one per capability)
and :func:`extra_pass` (the observe-only policy for passes that are not the user's)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from gradwatch.engine.fsdp import is_fsdp2, pass_scope
from gradwatch.engine.layers import GradientShard, gradient_matrices, gradient_shards, unwrap_optimizer
from gradwatch.engine.ranks import Ranks
from gradwatch.engine.rng import preserved_rng

if TYPE_CHECKING:  # pragma: no cover
    from gradwatch.engine.hooks import MicroBatchGradients
    from gradwatch.engine.layers import WatchedLayers
    from gradwatch.engine.probe import ProbeSet

_FULL_PRECISION = (torch.float32, torch.float64)


def _reparametrize() -> Any:
    try:
        from torch.nn.utils.stateless import _reparametrize_module
    except ImportError:  # pragma: no cover - private API; every torch 2.x has it
        return None
    return _reparametrize_module


@dataclass
class ExtraPass:
    """Inside :func:`extra_pass`: the model to run, the tensors its forward reads for each parameter name
    (float32 copies for a half-precision model, else the parameters themselves, read inside the pass: under
    FSDP2 the unsharded ones; differentiate with respect to these), and :meth:`cast` for inputs. ``collective``:
    each forward is a collective (FSDP2 without grad), so every rank must run the same number of forwards."""

    model: nn.Module
    params: Mapping[str, Tensor]
    float32: bool
    collective: bool = False

    def cast(self, batch: Any) -> Any:
        """``batch`` with half-precision floating tensors cast to float32 when the pass runs in float32."""
        if not self.float32:
            return batch
        return tree_map(lambda t: t.float() if isinstance(t, Tensor) and t.is_floating_point()
                        and t.dtype not in _FULL_PRECISION else t, batch)


@contextlib.contextmanager
def extra_pass(model: nn.Module, *, grad: bool = True, float32: bool = True,
               on_native: Callable[[str], None] | None = None,
               max_unshard_gb: float | None = None) -> Iterator[ExtraPass]:
    """Observe-only context for forward (and backward) passes that are not the user's.

    Eval mode (no dropout, BatchNorm statistics untouched); the RNG state forked (CPU and the current CUDA
    device) so the user's random stream is unchanged; the math SDPA kernel when ``grad`` (the only one with
    a double backward); grad enabled or disabled as asked; every module's training flag restored after.
    With ``grad`` and ``float32``, a model stored in bf16/fp16 gets float32 copies of its half-precision
    parameters and floating buffers swapped in by name (torch's stateless reparametrization, tied weights
    kept tied) for the duration of the block: the host's own loss code runs unchanged, on float32 numbers,
    and nothing of the model is modified. ``on_native(reason)`` is called when that swap is unavailable.

    FSDP2 (``fully_shard``) modules (:func:`gradwatch.engine.fsdp.pass_scope`; every rank must enter, so
    diagnostics declare ``runs_on = "all_ranks"``): without ``grad`` the forwards are FSDP2's own sharded ones,
    each a collective (``ExtraPass.collective``); with ``grad`` the modules are unsharded for the block (entering
    is the collective, the pass is then local; refused with ``PassRefused`` when the full parameters exceed
    ``max_unshard_gb``). ``ExtraPass.params`` are the parameters read after unsharding.
    The float32 swap is not possible there (FSDP2's pre-forward puts its own unsharded parameters in place
    of swapped tensors), so a half-precision FSDP2 model runs the pass in its own dtype and ``on_native`` is
    called.
    """
    modes = [(m, m.training) for m in model.modules()]
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    kernel: Any = contextlib.nullcontext()
    if grad:
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            kernel = sdpa_kernel(SDPBackend.MATH)
        except ImportError:  # pragma: no cover - torch < 2.3
            pass
    sharded = is_fsdp2(model)
    with contextlib.ExitStack() as stack:
        stack.enter_context(preserved_rng(devices))
        stack.enter_context(kernel)
        stack.enter_context(torch.enable_grad() if grad else torch.no_grad())
        model.eval()
        try:
            collective = stack.enter_context(pass_scope(model, grad=grad, max_unshard_gb=max_unshard_gb))
            named = dict(model.named_parameters(remove_duplicate=False))  # after unsharding: the plain ones
            half = grad and float32 and any(p.dtype not in _FULL_PRECISION and p.is_floating_point()
                                            for p in named.values())
            reparametrize = _reparametrize() if half and not sharded else None
            if half and reparametrize is None and on_native is not None:
                on_native("FSDP2-sharded modules put their own unsharded parameters in place of swapped tensors"
                          if sharded else "torch.nn.utils.stateless._reparametrize_module is missing")
            if reparametrize is not None:
                copies: dict[int, Tensor] = {}
                mapping: dict[str, Tensor] = {}
                for name, t in [*named.items(), *model.named_buffers(remove_duplicate=False)]:
                    if not (t.is_floating_point() and t.dtype not in _FULL_PRECISION):
                        continue
                    if id(t) not in copies:
                        copy = t.detach().to(torch.float32)
                        copies[id(t)] = copy.requires_grad_(True) if isinstance(t, nn.Parameter) and t.requires_grad else copy
                    mapping[name] = copies[id(t)]
                stack.enter_context(reparametrize(model, mapping))
                params = {n: mapping.get(n, p) for n, p in named.items()}
                yield ExtraPass(model, params, True, collective)
            else:
                yield ExtraPass(model, named, False, collective)
        finally:
            for m, mode in modes:
                m.training = mode


@dataclass(frozen=True)
class BatchGradientNorms:
    """Squared norms of the gradient of one optimizer step at two batch sizes, in common units, for the
    gradient noise scale (McCandlish et al. 2018, appendix A): ``E|G_b|^2 = |G|^2 + tr(Sigma) / b``.

    Attributes:
        sq_norm_small: mean squared norm of a gradient over ``b_small`` examples.
        b_small: examples behind one small gradient.
        sq_norm_big: squared norm of the gradient over ``b_big`` examples.
        b_big: examples behind the big gradient.
        source: ``"micro_batches"`` (small: one micro-batch; big: a rank's accumulated gradient; averaged over
            ranks) or ``"ranks"`` (small: one rank's gradient; big: the all-reduced one).
    """

    sq_norm_small: Tensor
    b_small: float
    sq_norm_big: Tensor
    b_big: float
    source: str


def batch_gradient_norms(tap: MicroBatchGradients | None, ranks: Ranks, layers: WatchedLayers,
                         grad_scale: float | None, loss_scale: Callable[[], float | None] | float | None,
                         ) -> tuple[BatchGradientNorms | None, str]:
    """The step's :class:`BatchGradientNorms` over the watched parameters, and why not when None.

    A collective (one all-reduce of five numbers), run on every rank. With ``n >= 2`` micro-batches per rank,
    per rank: small = mean_k |h_k|^2 over its micro-batch contributions, big = |sum_k h_k|^2 / n^2 (its
    accumulated gradient), both in the backward's units, which cancel in B_simple; exact for micro-batches of
    equal size (what Lightning and HF accumulate: each micro-batch loss divided by n, or by the tokens of the
    whole step). With one micro-batch and several ranks: small = a rank's |h|^2 / c^2 with c the loss scale
    the backward carried (1 without fp16), big = the all-reduced true gradient's squared norm.
    """
    if tap is None:
        return None, "the host reports no micro-batches"
    sums = tap.sums()
    examples = tap.examples
    n = len(examples)
    ok = sums is not None and n > 0 and all(e > 0 for e in examples)
    small, total = sums if sums is not None else (torch.zeros((), dtype=torch.float64),) * 2
    local = torch.stack([small.double().cpu(), total.double().cpu(), torch.tensor(float(n), dtype=torch.float64),
                         torch.tensor(float(sum(examples)), dtype=torch.float64),
                         torch.tensor(1.0 if ok else 0.0, dtype=torch.float64)])
    got = ranks.all_reduce(local, "sum")
    low = ranks.all_reduce(local[2:3], "min") if ranks.distributed else local[2:3]
    w = ranks.world_size
    small_sum, total_sum, n_sum, e_sum, ok_sum = got.tolist()
    if ok_sum < w:
        return None, ("no backward reached a watched parameter on some rank (FSDP2-sharded parameters are not "
                      "hooked), or the host gave micro-batches without a batch dimension")
    if n_sum != float(low.item()) * w:
        return None, "the ranks ran different numbers of micro-batches"
    n = int(low.item())
    if n >= 2:
        return BatchGradientNorms(torch.tensor(small_sum / (n * w), dtype=torch.float64), e_sum / (n * w),
                                  torch.tensor(total_sum / (n * n * w), dtype=torch.float64), e_sum / w,
                                  "micro_batches"), ""
    if w >= 2:
        c = loss_scale() if callable(loss_scale) else loss_scale
        c = 1.0 if c is None else float(c)
        grads = [p.grad for p in layers.params.values() if p.grad is not None]
        if not grads or not all(isinstance(g, Tensor) and type(g) is Tensor for g in grads):
            return None, "the all-reduced gradients are not plain tensors"
        factor = 1.0 if grad_scale is None else float(grad_scale)
        big = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32).double().cpu() for g in grads])
        big = big.square().sum() * factor * factor
        return BatchGradientNorms(torch.tensor(small_sum / (w * c * c), dtype=torch.float64), e_sum / w, big,
                                  e_sum, "ranks"), ""
    return None, ("one process and one micro-batch per step give one batch size; the noise scale needs "
                  "gradient accumulation (accumulate_grad_batches / gradient_accumulation_steps >= 2) or more "
                  "than one rank")


class EngineStepContext:
    """The engine's :class:`gradwatch.metrics.base.StepContext`: one per event, accessors cached, so two
    diagnostics due at the same step share one read of the gradients.

    Attributes:
        step: the optimizer step (1-based: the weights after it are those of step ``step``).
        phase: ``"gradients_ready"`` or ``"step_end"``.
        model: the unwrapped model (observe only).
        watched: the watched matrices, in discovery order.
        params: parameter name -> parameter, for the watched matrices.
        rank, world_size: this process's place.
    """

    def __init__(self, *, step: int, phase: Literal["gradients_ready", "step_end"], model: nn.Module,
                 layers: WatchedLayers, ranks: Ranks, optimizer: Any = None, grad_scale: float | None = None,
                 probe: Callable[[], ProbeSet] | None = None, loss: Tensor | None = None,
                 weights_before: Mapping[str, Tensor] | None = None,
                 say_once: Callable[[str, str], None] | None = None,
                 micro_batches: MicroBatchGradients | None = None,
                 loss_scale: Callable[[], float | None] | float | None = None,
                 logged: Mapping[str, tuple[int, float]] | None = None,
                 max_unshard_gb: float | None = None) -> None:
        self.step = step
        self.phase = phase
        self.model = model
        self.watched: Sequence[Any] = layers.matrices
        self.params: Mapping[str, nn.Parameter] = layers.params
        self._layers = layers
        self._ranks = ranks
        self.rank = ranks.rank
        self.world_size = ranks.world_size
        self._optimizer = optimizer
        self._grad_scale = grad_scale
        self._probe = probe
        self.probe_size: int | None = None  # the due diagnostic's own probe size, set by the engine before each
        self._loss = loss
        self._weights_before = weights_before
        self._say_once = say_once
        self._micro_batches = micro_batches
        self._loss_scale = loss_scale
        self._logged = logged or {}
        self._max_unshard_gb = max_unshard_gb

    @cached_property
    def optimizer(self) -> Any:
        """The torch optimizer behind host wrappers, or None."""
        return unwrap_optimizer(self._optimizer) if self._optimizer is not None else None

    @cached_property
    def _gradients(self) -> tuple[list[Tensor], list[int]]:
        scale = None if self._grad_scale in (None, 1.0) else self._grad_scale
        return gradient_matrices(self._layers, scale)

    def gradients(self) -> tuple[list[Tensor], list[int]]:
        """(matrices, indices into ``watched``) of the true gradients: unscaled, pre-clip, DTensor shards
        made whole (a collective: the engine calls this on every rank when a due diagnostic needs it)."""
        return self._gradients

    @cached_property
    def _gradient_shards(self) -> list[GradientShard]:
        return gradient_shards(self._layers, self.world_size)

    def gradient_shards(self) -> list[GradientShard]:
        """This rank's part of each watched gradient (:class:`gradwatch.engine.layers.GradientShard`, in
        ``watched`` order): FSDP2 row shards stay shards; no collective for them (other DTensor layouts are
        made whole). The gradients are raw ``.grad``: multiply by :attr:`grad_scale` for the true ones."""
        return self._gradient_shards

    @property
    def grad_scale(self) -> float | None:
        """The factor turning ``.grad`` into the true pre-clip gradient (None: 1)."""
        return None if self._grad_scale in (None, 1.0) else float(self._grad_scale)

    @cached_property
    def _batch_gradient_norms(self) -> tuple[BatchGradientNorms | None, str]:
        return batch_gradient_norms(self._micro_batches, self._ranks, self._layers, self._grad_scale,
                                    self._loss_scale)

    def batch_gradient_norms(self) -> BatchGradientNorms | None:
        """This step's gradient norms at two batch sizes (``"micro_batches"``), or None where the step gives
        only one (a reason is in :attr:`batch_gradient_norms_reason`). A collective: the engine calls it on
        every rank when a due diagnostic needs it."""
        return self._batch_gradient_norms[0]

    @property
    def batch_gradient_norms_reason(self) -> str:
        return self._batch_gradient_norms[1]

    def probe(self) -> ProbeSet:
        """The probe set of the diagnostic being run: the first :attr:`probe_size` examples of the shared,
        seeded draw (:meth:`ProbeSet.first`; drawn on first use), the whole draw where no size is set."""
        if self._probe is None:
            raise ValueError("gradwatch: this diagnostic needs probe data, but the trainer gave no training "
                             "dataset to draw it from")
        shared = self._probe()
        return shared.first(self.probe_size) if self.probe_size else shared

    def extra_pass(self, *, grad: bool = True, float32: bool = True) -> Any:
        """:func:`extra_pass` on the model; yields an :class:`ExtraPass`."""
        return extra_pass(self.model, grad=grad, float32=float32, on_native=lambda why: self.say_once(
            "float32", f"gradwatch: cannot swap float32 copies into this half-precision model ({why}); "
            "extra passes run in its own dtype"), max_unshard_gb=self._max_unshard_gb)

    def weights_before(self) -> dict[str, Tensor]:
        """The watched parameters as they were before this step's optimizer update (``step_end`` only)."""
        if self._weights_before is None:
            raise RuntimeError("gradwatch: weights before the step are only given at step end to diagnostics "
                               "that declare 'weights_before'")
        return dict(self._weights_before)

    @property
    def loss(self) -> Tensor | None:
        """The step's training loss (``step_end`` only; None when the host gave none)."""
        return self._loss

    def logged(self, tag: str) -> tuple[int, float] | None:
        """(step, value) last logged under the scalar ``tag`` (by any family, this run), or None."""
        return self._logged.get(tag)

    def all_reduce(self, tensor: Tensor, op: Literal["sum", "max", "min"] = "sum") -> Tensor:
        return self._ranks.all_reduce(tensor, op)

    def all_gather(self, tensor: Tensor) -> list[Tensor]:
        return self._ranks.all_gather(tensor)

    def broadcast_(self, tensor: Tensor, src: int) -> Tensor:
        return self._ranks.broadcast_(tensor, src)

    def reduce_(self, tensor: Tensor, dst: int) -> Tensor:
        return self._ranks.reduce_(tensor, dst)

    def say_once(self, key: str, message: str) -> None:
        """A RuntimeWarning, once per ``key`` over the run."""
        if self._say_once is not None:
            self._say_once(key, message)
