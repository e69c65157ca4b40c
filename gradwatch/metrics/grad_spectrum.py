"""Per-layer gradient spectra as torchmetrics (family ``grad_spectrum``).

:class:`GradSpectrum` watches the mini-batch gradient the optimizer applies (pre-clip, accumulated,
all-reduced). :class:`PerExampleGradSpectrum` reproduces the seed papers' protocol (Li et al. 2024):
gradients of single probe examples, model in eval mode, spectra averaged per layer. The two are
different quantities: the spectrum of a mean of gradients is not the mean of their spectra.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from gradwatch.config import Cadence, SpectraConfig, WatchConfig
from gradwatch.functional.spectra import SpectrumMethod, cross_layer_mad, gradient_spectrum_statistics
from gradwatch.metrics.base import Diagnostic, HeatmapSpec, StepContext, Watched

_LOG_SCALE_STATS = {"nuclear_norm", "spectral_norm", "frobenius_norm"}


def _exact(tag: str) -> str:
    return "^" + re.escape(tag) + "$"


class GradSpectrum(Diagnostic):
    """Spectrum statistics of each watched layer's gradient, averaged over the updates of an interval.

    ``update(matrices, indices)`` takes the gradient matrices of the layers at ``indices`` (into the
    ``tags`` given at construction); ``compute()`` returns ``grad_spectrum/<stat>/<tag>`` for every
    layer, ``grad_spectrum/mad/<stat>/<family>`` for every family of two or more layers, and
    ``grad_spectrum/nonfinite_layers`` (mean number of layers per update whose gradient had an inf/NaN).
    States are sums, so a non-finite layer-step is left out of its layer's mean rather than poisoning it.
    """

    family = "grad_spectrum"
    config_field = "spectra"
    needs = frozenset({"gradients"})
    prefix = "grad_spectrum"

    def __init__(self, tags: Sequence[str], families: Sequence[str], stats: Sequence[str],
                 method: SpectrumMethod = "gram", mad: bool = True, every: Cadence | int = 50,
                 heatmap_every: Cadence | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("sync_on_compute", False)  # gradients are identical on every rank
        super().__init__(**kwargs)
        if len(tags) != len(families):
            raise ValueError(f"gradwatch: got {len(tags)} tags but {len(families)} families")
        self.tags = tuple(tags)
        self.families = tuple(families)
        self.stats = tuple(stats)
        self.method = method
        self.mad = mad
        self._every = every if isinstance(every, Cadence) else Cadence.every(every)
        self._heatmap_every = heatmap_every
        shape = (len(self.stats), len(self.tags))
        self.add_state("total", torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum", persistent=True)
        self.add_state("count", torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum", persistent=True)
        self.add_state("nonfinite", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum", persistent=True)
        self.add_state("updates", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum", persistent=True)
        groups: dict[str, list[int]] = {}
        for i, fam in enumerate(self.families):
            groups.setdefault(fam, []).append(i)
        self._family_rows = {f: rows for f, rows in groups.items() if len(rows) >= 2}

    @classmethod
    def from_watch(cls, config: WatchConfig, watched: Sequence[Watched]) -> list[Diagnostic]:
        spectra: SpectraConfig | None = config.spectra  # type: ignore[assignment]
        if spectra is None or not watched:
            return []
        tags = [w.tag for w in watched]
        families = [w.family for w in watched]
        out: list[Diagnostic] = [cls(tags, families, spectra.stats, spectra.method, spectra.mad,
                                     spectra.every, spectra.heatmap_every)]
        if spectra.per_example:
            out.append(PerExampleGradSpectrum(tags, families, spectra.stats, spectra.method, False,
                                              spectra.per_example_every, None,
                                              num_examples=spectra.per_example_size))
        return out

    def cadence(self) -> Cadence:
        return self._every

    def heatmap_cadence(self) -> Cadence | None:
        return self._heatmap_every

    def observe(self, ctx: StepContext) -> None:
        matrices, indices = ctx.gradients()
        self.update(matrices, indices)

    def update(self, matrices: Sequence[Tensor], indices: Sequence[int] | None = None) -> None:  # type: ignore[override]
        """Add one update: the gradient matrices of the layers at ``indices`` (default: all, in order)."""
        if indices is None:
            indices = range(len(matrices))
        if len(matrices) == 0:
            self.updates += 1
            return
        values, bad = gradient_spectrum_statistics(matrices, self.stats, self.method)
        # the states' dtype may have been changed with .to(dtype) / set_dtype
        stacked = torch.stack([values[s] for s in self.stats]).to(self.total.device, self.total.dtype)
        idx = torch.as_tensor(list(indices), device=self.total.device)
        finite = torch.isfinite(stacked)
        self.total.index_add_(1, idx, torch.where(finite, stacked, torch.zeros_like(stacked)))
        self.count.index_add_(1, idx, finite.to(self.count.dtype))
        self.nonfinite += bad.sum().to(self.nonfinite.device, self.nonfinite.dtype)
        self.updates += 1

    def compute(self) -> dict[str, Tensor]:
        mean = self.total / self.count  # 0/0 -> NaN: no finite value in the interval
        out: dict[str, Tensor] = {}
        for s, stat in enumerate(self.stats):
            for l, tag in enumerate(self.tags):
                out[f"{self.prefix}/{stat}/{tag}"] = mean[s, l]
            if self.mad:
                for fam, rows in self._family_rows.items():
                    out[f"{self.prefix}/mad/{stat}/{fam}"] = cross_layer_mad(mean[s, rows])
        if self.prefix == "grad_spectrum":
            out["grad_spectrum/nonfinite_layers"] = self.nonfinite / self.updates.clamp_min(1)
        return out

    def layout(self) -> dict[str, dict[str, list]]:
        layout: dict[str, dict[str, list]] = {}
        for stat in self.stats:
            charts: dict[str, list] = {}
            for fam in dict.fromkeys(self.families):
                tags = [f"{self.prefix}/{stat}/{t}" for t, f in zip(self.tags, self.families) if f == fam]
                charts[f"{stat} | {fam}"] = ["Multiline", [_exact(t) for t in tags]]
            layout[f"{self.prefix}/{stat}"] = charts
            if self.mad and self._family_rows:
                layout.setdefault(f"{self.prefix}/mad", {})[f"{stat} cross-layer MAD"] = [
                    "Multiline", [_exact(f"{self.prefix}/mad/{stat}/{f}") for f in self._family_rows]]
        return layout

    def heatmaps(self) -> list[HeatmapSpec]:
        return [HeatmapSpec(f"{self.prefix}/heatmap/{stat}",
                            tuple(f"{self.prefix}/{stat}/{t}" for t in self.tags), self.tags,
                            stat in _LOG_SCALE_STATS) for stat in self.stats]


class _ProbeLoss(torch.nn.Module):
    """``forward(batch)`` -> the probe's per-example loss of ``model``: a module for ``functional_call``."""

    def __init__(self, model: torch.nn.Module, probe: Any) -> None:
        super().__init__()
        self.model = model
        self.probe = probe

    def forward(self, batch: Any) -> Tensor:
        return self.probe.per_example_loss(self.model, batch)


