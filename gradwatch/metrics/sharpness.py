"""Edge-of-stability sharpness as a torchmetric (family ``sharpness``).

Sharpness is the largest algebraic eigenvalue lambda_1 of the Hessian of the training loss on a fixed
probe set (Cohen et al. 2021, "Gradient descent on neural networks typically occurs at the edge of
stability"). Gradient descent is stable on a quadratic only while lambda_1 < 2/lr; in practice lambda_1
rises to that line (progressive sharpening) and hovers there. For Adam the relevant quantity is the
preconditioned sharpness lambda_1(P^-1/2 H P^-1/2) against (2 + 2 beta1) / ((1 - beta1) lr)
(Cohen et al. 2022, "Adaptive gradient methods at the edge of stability").

The loss is the one the optimizer minimizes, as the host computes it (Lightning's ``training_step``, HF's
``compute_loss``), averaged over probe batches of the training batch size, so a sum-reduced loss keeps
its scale. Lanczos is warm-started from the previous top eigenvector, which is carried state: it is
saved in checkpoints, so the first estimate after a resume is as cheap as it would have been.

Half-precision models (bf16/fp16 parameters) are measured in float32 through the engine's extra-pass
precision policy (``StepContext.extra_pass``); the user's parameters are never modified.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gradwatch.cadence import Cadence, as_cadence
from gradwatch.checks import check_bool, check_float, check_int, fail
from gradwatch.functional.sharpness import sharpness_estimate
from gradwatch.functional.thresholds import adam_preconditioner, optimizer_threshold
from gradwatch.metrics.base import Chart, ChartGroup, Diagnostic, Results, StepContext
from gradwatch.registry import BuildInputs, Family

_FIELDS = ("lambda_max", "threshold", "ratio", "lambda_max_precond", "trace", "converged", "hvps")


@dataclass(frozen=True)
class SharpnessConfig:
    """Edge-of-stability sharpness (family ``sharpness``): the top Hessian eigenvalue of the training
    loss on a fixed probe batch, against the optimizer's stability threshold.

    Attributes:
        every: cadence.
        probe_size: examples in the probe batch (drawn once, seeded, from the training data).
        max_iter: Lanczos iterations at most (Hessian-vector products per estimate).
        tol: relative residual at which Lanczos stops (``||Hv - lambda v|| <= tol |lambda|``).
        top_k: how many top eigenvalues to log (``sharpness/lambda_<i>`` beyond the first).
        trace_samples: Hutchinson probes for ``sharpness/trace`` (0 turns the trace off).
        warm_start: start Lanczos from the previous top eigenvector.
        precondition: for Adam/AdamW, also log ``lambda_max_precond`` = lambda_1(P^-1/2 H P^-1/2).
    """

    every: int | Cadence = 500
    probe_size: int = 256
    max_iter: int = 50
    tol: float = 1e-3
    top_k: int = 1
    trace_samples: int = 0
    warm_start: bool = True
    precondition: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "every", as_cadence("SharpnessConfig.every", self.every))
        check_int("SharpnessConfig.probe_size", self.probe_size, minimum=1)
        check_int("SharpnessConfig.max_iter", self.max_iter, minimum=1)
        check_float("SharpnessConfig.tol", self.tol, low=0.0, high=0.5)
        check_int("SharpnessConfig.top_k", self.top_k, minimum=1)
        if self.top_k > self.max_iter:
            raise fail("SharpnessConfig.top_k", self.top_k, f"an int <= max_iter ({self.max_iter})")
        check_int("SharpnessConfig.trace_samples", self.trace_samples, minimum=0)
        for name in ("warm_start", "precondition"):
            check_bool(f"SharpnessConfig.{name}", getattr(self, name))





class Sharpness(Diagnostic):
    """Top Hessian eigenvalue(s) of the training loss against the optimizer's stability threshold.

    ``update(values)`` takes a float64 vector over :attr:`names` (NaN where a value does not apply);
    ``compute()`` returns the interval means of the finite values as ``sharpness/<name>``. ``ratio`` is
    lambda over threshold, where lambda is the preconditioned eigenvalue for Adam/AdamW and the plain one
    otherwise. Carried state: the warm-start eigenvectors.
    """

    stem = "sharpness"
    needs = frozenset({"probe", "optimizer"})
    runs_on = "all_ranks"  # a forward through FSDP2-sharded modules needs every rank; same probe, same estimate

    def __init__(self, config: SharpnessConfig, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.config = config
        self.names = _FIELDS + tuple(f"lambda_{i}" for i in range(2, config.top_k + 1))
        self.add_state("total", torch.zeros(len(self.names), dtype=torch.float64), dist_reduce_fx="sum", persistent=True)
        self.add_state("count", torch.zeros(len(self.names), dtype=torch.float64), dist_reduce_fx="sum", persistent=True)
        self._warm: Tensor | None = None
        self._warm_precond: Tensor | None = None
        self._emitted: tuple[str, ...] = ()
        self.unknown_optimizer: str | None = None  # the class name, once no threshold was known for it

    def observe_cadence(self) -> Cadence:
        return self.config.every  # type: ignore[return-value]

    def probe_size(self) -> int:
        return self.config.probe_size

    def update(self, values: Tensor) -> None:  # type: ignore[override]
        values = values.to(self.total.device, self.total.dtype)
        finite = torch.isfinite(values)
        self.total += torch.where(finite, values, torch.zeros_like(values))
        self.count += finite.to(self.count.dtype)

    def compute(self) -> dict[str, Tensor]:
        """Means over the interval; ``lambda_max``, ``converged`` and ``hvps`` always (NaN after a failure),
        the others only where they apply (a threshold is known, Adam state exists, the trace is on)."""
        mean = self.total / self.count
        present = self.count > 0
        out = {f"sharpness/{n}": mean[i] for i, n in enumerate(self.names)
               if n in ("lambda_max", "converged", "hvps") or present[i]}
        self._emitted = tuple(out)
        return out

    def failed_result(self) -> Results:
        """NaN for every tag the last interval logged, so a failed point shows as a gap in each series."""
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        tags = self._emitted or tuple(f"sharpness/{n}" for n in ("lambda_max", "converged", "hvps"))
        return Results(scalars=dict.fromkeys(tags, nan))

    def charts(self) -> list[Chart]:
        return [ChartGroup("sharpness", "lambda_max vs threshold",
                           ("sharpness/lambda_max", "sharpness/lambda_max_precond", "sharpness/threshold")),
                ChartGroup("sharpness", "lambda / threshold", ("sharpness/ratio",))]

    def carried_state(self) -> dict[str, Any]:
        return {"warm": self._warm, "warm_precond": self._warm_precond}

    def load_carried_state(self, state: Mapping[str, Any]) -> None:
        self._warm, self._warm_precond = state.get("warm"), state.get("warm_precond")

    def observe(self, ctx: StepContext) -> None:
        probe = ctx.probe()
        batches = probe.batches(drop_last=True)  # full training-size batches keep a summed loss's scale
        optimizer = ctx.optimizer
        info = optimizer_threshold(optimizer) if optimizer is not None else None
        cfg = self.config
        # the optimizer's state is keyed by the parameters as they are outside the pass (sharded under FSDP2)
        originals = dict(ctx.model.named_parameters())
        trainable = [n for n, p in originals.items() if p.requires_grad]
        with ctx.extra_pass(grad=True) as extra:
            params = [extra.params[n] for n in trainable]
            batches = [extra.cast(b) for b in batches]

            def loss() -> Tensor:
                value = sum(probe.training_loss(extra.model, b) for b in batches) / len(batches)
                if not bool(torch.isfinite(value.detach()).all()):  # no Hessian of a NaN loss: say so, not LAPACK
                    raise FloatingPointError(f"the training loss on the probe set is {float(value)}: no Hessian "
                                             "at this step")
                return value

            def precond() -> Tensor | None:
                if info is None or not info.preconditioned or not cfg.precondition:
                    return None
                return adam_preconditioner(optimizer, [originals[n] for n in trainable])

            est = sharpness_estimate(loss, params, top_k=cfg.top_k, max_iter=cfg.max_iter, tol=cfg.tol,
                                     warm=self._warm if cfg.warm_start else None, precond_diag=precond,
                                     warm_precond=self._warm_precond if cfg.warm_start else None,
                                     trace_samples=cfg.trace_samples)
        self._warm, self._warm_precond = est.eigenvector, est.precond_eigenvector
        values = dict.fromkeys(self.names, float("nan"))
        values["lambda_max"] = est.eigenvalues[0]
        values.update({f"lambda_{i + 1}": v for i, v in enumerate(est.eigenvalues[1:], start=1)})
        if est.precond_eigenvalue is not None:
            values["lambda_max_precond"] = est.precond_eigenvalue
        if est.trace is not None:
            values["trace"] = est.trace
        if info is None or info.kind == "unknown":
            self.unknown_optimizer = "no optimizer" if optimizer is None else type(optimizer).__name__
            why = ("the host gave no optimizer" if optimizer is None
                   else f"no stability threshold is known for {self.unknown_optimizer}")
            ctx.say_once("sharpness/threshold", f"gradwatch: {why}; logging sharpness/lambda_max without a threshold")
        else:
            values["threshold"] = info.threshold
            preconditioned_case = info.preconditioned and cfg.precondition
            lam = values["lambda_max_precond"] if preconditioned_case else values["lambda_max"]
            values["ratio"] = lam / info.threshold  # NaN for Adam before its first step (no state yet)
        values["converged"] = float(est.converged)
        values["hvps"] = float(est.hvps)
        self.update(torch.tensor([values[n] for n in self.names], dtype=torch.float64))


def _build(config: SharpnessConfig, inputs: BuildInputs) -> list[Diagnostic]:
    return [Sharpness(config)]


FAMILY = Family(key="sharpness", stem="sharpness", config_class=SharpnessConfig, default_on=False, build=_build,
                report="gradwatch.integrations.report.page:sharpness_section",
                summary="top Hessian eigenvalue of the training loss against the optimizer's stability threshold",
                knobs=("probe_size", "max_iter", "tol", "top_k", "trace_samples"))
