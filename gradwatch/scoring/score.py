"""Score a dataset by the spectra of each example's own gradient: ``gradwatch score-data``.

For every example: the gradient of its own loss (:mod:`.objectives`) with respect to every q/k/v/o and MLP matrix
of the model's transformer blocks (model in eval mode, batched per-example gradients, :mod:`.gradients`); each
matrix's singular-value statistics (:func:`gradwatch.functional.spectra.gradient_spectrum_statistics`: float64
Gram eigenvalues, within ~1e-6 relative of a float64 SVD); and their means over the layer groups of
:mod:`.groups`. This is the seed papers' protocol (Li et al. 2024, 2025: batch size 1, loss on the response
tokens, the model in eval mode), applied to a whole dataset.

The output directory holds::

    run.json        what was scored: model, dataset (and its content hash), options, matrices, groups
    scores.jsonl    one record per example, in dataset order: index, id, tokens, loss, the group means
                    ("groups": {stat: {group: value}}) and the per-matrix values ("layers": {stat: [...]},
                    in run.json's matrix order); an example that could not be scored has "error" instead
    scores.parquet  the same records, when pyarrow is installed
    summary.json    per statistic and group: mean, std, quantiles over the examples; per-matrix means (for RD)
    ranking.jsonl   the examples ordered by --rank-by, best first (see RANK_DIRECTIONS)
    index.html      figures (when matplotlib is installed)

Resumable: run again with the same arguments and the examples already in ``scores.jsonl`` are kept (a torn last
line, from a run stopped mid-write, is dropped and redone). Deterministic: chunks of examples are fixed by their
dataset index, whatever was already done, so a resumed run writes the same bytes as an uninterrupted one, and
the same dataset scored twice gives identical files (same options, machine and thread count).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gradwatch.functional.spectra import SpectrumMethod, gradient_spectrum_statistics
from gradwatch.integrations.jsonl import cut_torn_tail, iter_records
from gradwatch.scoring.data import Example
from gradwatch.scoring.gradients import PerExampleGradients, activation_bytes, chunk_size
from gradwatch.scoring.groups import ScoredMatrix, layer_groups, scored_matrices
from gradwatch.scoring.objectives import OBJECTIVES, Encoded, Objective, encode, example_loss, infer_objective, token_count

SCORE_STATS: tuple[str, ...] = ("nuclear_norm", "effective_rank", "spectral_norm", "stable_rank", "frobenius_norm")
#: The order of the ranking, best first, following Li et al. 2025: higher-quality data have smaller gradients
#: (lower nuclear, spectral and Frobenius norms) spread over more directions (higher effective and stable rank).
RANK_DIRECTIONS: dict[str, str] = {"nuclear_norm": "ascending", "spectral_norm": "ascending",
                                   "frobenius_norm": "ascending", "effective_rank": "descending",
                                   "stable_rank": "descending", "loss": "ascending"}
KIND = "gradwatch-score-data"
FORMAT_VERSION = 1
RUN_FILE, SCORES_FILE, SUMMARY_FILE, RANKING_FILE, PARQUET_FILE = (
    "run.json", "scores.jsonl", "summary.json", "ranking.jsonl", "scores.parquet")


@dataclass(frozen=True)
class ScoringOptions:
    """How to score.

    Attributes:
        objective: ``"causal_lm"``, ``"pair_cosine"`` or ``None`` (from the model: see :func:`infer_objective`).
        max_length: tokens per example at most (per side for ``pair_cosine``).
        max_memory_mb: cap on one chunk's per-example gradients and activations (an estimate), in MiB.
        batch_size: examples per chunk, overriding the cap; 1 takes one example at a time.
        method: the singular-value route of :func:`gradient_spectrum_statistics` (``"gram"``: float64 Gram
            eigenvalues; ``"svdvals"``: float64 SVD, slower).
        rank_by: ``<stat>/<group>`` (or ``loss``) the ranking orders by.
    """

    objective: Objective | None = None
    max_length: int = 512
    max_memory_mb: float = 1024.0
    batch_size: int | None = None
    method: SpectrumMethod = "gram"
    rank_by: str = "effective_rank/all"

    def __post_init__(self) -> None:
        if self.objective is not None and self.objective not in OBJECTIVES:
            raise ValueError(f"gradwatch score-data: objective expected one of {list(OBJECTIVES)} or None, "
                             f"got {self.objective!r}")
        if not isinstance(self.max_length, int) or self.max_length < 2:
            raise ValueError(f"gradwatch score-data: max_length expected an int >= 2, got {self.max_length!r}")
        if not self.max_memory_mb > 0:
            raise ValueError(f"gradwatch score-data: max_memory_mb expected a number > 0, got {self.max_memory_mb!r}")
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise ValueError(f"gradwatch score-data: batch_size expected an int >= 1, got {self.batch_size!r}")
        if self.method not in ("gram", "svdvals"):
            raise ValueError(f"gradwatch score-data: method expected 'gram' or 'svdvals', got {self.method!r}")
        stat = self.rank_by.split("/", 1)[0]
        if stat not in RANK_DIRECTIONS or (self.rank_by != "loss" and "/" not in self.rank_by):
            raise ValueError(f"gradwatch score-data: rank_by expected 'loss' or '<stat>/<group>' with a stat among "
                             f"{list(SCORE_STATS)} (e.g. 'effective_rank/all', 'nuclear_norm/q/late'), got {self.rank_by!r}")


@dataclass
class ScoreResult:
    """What :func:`score_dataset` did: the output directory, the summary, and counts and timing of this call."""

    out_dir: Path
    summary: dict[str, Any]
    scored_now: int
    resumed: int
    seconds: float
    how: set[str] = field(default_factory=set)

    @property
    def examples_per_second(self) -> float:
        return self.scored_now / self.seconds if self.seconds > 0 else math.nan


def dataset_hash(examples: Sequence[Example]) -> str:
    """sha256 of the examples' content, so a resume never mixes two datasets."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.index, ex.id, [[m.role, m.content] for m in ex.prompt], ex.response],
                            ensure_ascii=False).encode())
    return h.hexdigest()


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