class PerExampleGradSpectrum(GradSpectrum):
    """The seed papers' protocol: per-example gradients of the watched layers on the probe set.

    For each of the first ``num_examples`` probe examples, the gradient of that example's own loss
    (model in eval mode; nothing is written to ``.grad``) is taken, each layer's spectrum statistics
    computed, and the statistics averaged over the examples. Tags ``grad_spectrum/per_example/<stat>/<param>``.

    The gradients come from ``torch.func.vmap(grad(...))`` over the examples, in chunks that keep the
    per-example gradients under ``max_bytes``; where vmap cannot trace the model (data-dependent control
    flow, non-tensor batch entries), from a loop of ``torch.autograd.grad`` calls, one example at a time.
    """

    needs = frozenset({"probe"})
    prefix = "grad_spectrum/per_example"

    def __init__(self, *args: Any, num_examples: int = 16, max_bytes: int = 512 * 2**20, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.num_examples = num_examples
        self.max_bytes = max_bytes
        self.use_vmap = True  # set to False after vmap fails once on this model

    def observe(self, ctx: StepContext) -> None:
        probe = ctx.probe()
        names = list(dict.fromkeys(w.param_name for w in ctx.watched))
        with ctx.extra_pass() as model:
            grads = self._vmap_gradients(model, probe, names, ctx.params) if self.use_vmap else None
            if grads is None:
                grads = self._loop_gradients(model, probe, names, ctx.params)
        mats, idx = [], []
        for i, w in enumerate(ctx.watched):  # every example's matrices in one grouped solve
            g = grads.get(w.param_name)
            if g is not None:
                mats.extend(w.matrix(g_k) for g_k in g)
                idx.extend([i] * len(g))
        self.update(mats, idx)

    def _loop_gradients(self, model: torch.nn.Module, probe: Any, names: list[str],
                        params: Any) -> dict[str, list[Tensor]]:
        out: dict[str, list[Tensor]] = {n: [] for n in names}
        for batch in probe.example_batches(self.num_examples):
            loss = probe.per_example_loss(model, batch).sum()
            for n, g in zip(names, torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)):
                if g is not None:
                    out[n].append(g)
        return {n: g for n, g in out.items() if g}

    def _vmap_gradients(self, model: torch.nn.Module, probe: Any, names: list[str],
                        params: Any) -> dict[str, Tensor] | None:
        from torch.func import functional_call, grad, vmap
        from torch.utils._pytree import tree_map

        loss_module = _ProbeLoss(model, probe)
        weights = {f"model.{n}": params[n].detach() for n in names}
        per_example_bytes = sum(w.numel() * w.element_size() for w in weights.values())
        chunk = max(1, min(self.num_examples, self.max_bytes // max(per_example_bytes, 1)))

        def example_loss(w: dict[str, Tensor], example: Any) -> Tensor:
            one = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, example)
            return functional_call(loss_module, w, (one,)).sum()

        try:
            batch = probe.batches(self.num_examples, batch_size=self.num_examples)[0]
            g = vmap(grad(example_loss), in_dims=(None, 0), chunk_size=chunk)(weights, batch)
        except Exception:  # vmap cannot trace this model or batch: the loop is exact too, only slower
            self.use_vmap = False
            return None
        return {n: g[f"model.{n}"] for n in names}

    def heatmaps(self) -> list[HeatmapSpec]:
        return []
