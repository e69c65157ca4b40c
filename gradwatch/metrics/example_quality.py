"""Data quality, live: each probe example's own gradient statistics, their distribution and tails (family
``example_quality``, off by default).

The training-time side of ``gradwatch score-data`` (Li et al. 2024, 2025: per-example gradients, model in eval
mode). At its cadence, for each of the first ``size`` probe examples: the gradient of that example's own loss
with respect to every watched matrix (the route of :class:`~gradwatch.metrics.grad_spectrum.PerExampleGradSpectrum`:
``torch.func.vmap(grad)`` in chunks, or a loop; nothing written to ``.grad``), each matrix's statistics, and the
example's value per layer group: the mean over the group's matrices (the groups of ``score-data``: ``all`` watched
matrices, and the q, k, v, o and MLP matrices of the transformer blocks). Logged:

- ``example_quality/<stat>/{mean,p10,median,p90,min,max}``: the distribution over the probe examples (group ``all``);
- ``example_quality/<stat>/<role>/{p10,median,p90}`` for each role the model has (``q``, ``k``, ``v``, ``o``, ``mlp``);
- ``example_quality/<stat>``: the per-example values (group ``all``), as a histogram;
- ``example_quality/tails``: text, the ``tails`` examples at each end of ``rank_by`` with their dataset index and
  value, decoded by the probe's ``decode`` (the Hugging Face Trainer's tokenizer; a short description otherwise),
  so a person sees which training examples look low-quality while training (the papers: higher-quality data
  have lower nuclear norms and higher effective ranks).

The probe set is fixed, so the logged series is the distribution of the same examples as training moves on.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gradwatch.cadence import Cadence, as_cadence
from gradwatch.checks import check_choice, check_choices, check_int
from gradwatch.functional.layer_roles import ROLES, block_index, matrix_role, role_groups
from gradwatch.functional.spectra import STATISTICS, gradient_spectrum_statistics
from gradwatch.metrics.base import Chart, ChartGroup, Diagnostic, Results, StepContext
from gradwatch.metrics.grad_spectrum import PerExampleGradSpectrum
from gradwatch.registry import BuildInputs, Family

QUANTITIES: tuple[str, ...] = ("mean", "p10", "median", "p90", "min", "max")
ROLE_QUANTITIES: tuple[str, ...] = ("p10", "median", "p90")
#: the end of each statistic the papers associate with lower-quality data (Li et al. 2025)
LOW_QUALITY_END = {"nuclear_norm": "high", "spectral_norm": "high", "frobenius_norm": "high",
                   "effective_rank": "low", "stable_rank": "low", "top1_ratio": "high"}
_TEXT_CHARS = 200


@dataclass(frozen=True)
class ExampleQualityConfig:
    """Live per-example gradient statistics of the probe set (family ``example_quality``).

    Attributes:
        every: cadence (a probe pass with one gradient per example: keep it sparse).
        size: probe examples used (at most the probe set).
        stats: statistics logged; any of ``gradwatch.functional.spectra.STATISTICS``.
        tails: examples shown at each end of ``rank_by`` (0: no tails text).
        rank_by: the statistic the tails are taken of; one of ``stats``.
    """

    every: int | Cadence = 500
    size: int = 32
    stats: Sequence[str] = ("nuclear_norm", "effective_rank", "spectral_norm", "stable_rank")
    tails: int = 3
    rank_by: str = "effective_rank"

    def __post_init__(self) -> None:
        object.__setattr__(self, "every", as_cadence("ExampleQualityConfig.every", self.every))
        check_int("ExampleQualityConfig.size", self.size, minimum=2)
        stats = check_choices("ExampleQualityConfig.stats", self.stats, STATISTICS)
        object.__setattr__(self, "stats", stats)
        check_int("ExampleQualityConfig.tails", self.tails, minimum=0)
        check_choice("ExampleQualityConfig.rank_by", self.rank_by, stats)


def _build(config: ExampleQualityConfig, inputs: BuildInputs) -> list[Diagnostic]:
    if not inputs.watched:
        return []
    return [ExampleQuality([w.tag for w in inputs.watched], [w.family for w in inputs.watched], config.stats,
                           every=config.every, num_examples=config.size, tails=config.tails, rank_by=config.rank_by)]


FAMILY = Family(key="example_quality", stem="example_quality", config_class=ExampleQualityConfig, default_on=False,
                build=_build, knobs=("size", "tails"),
                summary="each probe example's own gradient statistics: their distribution and the examples at both tails")


def _describe(example: Any) -> str:
    if isinstance(example, dict):
        return ", ".join(f"{k}: {tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__}" for k, v in example.items())
    if isinstance(example, (tuple, list)):
        return ", ".join(str(tuple(v.shape)) if isinstance(v, Tensor) else type(v).__name__ for v in example)
    return type(example).__name__


def _cell(text: str) -> str:
    text = " ".join(str(text).split())
    text = text if len(text) <= _TEXT_CHARS else text[:_TEXT_CHARS - 3] + "..."
    return text.replace("|", "\\|")


class ExampleQuality(PerExampleGradSpectrum):
    """Per-example statistics of the probe set: distribution and tails (see the module docstring).

    An interval holds the latest observation (the probe set is fixed; an average over observations would mix
    the model's states). The decoded tails are made at observation time and kept as interval state (UTF-8 bytes
    of their JSON), so a checkpoint carries them.
    """

    stem = "example_quality"
    prefix = "example_quality"

    def __init__(self, tags: Sequence[str], families: Sequence[str], stats: Sequence[str], *,
                 every: Cadence | int = 500, num_examples: int = 32, tails: int = 3, rank_by: str = "effective_rank",
                 method: str = "gram", **kwargs: Any) -> None:
        super().__init__(tags, families, stats, method, mad=False, every=every, heatmap_every=None,  # type: ignore[arg-type]
                         num_examples=num_examples, **kwargs)
        if rank_by not in self.stats:
            raise ValueError(f"gradwatch: ExampleQuality rank_by {rank_by!r} is not among its stats {list(self.stats)}")
        self.tails = tails
        self.rank_by = rank_by
        groups = role_groups([matrix_role(t) for t in self.tags], [block_index(t) for t in self.tags])
        self.groups = {g: rows for g, rows in groups.items() if g == "all" or g in ROLES}
        self.add_state("values", torch.full((len(self.stats), len(self.groups), num_examples), math.nan,
                                            dtype=torch.float64), dist_reduce_fx=None, persistent=True)
        self.add_state("tail_bytes", torch.zeros(0, dtype=torch.uint8), dist_reduce_fx=None, persistent=True)

    def observe(self, ctx: StepContext) -> None:
        probe = ctx.probe()
        n = min(self.num_examples, len(probe))
        names = list(dict.fromkeys(w.param_name for w in ctx.watched))
        with ctx.extra_pass(grad=True) as extra:
            params = {k: extra.params[k] for k in names}
            grads = self._vmap_gradients(extra, probe, names, params) if self.use_vmap else None
            if grads is None:
                grads = self._loop_gradients(extra, probe, names, params)
        column = {t: j for j, t in enumerate(self.tags)}
        watched = [w for w in ctx.watched if w.param_name in grads and w.tag in column]
        mats = [w.matrix(grads[w.param_name][k]) for k in range(n) for w in watched]
        values, _ = gradient_spectrum_statistics(mats, self.stats, self.method)
        table = torch.full((len(self.stats), n, len(self.tags)), math.nan, dtype=torch.float64)
        cols = torch.tensor([column[w.tag] for w in watched], dtype=torch.long)
        for s, stat in enumerate(self.stats):
            table[s][:, cols] = values[stat].reshape(n, len(watched)).cpu().double()
        per_example = torch.stack([table[:, :, rows].nanmean(-1) for rows in self.groups.values()], dim=1)
        self.update(per_example, self._tails(per_example[:, 0], probe, n))

    def _tails(self, per_example: Tensor, probe: Any, n: int) -> list[dict[str, Any]]:
        if self.tails == 0:
            return []
        row = per_example[self.stats.index(self.rank_by)].cpu()
        finite = [k for k in range(n) if math.isfinite(float(row[k]))]
        order = sorted(finite, key=lambda k: (float(row[k]), k))
        k_tail = min(self.tails, len(order) // 2)
        decode = getattr(probe, "decode", None)
        out = []
        for end, picks in (("low", order[:k_tail]), ("high", order[::-1][:k_tail])):
            for k in picks:
                example = probe.examples[k]
                try:
                    text = str(decode(example)) if decode is not None else _describe(example)
                except Exception as exc:  # noqa: BLE001 - a user's decode must not stop training
                    text = f"(decode failed: {exc!r}) {_describe(example)}"
                out.append({"end": end, "index": int(probe.indices[k]), "value": float(row[k]), "text": _cell(text)})
        return out

    def update(self, per_example: Tensor, tails: Sequence[dict[str, Any]] = ()) -> None:  # type: ignore[override]
        """Record one observation: (stats, groups, n) per-example values and the decoded tails."""
        values = torch.full_like(self.values, math.nan)
        values[:, :, :per_example.shape[-1]] = per_example.to(values.device, values.dtype)
        self.values = values
        blob = json.dumps(list(tails), ensure_ascii=False).encode("utf-8")
        self.tail_bytes = torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(self.values.device) if blob else \
            torch.zeros(0, dtype=torch.uint8, device=self.values.device)
        self.updates += 1

    def _summary(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for s, stat in enumerate(self.stats):
            for g, group in enumerate(self.groups):
                v = self.values[s, g]
                v = v[torch.isfinite(v)]
                if v.numel():
                    q = torch.quantile(v, torch.tensor([0.1, 0.5, 0.9], dtype=v.dtype, device=v.device))
                    vals = (v.mean(), q[0], q[1], q[2], v.min(), v.max())
                else:
                    vals = tuple(torch.tensor(math.nan, dtype=self.values.dtype, device=self.values.device)
                                 for _ in QUANTITIES)
                for name, x in zip(QUANTITIES, vals):
                    if group == "all":
                        out[f"{self.prefix}/{stat}/{name}"] = x
                    elif name in ROLE_QUANTITIES:
                        out[f"{self.prefix}/{stat}/{group}/{name}"] = x
        return out

    def compute(self) -> Results:  # type: ignore[override]
        """The distribution's summary (scalars), the per-example values (histograms), the tails (text)."""
        vectors = {}
        for s, stat in enumerate(self.stats):
            v = self.values[s, 0]
            v = v[torch.isfinite(v)]
            if v.numel():
                vectors[f"{self.prefix}/{stat}"] = v
        texts = {}
        tails = json.loads(bytes(self.tail_bytes.cpu().tolist()).decode("utf-8")) if self.tail_bytes.numel() else []
        if tails:
            bad = LOW_QUALITY_END.get(self.rank_by, "high")
            lines = [f"Probe examples at both ends of per-example **{self.rank_by}** (mean over the watched matrices); "
                     f"the papers associate the **{bad}** end with lower-quality data.", "",
                     "| end | dataset index | value | example |", "|---|---|---|---|"]
            lines += [f"| {t['end']} | {t['index']} | {t['value']:.5g} | {t['text']} |" for t in tails]
            texts[f"{self.prefix}/tails"] = "\n".join(lines)
        return Results(scalars=self._summary(), vectors=vectors, texts=texts)

    def _tags(self) -> list[str]:
        return [f"{self.prefix}/{stat}/{q}" if group == "all" else f"{self.prefix}/{stat}/{group}/{q}"
                for stat in self.stats for group in self.groups
                for q in (QUANTITIES if group == "all" else ROLE_QUANTITIES)]

    def failed_result(self) -> Results:
        nan = torch.tensor(math.nan, dtype=torch.float64)
        return Results(scalars={tag: nan for tag in self._tags()})

    def charts(self) -> list[Chart]:
        charts: list[Chart] = []
        for stat in self.stats:
            charts.append(ChartGroup(self.prefix, f"{stat} over the probe examples (p10, median, p90)",
                                     tuple(f"{self.prefix}/{stat}/{q}" for q in ROLE_QUANTITIES)))
            roles = [g for g in self.groups if g != "all"]
            if roles:
                charts.append(ChartGroup(self.prefix, f"{stat} median over the probe examples, by role",
                                         tuple(f"{self.prefix}/{stat}/{g}/median" for g in roles)))
        return charts
