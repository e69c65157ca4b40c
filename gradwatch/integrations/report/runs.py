"""Reading a run directory back: gradwatch's TensorBoard scalars (and the last of its pictures) and its JSONL
records, as a :class:`Run`; the per-layer tags grouped by statistic and layer family."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gradwatch.integrations.jsonl import read_records

ENGINE_PREFIX = "gradwatch/"


def gradwatch_prefixes() -> tuple[str, ...]:
    """The tag prefixes of gradwatch's scalars: each registered family's ``<stem>/`` and ``gradwatch/``."""
    from gradwatch.registry import families

    return (*(f"{f.stem}/" for f in families()), ENGINE_PREFIX)


def __getattr__(name: str) -> Any:
    if name == "GRADWATCH_PREFIXES":  # derived from the registry when asked
        return gradwatch_prefixes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


RECORD_FILES = ("signals.jsonl", "alerts.jsonl")
SPECTRUM_ORDER = ("nuclear_norm", "spectral_norm", "frobenius_norm", "stable_rank", "effective_rank", "top1_ratio")
_NOT_PER_LAYER = ("mad", "heatmap", "nonfinite_layers")  # grad_spectrum/<these>/... are not <stat>/<param>
# stability/<prefix>/<module or parameter name>: one series per layer (the rest of stability/* are run-wide)
STABILITY_PER_LAYER = ("attention/max_logit", "attention/entropy_min", "activations/rms", "update_ratio",
                       "adam/eps_share", "adam/rms_over_eps")
_LAYER_INDEX = re.compile(r"(?<=\.)\d+(?=\.)|^\d+(?=\.)")


class RunDirError(ValueError):
    """The directory is not a run directory with gradwatch data in it (the message says what was found)."""


@dataclass(frozen=True)
class Series:
    """One scalar tag: optimizer steps (ascending, unique) and values (float64, NaN kept)."""

    steps: np.ndarray
    values: np.ndarray


@dataclass
class Run:
    """What a run directory holds of gradwatch's."""

    path: Path
    event_dir: Path | None
    scalars: dict[str, Series]
    signals: list[dict[str, Any]] = field(default_factory=list)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    pictures: dict[str, tuple[int, bytes]] = field(default_factory=dict)  # image tag -> (step, PNG) of the last

    @property
    def name(self) -> str:
        return self.path.name or str(self.path)

    def spectra(self) -> dict[str, dict[str, list[str]]]:
        """``{stat: {family: [param, ...]}}`` of the per-layer spectrum tags, layers in model order."""
        return spectrum_layers(self.scalars)

    def tags(self, prefix: str) -> list[str]:
        return sorted(t for t in self.scalars if t.startswith(prefix))




def layer_family(param: str) -> str:
    """``model.layers.3.attn.q_proj.weight`` -> ``model.layers.*.attn.q_proj.weight`` (numeric path
    segments, other than the last, replaced by ``*``)."""
    return _LAYER_INDEX.sub("*", param)