class Progress:
    """tqdm on stderr when it is installed, else a plain ``scored N/M`` counter line on stderr."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self.total, self.done, self.enabled = total, initial, enabled
        self._bar = None
        self._last = 0.0
        if not enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            self._print()
        else:
            self._bar = tqdm(total=total, initial=initial, unit="ex", desc="score-data", file=sys.stderr,
                             dynamic_ncols=True)

    def _print(self) -> None:
        print(f"gradwatch score-data: scored {self.done}/{self.total}", file=sys.stderr, flush=True)

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
        elif time.monotonic() - self._last > 2.0 or self.done == self.total:
            self._last = time.monotonic()
            self._print()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def read_scores(path: Path, repair: bool = False) -> list[dict[str, Any]]:
    """The records of a ``scores.jsonl`` (:func:`gradwatch.integrations.jsonl.iter_records`). A torn last line
    (a write cut short) is dropped with a warning, and with ``repair`` cut from the file; any other line that
    does not parse raises ``ValueError`` naming it."""
    if not path.is_file():
        return []
    if repair:
        cut_torn_tail(path)
    try:
        return [record for _, record in iter_records(path, strict=True)]
    except ValueError as error:
        raise ValueError(f"{error}; not a scoring written by gradwatch score-data, or damaged: delete it to start "
                         f"over") from None


class Scorer:
    """Per-example gradient spectra of one model: ``score(examples)`` -> one record per example.

    Args:
        model: a Hugging Face model (or any module whose forward takes ``input_ids`` and returns ``.logits`` for
            ``causal_lm`` or ``.last_hidden_state`` for ``pair_cosine``); put in eval mode, never changed.
        tokenizer: its tokenizer.
        options: see :class:`ScoringOptions`.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, options: ScoringOptions = ScoringOptions()) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.options = options
        self.objective: Objective = options.objective or infer_objective(model)
        self.matrices: list[ScoredMatrix] = scored_matrices(model)
        self.groups = layer_groups(self.matrices)
        names = list(dict.fromkeys(m.param_name for m in self.matrices))
        dtype = next(model.parameters()).dtype
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(tokenizer, "eos_token_id", None)
        self.grads = PerExampleGradients(model, names, example_loss(self.objective, dtype), int(pad or 0))
        shapes = [tuple(m.watched.matrix(self.grads.weights[m.param_name]).shape) for m in self.matrices]
        self.shapes = shapes
        tokens = options.max_length * (2 if self.objective == "pair_cosine" else 1)
        element = torch.finfo(dtype).bits // 8
        self.per_example_bytes = 2 * self.grads.gradient_bytes() + activation_bytes(shapes, tokens, element)
        self.chunk = chunk_size(self.per_example_bytes, int(options.max_memory_mb * 2**20), options.batch_size)

    def describe(self) -> dict[str, Any]:
        """The model-side part of ``run.json``."""
        return {"objective": self.objective,
                "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
                "device": next(self.model.parameters()).device.type,
                "matrices": [{"tag": m.tag, "role": m.role, "block": m.block, "shape": list(s)}
                             for m, s in zip(self.matrices, self.shapes)],
                "groups": self.groups, "stats": list(SCORE_STATS), "chunk": self.chunk}

    def encode(self, examples: Sequence[Example]) -> list[Encoded | str]:
        """Each example's tensors, or the message saying why it cannot be scored."""
        out: list[Encoded | str] = []
        for ex in examples:
            try:
                out.append(encode(self.tokenizer, ex, self.objective, self.options.max_length))
            except ValueError as error:
                out.append(str(error))
        return out

    def score(self, examples: Sequence[Example], encoded: Sequence[Encoded | str]) -> tuple[list[dict[str, Any]], str]:
        """One record per example (same order), and how the gradients were taken (``vmap``/``loop``/``none``)."""
        ok = [i for i, e in enumerate(encoded) if not isinstance(e, str)]
        records: list[dict[str, Any]] = [
            {"index": ex.index, "id": ex.id, "error": e} if isinstance(e, str) else {}
            for ex, e in zip(examples, encoded)]
        if not ok:
            return records, "none"
        grads, losses, how = self.grads([encoded[i] for i in ok])  # type: ignore[misc]
        mats = [m.watched.matrix(grads[m.param_name][k]) for k in range(len(ok)) for m in self.matrices]
        values, _ = gradient_spectrum_statistics(mats, SCORE_STATS, self.options.method)
        table = torch.stack([values[s] for s in SCORE_STATS]).reshape(len(SCORE_STATS), len(ok), len(self.matrices))
        table = table.cpu().numpy()
        for k, i in enumerate(ok):
            per = table[:, k, :]
            groups = {stat: {g: _finite(float(np.mean(per[s, rows]))) for g, rows in self.groups.items()}
                      for s, stat in enumerate(SCORE_STATS)}
            records[i] = {"index": examples[i].index, "id": examples[i].id,
                          "tokens": token_count(encoded[i]),  # type: ignore[arg-type]
                          "loss": _finite(float(losses[k])), "groups": groups,
                          "layers": {stat: [_finite(float(v)) for v in per[s]] for s, stat in enumerate(SCORE_STATS)}}
        return records, how


