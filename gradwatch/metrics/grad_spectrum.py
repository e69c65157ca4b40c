"""Per-layer gradient spectra as torchmetrics (family ``grad_spectrum``).

:class:`GradSpectrum` watches the mini-batch gradient the optimizer applies (pre-clip, accumulated,
all-reduced). :class:`PerExampleGradSpectrum` reproduces the seed papers' protocol (Li et al. 2024):
gradients of single probe examples, model in eval mode, spectra averaged per layer. The two are
different quantities: the spectrum of a mean of gradients is not the mean of their spectra.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from gradwatch.cadence import Cadence, as_cadence
from gradwatch.checks import check_bool, check_choice, check_choices, check_int
from gradwatch.functional.spectra import STATISTICS, SpectrumMethod, cross_layer_mad, gradient_spectrum_statistics
from gradwatch.metrics.base import Chart, ChartGroup, Diagnostic, Heatmap, LayersFailed, Results, StepContext
from gradwatch.metrics.layer_faults import say_faults
from gradwatch.metrics.spectra_ranks import spread_spectra
from gradwatch.registry import BuildInputs, Family

SPECTRUM_STATS: tuple[str, ...] = STATISTICS
SPECTRUM_METHODS: tuple[str, ...] = ("gram", "gram32", "svdvals")
_LOG_SCALE_STATS = {"nuclear_norm", "spectral_norm", "frobenius_norm"}

@dataclass(frozen=True)
class SpectraConfig:
    """Per-layer gradient spectra (family ``grad_spectrum``).

    Attributes:
        every: cadence of the full spectrum of every watched layer's mini-batch gradient.
        stats: which statistics to log; any of ``SPECTRUM_STATS``.
        method: ``"gram"``: eigenvalues of the smaller Gram matrix formed and solved in float64 (on the
            CPU one layer per core, on a GPU batched over same-shaped layers; statistics within ~1e-6
            relative of a float64 SVD, even for rank-deficient gradients);
            ``"gram32"``: the same in float32 with torch, batched; kept to show the precision choice: it is
            no faster than ``"gram"`` (slower on the CPU), and a singular value below
            ~sqrt(eps32) * s_1 = 3e-4 * s_1 is lost in rounding, so nuclear norm and effective rank
            of rank-deficient or ill-conditioned gradients can be off by 1e-3 to 1e-1;
            ``"svdvals"``: ``torch.linalg.svdvals`` in float64, batched (the reference).
            An FSDP2-sharded gradient always takes the float64 Gram, assembled from the shards.
        mad: log the cross-layer mean absolute difference of each statistic per layer family.
        heatmap_every: cadence of the layer-by-step heatmap images (0 turns them off).
        embeddings, output_head: deprecated here; use ``WatchConfig(embeddings=..., output_head=...)``,
            shared by every family.
        per_example: the seed papers' protocol: per-example gradients on the probe set, spectra averaged
            per layer, logged as ``grad_spectrum/per_example/<stat>/<param>``.
        per_example_every: cadence of the per-example mode.
        per_example_size: how many probe examples the per-example mode uses.
        shard_buffer_bytes: the most extra memory, beyond the largest layer's Gram matrix, that spectra
            spread over ranks hold per rank (float64 chunks of FSDP2 shards, owned Grams waiting for their
            solve): larger means fewer, bigger collectives. Under DDP or one process each owner holds a
            float64 copy and the Gram of the layers it is solving, as before.
    """

    every: int | Cadence = 50
    stats: Sequence[str] = SPECTRUM_STATS
    method: Literal["gram", "gram32", "svdvals"] = "gram"
    mad: bool = True
    heatmap_every: int | Cadence = 500
    embeddings: bool | None = None
    output_head: bool | None = None
    per_example: bool = False
    per_example_every: int | Cadence = 500
    per_example_size: int = 16
    shard_buffer_bytes: int = 16 * 2**20

    def __post_init__(self) -> None:
        object.__setattr__(self, "every", as_cadence("SpectraConfig.every", self.every))
        object.__setattr__(self, "stats", check_choices("SpectraConfig.stats", self.stats, SPECTRUM_STATS))
        check_choice("SpectraConfig.method", self.method, SPECTRUM_METHODS)
        if type(self.heatmap_every) is int and self.heatmap_every == 0:  # 0: none (not False, not 0.0)
            object.__setattr__(self, "heatmap_every", None)
        else:
            object.__setattr__(self, "heatmap_every", as_cadence("SpectraConfig.heatmap_every", self.heatmap_every))
        object.__setattr__(self, "per_example_every",
                           as_cadence("SpectraConfig.per_example_every", self.per_example_every))
        check_int("SpectraConfig.per_example_size", self.per_example_size, minimum=1)
        check_int("SpectraConfig.shard_buffer_bytes", self.shard_buffer_bytes, minimum=4096)
        for name in ("mad", "per_example"):
            check_bool(f"SpectraConfig.{name}", getattr(self, name))
        for name in ("embeddings", "output_head"):
            if getattr(self, name) is not None:
                check_bool(f"SpectraConfig.{name}", getattr(self, name))



def _build(config: SpectraConfig, inputs: BuildInputs) -> list[Diagnostic]:
    watched = inputs.watched
    if not watched:
        return []
    tags = [w.tag for w in watched]
    families = [w.family for w in watched]
    out: list[Diagnostic] = [GradSpectrum(tags, families, config.stats, config.method, config.mad,
                                          config.every, config.heatmap_every,
                                          shard_buffer_bytes=config.shard_buffer_bytes)]
    if config.per_example:
        out.append(PerExampleGradSpectrum(tags, families, config.stats, config.method, mad=False,
                                          every=config.per_example_every, heatmap_every=None,
                                          num_examples=config.per_example_size))
    return out


FAMILY = Family(key="spectra", stem="grad_spectrum", config_class=SpectraConfig, default_on=True, build=_build,
                report="gradwatch.integrations.report.page:spectra_section",
                summary="singular-value statistics of every watched layer's gradient",
                knobs=("method", "heatmap_every", "per_example", "per_example_every", "per_example_size",
                       "shard_buffer_bytes"))


class GradSpectrum(Diagnostic):
    """Spectrum statistics of each watched layer's gradient, averaged over the updates of an interval.

    ``update(matrices, indices)`` takes the gradient matrices of the layers at ``indices`` (into the
    ``tags`` given at construction); ``compute()`` returns ``grad_spectrum/<stat>/<tag>`` for every
    layer, ``grad_spectrum/mad/<stat>/<family>`` for every family of two or more layers, and
    ``grad_spectrum/nonfinite_layers`` (mean number of layers per update whose gradient had an inf/NaN).
    States are sums, so a non-finite layer-step is left out of its layer's mean rather than poisoning it.

    Ranks (:mod:`gradwatch.metrics.spectra_ranks`): every rank observes; each layer has one owner rank
    (balanced by cost) that computes its statistics, and an FSDP2-sharded gradient is never gathered (its
    Gram is assembled from the shards). With more than one rank it also logs
    ``grad_spectrum/extra_memory_bytes``: the most extra memory one rank allocated for it (max over the
    interval). A layer whose computation fails on one rank is a gap at that step; the others stand.
    """

    stem = "grad_spectrum"
    needs = frozenset({"gradient_shards"})
    runs_on = "all_ranks"  # the layers are shared out: every rank enters the same collectives
    enters_every_collective = True  # spread_spectra catches its own errors and enters every collective
    prefix = "grad_spectrum"

    def __init__(self, tags: Sequence[str], families: Sequence[str], stats: Sequence[str],
                 method: SpectrumMethod = "gram", mad: bool = True, every: Cadence | int = 50,
                 heatmap_every: Cadence | None = None, shard_buffer_bytes: int = 16 * 2**20,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.shard_buffer_bytes = int(shard_buffer_bytes)
        self.owners: list[int] = []  # each layer's owner rank at the last observation (-1: no gradient)
        self.spread_over_ranks = False
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
        self.add_state("extra_bytes", torch.zeros((), dtype=torch.float64), dist_reduce_fx="max", persistent=False)
        groups: dict[str, list[int]] = {}
        for i, fam in enumerate(self.families):
            groups.setdefault(fam, []).append(i)
        self._family_rows = {f: rows for f, rows in groups.items() if len(rows) >= 2}

    def observe_cadence(self) -> Cadence:
        return self._every

    def observe(self, ctx: StepContext) -> None:
        spread = spread_spectra(ctx, self.stats, self.method, self.shard_buffer_bytes)
        self.owners = spread.owners
        self.spread_over_ranks = ctx.world_size > 1
        idx = [j for j in range(len(self.tags)) if bool(spread.present[j])]
        self.update([], idx, values=spread.values[:, idx], nonfinite=spread.nonfinite[idx],
                    extra_bytes=spread.peak_bytes)
        if ctx.world_size == 1:  # the faults are named from the gradients one process holds (views: no copy)
            matrices, indices = ctx.gradients()
            say_faults(ctx, self.tags, matrices, indices, spread.nonfinite[list(indices)])
        if spread.errors:
            j, exc = spread.errors[0]
            raise LayersFailed(f"computing {len(spread.failed)} layer(s) failed on rank {ctx.rank} (a gap at "
                               f"this step; the other layers are logged): {exc!r}", layer=self.tags[j], cause=exc)

    def update(self, matrices: Sequence[Tensor], indices: Sequence[int] | None = None, *,  # type: ignore[override]
               values: Tensor | None = None, nonfinite: Tensor | None = None,
               extra_bytes: float | None = None) -> None:
        """Add one update: the gradient matrices of the layers at ``indices`` (default: all, in order), or
        their statistics already computed (``values`` (stats, layers), NaN for a gap; ``nonfinite`` flags)."""
        if extra_bytes is not None:
            self.extra_bytes = torch.maximum(self.extra_bytes, torch.tensor(float(extra_bytes),
                                             dtype=self.extra_bytes.dtype, device=self.extra_bytes.device))
        if indices is None:
            indices = range(len(matrices))
        if len(indices) == 0:
            self.updates += 1
            return
        if values is None:
            computed, bad = gradient_spectrum_statistics(matrices, self.stats, self.method)
            values = torch.stack([computed[s] for s in self.stats])
        else:
            bad = nonfinite if nonfinite is not None else torch.zeros(values.shape[1], dtype=torch.bool)
        # the states' dtype may have been changed with .to(dtype) / set_dtype
        stacked = values.to(self.total.device, self.total.dtype)
        idx = torch.as_tensor(list(indices), device=self.total.device)
        finite = torch.isfinite(stacked)
        self.total.index_add_(1, idx, torch.where(finite, stacked, torch.zeros_like(stacked)))
        self.count.index_add_(1, idx, finite.to(self.count.dtype))
        self.nonfinite += bad.sum().to(self.nonfinite.device, self.nonfinite.dtype)
        self.updates += 1

    def compute(self) -> dict[str, Tensor]:
        """Per layer and statistic, the mean over the interval's updates of its finite values (NaN where
        none was finite); the cross-layer MAD of those means per family; the non-finite layer count."""
        return self._statistics()

    def _statistics(self) -> dict[str, Tensor]:
        mean = self.total / self.count  # 0/0 -> NaN: no finite value in the interval
        out: dict[str, Tensor] = {}
        for s, stat in enumerate(self.stats):
            for layer, tag in enumerate(self.tags):
                out[f"{self.prefix}/{stat}/{tag}"] = mean[s, layer]
            if self.mad:
                for fam, rows in self._family_rows.items():
                    out[f"{self.prefix}/mad/{stat}/{fam}"] = cross_layer_mad(mean[s, rows])
        if self.prefix == "grad_spectrum":
            out["grad_spectrum/nonfinite_layers"] = self.nonfinite / self.updates.clamp_min(1)
            if self.spread_over_ranks:
                out["grad_spectrum/extra_memory_bytes"] = self.extra_bytes.clone()
        return out

    def failed_result(self) -> Results:
        return Results(scalars=self._statistics())  # of the empty interval: NaN for every layer and MAD

    def charts(self) -> list[Chart]:
        charts: list[Chart] = []
        for stat in self.stats:
            for fam in dict.fromkeys(self.families):
                tags = tuple(f"{self.prefix}/{stat}/{t}" for t, f in zip(self.tags, self.families) if f == fam)
                charts.append(ChartGroup(f"{self.prefix}/{stat}", f"{stat} | {fam}", tags))
            if self.mad and self._family_rows:
                charts.append(ChartGroup(f"{self.prefix}/mad", f"{stat} cross-layer MAD",
                                         tuple(f"{self.prefix}/mad/{stat}/{f}" for f in self._family_rows)))
        if self._heatmap_every is not None:
            charts.extend(Heatmap(f"{self.prefix}/heatmap/{stat}", tuple(f"{self.prefix}/{stat}/{t}" for t in self.tags),
                                  self.tags, stat in _LOG_SCALE_STATS, self._heatmap_every) for stat in self.stats)
        return charts


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
    runs_on = "all_ranks"  # its extra pass unshards FSDP2 modules, a collective; the same examples on every rank
    prefix = "grad_spectrum/per_example"

    def __init__(self, *args: Any, num_examples: int = 16, max_bytes: int = 512 * 2**20, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.num_examples = num_examples
        self.max_bytes = max_bytes
        self.use_vmap = True  # set to False after vmap fails once on this model

    def probe_size(self) -> int:
        return self.num_examples

    def observe(self, ctx: StepContext) -> None:
        probe = ctx.probe()
        names = list(dict.fromkeys(w.param_name for w in ctx.watched))
        with ctx.extra_pass(grad=True) as extra:
            names = self._within_memory(ctx, names, extra.params)
            params = {n: extra.params[n] for n in names}
            grads = self._vmap_gradients(extra, probe, names, params) if self.use_vmap and names else None
            if grads is None:
                grads = self._loop_gradients(extra, probe, names, params) if names else {}
        mats, idx = [], []
        for i, w in enumerate(ctx.watched):  # every example's matrices in one grouped solve
            g = grads.get(w.param_name)
            if g is not None:
                mats.extend(w.matrix(g_k) for g_k in g)
                idx.extend([i] * len(g))
        self.update(mats, idx)

    def _within_memory(self, ctx: StepContext, names: list[str], params: Any) -> list[str]:
        """The parameters whose one-example gradient fits in ``max_bytes``; each left out is said once (its
        per-example statistics log NaN; the mini-batch spectra, which need no extra copy, still cover it)."""
        kept = []
        for n in names:
            size = params[n].numel() * params[n].element_size()
            if size <= self.max_bytes:
                kept.append(n)
            else:
                ctx.say_once(f"spectra:too_large:{n}", f"gradwatch: per-example spectra skip {n}: one example's "
                             f"gradient is {size:,} bytes, over the {self.max_bytes:,}-byte memory "
                             "cap of the per-example pass; its per-example statistics log NaN (said once)")
        return kept

    def _loop_gradients(self, extra: Any, probe: Any, names: list[str],
                        params: Any) -> dict[str, list[Tensor]]:
        out: dict[str, list[Tensor]] = {n: [] for n in names}
        for batch in probe.example_batches(self.num_examples):
            loss = probe.per_example_loss(extra.model, extra.cast(batch)).sum()
            for n, g in zip(names, torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)):
                if g is not None:
                    out[n].append(g)
        return {n: g for n, g in out.items() if g}

    def _vmap_gradients(self, extra: Any, probe: Any, names: list[str],
                        params: Any) -> dict[str, Tensor] | None:
        from torch.func import functional_call, grad, vmap
        from torch.utils._pytree import tree_map

        loss_module = _ProbeLoss(extra.model, probe)
        weights = {f"model.{n}": params[n].detach() for n in names}
        per_example_bytes = sum(w.numel() * w.element_size() for w in weights.values())
        chunk = max(1, min(self.num_examples, self.max_bytes // max(per_example_bytes, 1)))

        def example_loss(w: dict[str, Tensor], example: Any) -> Tensor:
            one = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, example)
            return functional_call(loss_module, w, (one,)).sum()

        try:
            batch = extra.cast(probe.batches(self.num_examples, batch_size=self.num_examples)[0])
            g = vmap(grad(example_loss), in_dims=(None, 0), chunk_size=chunk)(weights, batch)
        except Exception:  # vmap cannot trace this model or batch: the loop is exact too, only slower
            self.use_vmap = False
            return None
        return {n: g[f"model.{n}"] for n in names}