def natural_key(name: str) -> tuple:
    """Sort key that orders ``layers.2`` before ``layers.10``."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name) if part)


def _stat_key(stat: str) -> tuple:
    base = stat.split("/")[-1]
    order = SPECTRUM_ORDER.index(base) if base in SPECTRUM_ORDER else len(SPECTRUM_ORDER)
    return (stat.startswith("per_example/"), order, stat)


def spectrum_layers(scalars: Iterable[str]) -> dict[str, dict[str, list[str]]]:
    """Group ``grad_spectrum/<stat>/<param>`` (and ``grad_spectrum/per_example/<stat>/<param>``, as the
    statistic ``per_example/<stat>``) by statistic and layer family."""
    found: dict[str, dict[str, list[str]]] = {}
    for tag in scalars:
        parts = tag.split("/")
        if len(parts) < 3 or parts[0] != "grad_spectrum" or parts[1] in _NOT_PER_LAYER:
            continue
        if parts[1] == "per_example":
            if len(parts) < 4:
                continue
            stat, param = f"per_example/{parts[2]}", "/".join(parts[3:])
        else:
            stat, param = parts[1], "/".join(parts[2:])
        found.setdefault(stat, {}).setdefault(layer_family(param), []).append(param)
    return {stat: {fam: sorted(found[stat][fam], key=natural_key) for fam in sorted(found[stat], key=natural_key)}
            for stat in sorted(found, key=_stat_key)}


def stability_layers(scalars: Iterable[str]) -> tuple[dict[str, dict[str, list[str]]], list[str]]:
    """``({quantity: {family: [name, ...]}}, [run-wide tag, ...])`` of the ``stability/*`` tags."""
    per_layer: dict[str, dict[str, list[str]]] = {}
    run_wide = []
    for tag in scalars:
        if not tag.startswith("stability/"):
            continue
        rest = tag[len("stability/"):]
        prefix = next((p for p in STABILITY_PER_LAYER if rest.startswith(p + "/")), None)
        if prefix is None:
            run_wide.append(tag)
            continue
        name = rest[len(prefix) + 1:]
        per_layer.setdefault(prefix, {}).setdefault(layer_family(name), []).append(name)
    ordered = {q: {f: sorted(per_layer[q][f], key=natural_key) for f in sorted(per_layer[q], key=natural_key)}
               for q in STABILITY_PER_LAYER if q in per_layer}
    return ordered, sorted(run_wide, key=natural_key)


def spectrum_tag(stat: str, param: str) -> str:
    return f"grad_spectrum/{stat}/{param}"


def _event_dirs(root: Path) -> list[Path]:
    dirs = {p.parent for p in root.rglob("*") if "tfevents" in p.name and p.is_file()}
    return sorted(dirs, key=lambda p: (len(p.parts), str(p)))


PICTURE_TAGS = ("signals/pair_examples",)  # images the report shows as they were logged (the last one)


class _EventDir:
    """The event files directly in a directory, each read once, in the order they were written (by their first
    event's wall time: two files opened in the same second, as by a run killed and resumed, sort by process id
    in their names), merged as TensorBoard merges a restart, tag by tag: a file whose first step of a tag is at
    or before steps already read of it replaces them with its own (other writers' tags in the same directory
    are left alone). Every scalar is kept; of the other kinds the last item (a reservoir of one keeps the most
    recent image)."""

    def __init__(self, event_dir: str | os.PathLike) -> None:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        files = []
        for path in Path(event_dir).iterdir():
            if "tfevents" in path.name and path.is_file():
                one = EventAccumulator(str(path), size_guidance={"scalars": 0, "images": 1, "tensors": 1,
                                                                 "histograms": 1, "audio": 1,
                                                                 "compressedHistograms": 1})
                one.Reload()
                try:
                    first = one.FirstEventTimestamp()
                except ValueError:  # an empty file
                    continue
                files.append((first, path.name, one))
        self.files = [one for _, _, one in sorted(files, key=lambda f: (f[0], f[1]))]

    def scalars(self) -> dict[str, Series]:
        by_tag: dict[str, dict[int, float]] = {}
        for one in self.files:
            for tag in one.Tags().get("scalars", []):
                steps = {int(e.step): float(e.value) for e in one.Scalars(tag)}
                if not steps:
                    continue
                first = min(steps)  # a restart of this tag at `first`: what earlier files wrote from there is gone
                kept = {s: v for s, v in by_tag.get(tag, {}).items() if s < first}
                kept.update(steps)
                by_tag[tag] = kept
        out: dict[str, Series] = {}
        for tag, by_step in by_tag.items():
            if by_step:
                steps = np.array(sorted(by_step), dtype=np.int64)
                out[tag] = Series(steps, np.array([by_step[s] for s in steps], dtype=np.float64))
        return out

    def pictures(self, tags: Sequence[str] = ()) -> dict[str, tuple[int, bytes]]:
        out = {}
        for one in self.files:  # the latest file's last image wins
            for tag in one.Tags().get("images", []):
                if tag in tags:
                    last = one.Images(tag)[-1]
                    out[tag] = (int(last.step), bytes(last.encoded_image_string))
        return out


def read_scalars(event_dir: str | os.PathLike) -> dict[str, Series]:
    """Every scalar tag of the event files directly in ``event_dir`` (the last value wins where a step was
    written twice, as after a resumed run)."""
    return _EventDir(event_dir).scalars()


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a JSONL file (:func:`gradwatch.integrations.jsonl.read_records`: objects only; a torn
    line, as a killed or live run leaves last, is skipped with one warning naming it)."""
    return read_records(path)


def _is_gradwatch_tag(tag: str, prefixes: tuple[str, ...] | None = None) -> bool:
    return tag.startswith(prefixes or gradwatch_prefixes())


def load_run(path: str | os.PathLike) -> Run:
    """Read a run directory.

    Raises:
        RunDirError: ``path`` is not a directory, holds nothing of gradwatch's, or holds several runs.
    """
    root = Path(path)
    if not root.is_dir():
        raise RunDirError(f"{str(path)!r} is not a directory")
    dirs = _event_dirs(root)
    accumulators = {d: _EventDir(d) for d in dirs}  # each directory's event files read once
    read = {d: a.scalars() for d, a in accumulators.items()}
    prefixes = gradwatch_prefixes()
    ours = [d for d in dirs if any(_is_gradwatch_tag(t, prefixes) for t in read[d])]
    if len(ours) > 1:
        names = "\n  ".join(str(d) for d in ours)
        raise RunDirError(f"{str(path)!r} holds {len(ours)} runs with gradwatch data; pass one of them:\n  {names}")
    event_dir = ours[0] if ours else None
    records: dict[str, list[dict[str, Any]]] = {}
    for name in RECORD_FILES:
        for where in ([event_dir] if event_dir else []) + [root]:
            if (where / name).is_file():
                records[name] = read_jsonl(where / name)
                break
    if event_dir is None and not records:
        other = sorted({t for d in dirs for t in read[d]})
        found = (f"its TensorBoard event files ({len(dirs)} director{'y' if len(dirs) == 1 else 'ies'}) hold "
                 f"only other tags ({', '.join(other[:5])}{', ...' if len(other) > 5 else ''})" if other else
                 "it has TensorBoard event files with no scalars" if dirs else "it has no TensorBoard event files")
        raise RunDirError(
            f"no gradwatch data in {str(path)!r}: {found}, and no {' or '.join(RECORD_FILES)}. gradwatch writes "
            f"tags under {', '.join(p.rstrip('/') for p in prefixes)}; point this at the directory "
            f"your trainer logs to with gradwatch on (e.g. lightning_logs/version_0, or output_dir/runs/<run> "
            f"for the Hugging Face Trainer)")
    scalars = {t: s for t, s in read[event_dir].items()} if event_dir else {}
    pictures = accumulators[event_dir].pictures(PICTURE_TAGS) if event_dir else {}
    return Run(root, event_dir, scalars, records.get("signals.jsonl", []), records.get("alerts.jsonl", []), pictures)


def layer_matrix(run: Run, stat: str, params: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(values, steps)``: values (layers x steps) on the union of the layers' steps, NaN where a layer was
    not logged at a step."""
    return tag_matrix(run, [spectrum_tag(stat, p) for p in params])


def tag_matrix(run: Run, tags: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """:func:`layer_matrix` for any scalar tags (one row each)."""
    series = [run.scalars[t] for t in tags]
    steps = np.unique(np.concatenate([s.steps for s in series])) if series else np.zeros(0, dtype=np.int64)
    values = np.full((len(series), len(steps)), np.nan)
    for row, s in enumerate(series):
        values[row, np.searchsorted(steps, s.steps)] = s.values
    return values, steps