def _stats(values: Iterable[float | None]) -> dict[str, Any]:
    v = np.array([x for x in values if x is not None], dtype=np.float64)
    if not v.size:
        return {"count": 0}
    q = np.quantile(v, [0.1, 0.5, 0.9])
    return {"count": int(v.size), "mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()),
            "p10": float(q[0]), "median": float(q[1]), "p90": float(q[2]), "max": float(v.max())}


def summarize(run: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The per-dataset summary of a finished scoring (see the module docstring)."""
    ok = [r for r in records if "error" not in r]
    stats, groups = run["stats"], list(run["groups"])
    n_matrices = len(run["matrices"])
    per_layer = {}
    for stat in stats:
        cols = np.array([[np.nan if v is None else v for v in r["layers"][stat]] for r in ok], dtype=np.float64)
        cols = cols.reshape(len(ok), n_matrices)
        with np.errstate(invalid="ignore"):
            means = [float(np.nanmean(cols[:, j])) if np.isfinite(cols[:, j]).any() else None for j in range(n_matrices)]
        per_layer[stat] = means
    return {"kind": KIND, "version": FORMAT_VERSION, "model": run["model"], "dataset": run["dataset"],
            "objective": run["objective"], "examples": len(records), "scored": len(ok),
            "failed": [{"index": r["index"], "error": r["error"]} for r in records if "error" in r],
            "loss": _stats(r["loss"] for r in ok), "tokens": _stats(r["tokens"] for r in ok),
            "groups": {stat: {g: _stats(r["groups"][stat][g] for r in ok) for g in groups} for stat in stats},
            "per_layer": per_layer, "matrices": [m["tag"] for m in run["matrices"]]}


def rank_value(record: Mapping[str, Any], rank_by: str) -> float | None:
    """The value ``rank_by`` (``loss`` or ``<stat>/<group>``) of a record (None when missing or failed)."""
    if "error" in record:
        return None
    if rank_by == "loss":
        return record["loss"]
    stat, group = rank_by.split("/", 1)
    return record["groups"].get(stat, {}).get(group)


def ranking(records: Sequence[Mapping[str, Any]], examples: Mapping[int, Example], rank_by: str,
            preview: int = 120) -> list[dict[str, Any]]:
    """The scored examples ordered by ``rank_by``, best first (:data:`RANK_DIRECTIONS`); ties by dataset index;
    examples without a value come last."""
    stat = rank_by.split("/", 1)[0]
    sign = 1.0 if RANK_DIRECTIONS[stat] == "ascending" else -1.0
    keyed = [(rank_value(r, rank_by), r) for r in records]
    have = sorted((x for x in keyed if x[0] is not None), key=lambda x: (sign * x[0], x[1]["index"]))
    rest = sorted((x for x in keyed if x[0] is None), key=lambda x: x[1]["index"])
    out = []
    for rank, (value, r) in enumerate(have + rest, start=1):
        ex = examples.get(r["index"])
        out.append({"rank": rank, "index": r["index"], "id": r.get("id"), "by": rank_by, "value": value,
                    "loss": r.get("loss"),
                    "prompt": ex.prompt_text[:preview] if ex else None, "response": ex.response[:preview] if ex else None})
    return out


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _dumps(record: Mapping[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def write_parquet(path: Path, records: Sequence[Mapping[str, Any]]) -> bool:
    """``scores.parquet`` from the records when pyarrow is installed; returns whether it was written."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return False
    flat = []
    for r in records:
        row: dict[str, Any] = {"index": r["index"], "id": r.get("id"), "tokens": r.get("tokens"), "loss": r.get("loss"),
                               "error": r.get("error")}
        for stat, groups in (r.get("groups") or {}).items():
            for g, v in groups.items():
                row[f"{stat}/{g}"] = v
        for stat, values in (r.get("layers") or {}).items():
            row[f"layers/{stat}"] = values
        flat.append(row)
    pq.write_table(pa.Table.from_pylist(flat), path)
    return True


def score_dataset(model: nn.Module, tokenizer: Any, examples: Sequence[Example], out_dir: str | os.PathLike,
                  options: ScoringOptions = ScoringOptions(), *, model_name: str | None = None,
                  dataset_name: str | None = None, progress: bool = True, figures: bool = True,
                  on_chunk: Callable[[int], None] | None = None) -> ScoreResult:
    """Score ``examples`` into ``out_dir`` (created; resumed when it holds the same scoring).

    Args:
        model, tokenizer, options: see :class:`Scorer`.
        examples: from :func:`gradwatch.scoring.data.load_examples`.
        out_dir: the output directory.
        model_name, dataset_name: recorded in ``run.json`` (a resume needs them to match).
        progress: show a progress bar (tqdm, or a counter) on stderr.
        figures: write ``index.html`` and figures when matplotlib is installed.
        on_chunk: called with the number of examples done after each chunk (tests stop a run with it).

    Raises:
        ValueError: ``out_dir`` holds a scoring of another model, dataset or options.
    """
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scorer = Scorer(model, tokenizer, options)
    if options.rank_by != "loss" and options.rank_by.split("/", 1)[1] not in scorer.groups:
        raise ValueError(f"gradwatch score-data: rank_by {options.rank_by!r}: no layer group "
                         f"{options.rank_by.split('/', 1)[1]!r} in this model; its groups are {list(scorer.groups)}")
    by_index = {ex.index: ex for ex in examples}
    if len(by_index) != len(examples):
        raise ValueError("gradwatch score-data: the examples' indices are not unique")
    run = {"kind": KIND, "version": FORMAT_VERSION, "model": model_name or type(model).__name__,
           "dataset": dataset_name, "dataset_sha256": dataset_hash(examples), "examples": len(examples),
           "options": asdict(options), **scorer.describe()}
    run_path, scores_path = out / RUN_FILE, out / SCORES_FILE
    if run_path.is_file():
        before = json.loads(run_path.read_text(encoding="utf-8"))
        changed = sorted(k for k in set(before) | set(run) if k != "options" and before.get(k) != run.get(k))
        changed += [f"options.{k}" for k in sorted(set(before.get("options", {})) | set(run["options"]))
                    if k != "rank_by" and before.get("options", {}).get(k) != run["options"].get(k)]
        if changed:
            raise ValueError(f"gradwatch score-data: {out} holds a scoring with other settings ({', '.join(changed)} "
                             f"differ); give another output directory, or delete it to start over")
    elif scores_path.is_file() and scores_path.stat().st_size:
        raise ValueError(f"gradwatch score-data: {out} has a {SCORES_FILE} but no {RUN_FILE} saying what it scored; "
                         f"give another output directory, or delete it to start over")
    _write_json(run_path, run)
    done = {r["index"]: r for r in read_scores(scores_path, repair=True)}
    resumed = len(done)
    bar = Progress(len(examples), resumed, progress)
    order = sorted(by_index)
    how: set[str] = set()
    scored_now = 0
    try:
        with open(scores_path, "a", encoding="utf-8") as sink:
            for start in range(0, len(order), scorer.chunk):
                chunk = [by_index[i] for i in order[start:start + scorer.chunk]]
                todo = [ex for ex in chunk if ex.index not in done]
                if not todo:
                    continue
                records, used = scorer.score(chunk, scorer.encode(chunk))  # the whole chunk, as a fresh run would
                how.add(used)
                new = [r for r in records if r["index"] not in done]
                sink.write("".join(_dumps(r) + "\n" for r in new))
                sink.flush()
                for r in new:
                    done[r["index"]] = r
                scored_now += len(new)
                bar.update(len(new))
                if on_chunk is not None:
                    on_chunk(len(done))
    finally:
        bar.close()
    records = [done[i] for i in order if i in done]
    summary = summarize(run, records)
    summary["rank_by"] = options.rank_by
    _write_json(out / SUMMARY_FILE, summary)
    ranked = ranking(records, by_index, options.rank_by)
    (out / RANKING_FILE).write_text("".join(_dumps(r) + "\n" for r in ranked), encoding="utf-8")
    write_parquet(out / PARQUET_FILE, records)
    if figures:
        from gradwatch.scoring import figures as fig

        if fig.matplotlib_available():
            fig.write_page(out, summary, ranked)
    return ScoreResult(out, summary, scored_now, resumed, time.perf_counter() - started, how)


def format_summary(summary: Mapping[str, Any], groups: Sequence[str] = ("all", "q", "k", "v", "o", "mlp")) -> str:
    """A plain-text table: per statistic, the mean (and median) over the examples of each layer group."""
    stats = list(summary["groups"])
    shown = [g for g in groups if g in summary["groups"][stats[0]]]
    rows = [("statistic", *shown)]
    for stat in stats:
        rows.append((stat, *(f"{summary['groups'][stat][g].get('mean', math.nan):.5g}" for g in shown)))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in rows)
