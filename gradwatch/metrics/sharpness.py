"""Edge-of-stability sharpness as a torchmetric (family ``sharpness``).

Sharpness is the largest algebraic eigenvalue lambda_1 of the Hessian of the training loss on a fixed
probe set (Cohen et al. 2021, "Gradient descent on neural networks typically occurs at the edge of
stability"). Gradient descent is stable on a quadratic only while lambda_1 < 2/lr; in practice lambda_1
rises to that line (progressive sharpening) and hovers there. For Adam the relevant quantity is the
preconditioned sharpness lambda_1(P^-1/2 H P^-1/2) against (2 + 2 beta1) / ((1 - beta1) lr)
(Cohen et al. 2022, "Adaptive gradient methods at the edge of stability").

The loss is the one the optimizer minimizes, as the host computes it (Lightning's ``training_step``, HF's
``compute_loss``), averaged over probe batches of the training batch size, so a sum-reduced loss keeps
its scale. Lanczos is warm-started from the previous top eigenvector.

Models stored in half precision (bf16/fp16 parameters) are measured in float32: float32 copies of the
parameters and floating buffers are swapped in for the duration of the loss closure (torch's stateless
reparametrization, so the host's own loss code runs unchanged) and floating probe inputs are cast to
float32; the user's parameters and buffers are never modified and no ``.grad`` is written.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from gradwatch.config import Cadence, SharpnessConfig, WatchConfig
from gradwatch.functional.hessian import HessianOperator, hutchinson_trace, lanczos_top_eigenvalues
from gradwatch.functional.thresholds import adam_preconditioner, optimizer_threshold
from gradwatch.metrics.base import Diagnostic, StepContext, Watched

_FIELDS = ("lambda_max", "threshold", "ratio", "lambda_max_precond", "trace", "converged", "hvps")


_FULL = (torch.float32, torch.float64)


def _to_float32(batch: Any) -> Any:
    """``batch`` (probe batches are plain dicts, lists and tuples) with half-precision floats cast to float32."""
    return tree_map(lambda t: t.float() if isinstance(t, Tensor) and t.is_floating_point()
                    and t.dtype not in _FULL else t, batch)


def _reparametrize() -> Any:
    try:
        from torch.nn.utils.stateless import _reparametrize_module
    except ImportError:  # pragma: no cover - private API; every torch 2.x has it
        return None
    return _reparametrize_module


@contextlib.contextmanager
def _float32_view(model: nn.Module, params: Sequence[Tensor]) -> Iterator[list[Tensor] | None]:
    """Float32 leaf copies of ``params`` (and of every other half-precision parameter and floating buffer)
    swapped into ``model`` by name for the duration of the block; yields the copies of ``params`` in
    order, or None where the model is already in full precision or the swap is not available. Tied
    weights stay tied (every name of one tensor gets the same copy). Nothing of the model is modified."""
    if all(p.dtype in _FULL for p in params):
        yield None
        return
    reparametrize = _reparametrize()
    if reparametrize is None:
        yield None
        return
    copies: dict[int, Tensor] = {}
    for p in params:
        copies[id(p)] = p.detach().to(torch.float32).requires_grad_(True)
    mapping: dict[str, Tensor] = {}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, t in named:
        if id(t) not in copies:
            if not (t.is_floating_point() and t.dtype not in _FULL):
                continue
            copies[id(t)] = t.detach().to(torch.float32)
        mapping[name] = copies[id(t)]
    with reparametrize(model, mapping):
        yield [copies[id(p)] for p in params]


class Sharpness(Diagnostic):
    """Top Hessian eigenvalue(s) of the training loss against the optimizer's stability threshold.

    ``update(values)`` takes a dict with any of ``lambda_max``, ``threshold``, ``ratio``,
    ``lambda_max_precond``, ``trace``, ``converged``, ``hvps`` and ``lambda_<i>`` (i = 2..top_k);
    ``compute()`` returns their means over the interval as ``sharpness/<name>``. ``ratio`` is
    lambda over threshold, where lambda is the preconditioned eigenvalue for Adam/AdamW and the plain
    one otherwise.
    """

    family = "sharpness"
    config_field = "sharpness"
    needs = frozenset({"probe", "optimizer"})

    def __init__(self, config: SharpnessConfig, **kwargs: Any) -> None:
        kwargs.setdefault("sync_on_compute", False)  # computed on rank zero from the unwrapped model
        super().__init__(**kwargs)
        self.config = config
        self.names = _FIELDS + tuple(f"lambda_{i}" for i in range(2, config.top_k + 1))
        self.add_state("total", torch.zeros(len(self.names), dtype=torch.float64), dist_reduce_fx="sum", persistent=True)
        self.add_state("count", torch.zeros(len(self.names), dtype=torch.float64), dist_reduce_fx="sum", persistent=True)
        self._warm: Tensor | None = None
        self._warm_precond: Tensor | None = None
        self._said_unknown = False
        self._said_native = False

    @classmethod
    def from_watch(cls, config: WatchConfig, watched: Sequence[Watched]) -> list[Diagnostic]:
        return [] if config.sharpness is None else [cls(config.sharpness)]  # type: ignore[arg-type]

    def cadence(self) -> Cadence:
        return self.config.every  # type: ignore[return-value]

    def update(self, values: dict[str, float]) -> None:  # type: ignore[override]
        for name, value in values.items():
            i = self.names.index(name)
            if math.isfinite(value):
                self.total[i] += value
                self.count[i] += 1

    def compute(self) -> dict[str, Tensor]:
        """Means over the interval; ``lambda_max``, ``converged`` and ``hvps`` always (NaN after a failure),
        the others only where they apply (a threshold is known, Adam state exists, the trace is on)."""
        mean = self.total / self.count
        present = self.count > 0
        return {f"sharpness/{n}": mean[i] for i, n in enumerate(self.names)
                if n in ("lambda_max", "converged", "hvps") or present[i]}

    def layout(self) -> dict[str, dict[str, list]]:
        return {"sharpness": {
            "lambda_max vs threshold": ["Multiline", ["^sharpness/lambda_max$", "^sharpness/lambda_max_precond$",
                                                      "^sharpness/threshold$"]],
            "lambda / threshold": ["Multiline", ["^sharpness/ratio$"]],
        }}

    def _lanczos(self, matvec: Any, dim: int, warm: Tensor | None, device: torch.device) -> Any:
        cfg = self.config
        return lanczos_top_eigenvalues(matvec, dim, k=cfg.top_k, max_iter=cfg.max_iter, tol=cfg.tol,
                                       init=warm if cfg.warm_start else None, device=device)

    def observe(self, ctx: StepContext) -> None:
        probe = ctx.probe()
        batches = probe.batches(drop_last=True)  # full training-size batches keep a summed loss's scale
        params = [p for p in ctx.model.parameters() if p.requires_grad]
        values: dict[str, float] = {}
        optimizer = ctx.optimizer
        with ctx.extra_pass() as model, _float32_view(model, params) as full:
            if full is None and any(p.dtype not in _FULL for p in params) and not self._said_native:
                warnings.warn("gradwatch: cannot swap float32 copies into this half-precision model "
                              "(torch.nn.utils.stateless._reparametrize_module is missing); sharpness is "
                              "computed in the parameters' own dtype", RuntimeWarning, stacklevel=2)
                self._said_native = True
            if full is not None:
                batches = [_to_float32(b) for b in batches]

            def loss() -> Tensor:
                total = sum(probe.training_loss(model, b) for b in batches)
                return total / len(batches)

            with HessianOperator(loss, full if full is not None else params) as op:
                res = self._lanczos(op.matvec, op.dim, self._warm, op.device)
                self._warm = res.eigenvectors[:, 0].detach()
                values["lambda_max"] = float(res.eigenvalues[0])
                for i in range(1, len(res.eigenvalues)):
                    values[f"lambda_{i + 1}"] = float(res.eigenvalues[i])
                converged = res.converged
                hvps = res.num_matvecs
                info = optimizer_threshold(optimizer) if optimizer is not None else None
                lam_for_ratio = values["lambda_max"]
                if info is not None and info.preconditioned and self.config.precondition:
                    diag = adam_preconditioner(optimizer, params)
                    if diag is not None:
                        inv_sqrt = diag.to(op.device, torch.float64).rsqrt()

                        def precond_matvec(v: Tensor) -> Tensor:
                            return inv_sqrt * op.matvec(inv_sqrt * v)

                        pres = self._lanczos(precond_matvec, op.dim, self._warm_precond, op.device)
                        self._warm_precond = pres.eigenvectors[:, 0].detach()
                        values["lambda_max_precond"] = float(pres.eigenvalues[0])
                        lam_for_ratio = values["lambda_max_precond"]
                        converged = converged and pres.converged
                        hvps += pres.num_matvecs
                    else:
                        lam_for_ratio = float("nan")  # no optimizer state before the first step
                if self.config.trace_samples:
                    tr = hutchinson_trace(op.matvec, op.dim, num_samples=self.config.trace_samples, device=op.device)
                    values["trace"] = tr.estimate
                    hvps += tr.num_matvecs
        if info is None or info.kind == "unknown":
            if not self._said_unknown:
                warnings.warn(f"gradwatch: no stability threshold is known for "
                              f"{type(optimizer).__name__}; logging sharpness/lambda_max alone",
                              RuntimeWarning, stacklevel=2)
                self._said_unknown = True
        else:
            values["threshold"] = info.threshold
            values["ratio"] = lam_for_ratio / info.threshold
        values["converged"] = float(converged)
        values["hvps"] = float(hvps)
        self.update(values)
