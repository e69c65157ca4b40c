"""Static reports from a run directory: reading gradwatch's TensorBoard scalars and JSONL records back,
the figures (PNG, matplotlib's Agg canvas), the HTML pages of ``gradwatch report`` and ``gradwatch compare``.

A *run directory* is the directory a trainer's TensorBoard writer logs to (``lightning_logs/version_0``,
HF's ``output_dir/runs/<run>``), or any directory above exactly one such directory with gradwatch's tags.
It holds the event files (scalar tags ``grad_spectrum/<stat>/<param>``, ``sharpness/...``, ``signals/...``,
``stability/...``, ``gradwatch/overhead``) and the records ``signals.jsonl`` and ``alerts.jsonl``.

Run comparison follows the seed papers (Li et al. 2024, fast vs. slow thinking; "How instruction and
reasoning data shape post-training", 2025), which compare runs by each layer's statistic: for a statistic
and a layer family (parameter names with their layer index replaced by ``*``),

    a_l = mean over run A's logged steps of layer l's statistic,   b_l likewise for run B,
    RD  = (1 / |L|) sum_{l in L} |a_l - b_l| / |a_l|,

where L are the family's layers logged in both runs whose averages are finite with a_l != 0 (a NaN step,
logged when a layer's gradient was not finite, is left out of that layer's average). Averaging each layer
over the whole run first compares the runs' typical per-layer profiles and does not need the two runs to
have logged the same steps.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

GRADWATCH_PREFIXES = ("grad_spectrum/", "sharpness/", "signals/", "stability/", "gradwatch/")
RECORD_FILES = ("signals.jsonl", "alerts.jsonl")
SPECTRUM_ORDER = ("nuclear_norm", "spectral_norm", "frobenius_norm", "stable_rank", "effective_rank", "top1_ratio")
LOG_SCALE_STATS = ("nuclear_norm", "spectral_norm", "frobenius_norm")  # norms span decades across layers
_NOT_PER_LAYER = ("mad", "heatmap", "nonfinite_layers")  # grad_spectrum/<these>/... are not <stat>/<param>
# stability/<prefix>/<module or parameter name>: one series per layer (the rest of stability/* are run-wide)
STABILITY_PER_LAYER = ("attention/max_logit", "attention/entropy_min", "activations/rms", "update_ratio",
                       "adam/eps_share", "adam/rms_over_eps")
_LAYER_INDEX = re.compile(r"(?<=\.)\d+(?=\.)|^\d+(?=\.)")
_MAX_RECORD_ROWS = 200


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


# --- reading ------------------------------------------------------------------------------------------------


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


def _accumulator(event_dir: str | os.PathLike) -> Any:
    """The event files directly in ``event_dir``, read once: every scalar, the last item of the rest (a
    reservoir of one keeps the most recent image)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(event_dir), size_guidance={"scalars": 0, "images": 1, "tensors": 1,
                                                                  "histograms": 1, "audio": 1,
                                                                  "compressedHistograms": 1})
    accumulator.Reload()
    return accumulator


def _scalars_of(accumulator: Any) -> dict[str, Series]:
    out: dict[str, Series] = {}
    for tag in accumulator.Tags().get("scalars", []):
        by_step: dict[int, float] = {}
        for event in accumulator.Scalars(tag):
            by_step[int(event.step)] = float(event.value)
        steps = np.array(sorted(by_step), dtype=np.int64)
        out[tag] = Series(steps, np.array([by_step[s] for s in steps], dtype=np.float64))
    return out


def _pictures_of(accumulator: Any, tags: Sequence[str] = PICTURE_TAGS) -> dict[str, tuple[int, bytes]]:
    out = {}
    for tag in accumulator.Tags().get("images", []):
        if tag in tags:
            last = accumulator.Images(tag)[-1]
            out[tag] = (int(last.step), bytes(last.encoded_image_string))
    return out


def read_scalars(event_dir: str | os.PathLike) -> dict[str, Series]:
    """Every scalar tag of the event files directly in ``event_dir`` (the last value wins where a step was
    written twice, as after a resumed run)."""
    return _scalars_of(_accumulator(event_dir))


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a JSONL file (objects only; a torn last line of a live run is skipped)."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def _is_gradwatch_tag(tag: str) -> bool:
    return tag.startswith(GRADWATCH_PREFIXES)


def load_run(path: str | os.PathLike) -> Run:
    """Read a run directory.

    Raises:
        RunDirError: ``path`` is not a directory, holds nothing of gradwatch's, or holds several runs.
    """
    root = Path(path)
    if not root.is_dir():
        raise RunDirError(f"{str(path)!r} is not a directory")
    dirs = _event_dirs(root)
    accumulators = {d: _accumulator(d) for d in dirs}  # each directory's event files read once
    read = {d: _scalars_of(a) for d, a in accumulators.items()}
    ours = [d for d in dirs if any(map(_is_gradwatch_tag, read[d]))]
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
            f"tags under {', '.join(p.rstrip('/') for p in GRADWATCH_PREFIXES)}; point this at the directory "
            f"your trainer logs to with gradwatch on (e.g. lightning_logs/version_0, or output_dir/runs/<run> "
            f"for the Hugging Face Trainer)")
    scalars = {t: s for t, s in read[event_dir].items()} if event_dir else {}
    pictures = _pictures_of(accumulators[event_dir]) if event_dir else {}
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


def layer_means(run: Run, stat: str, params: Sequence[str]) -> np.ndarray:
    """Each layer's statistic averaged over its logged steps (non-finite values left out; NaN if none)."""
    out = np.full(len(params), np.nan)
    for i, p in enumerate(params):
        v = run.scalars[spectrum_tag(stat, p)].values
        v = v[np.isfinite(v)]
        if v.size:
            out[i] = v.mean()
    return out


def relative_difference(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    """``(RD, n)``: mean over layers of |a_l - b_l| / |a_l|, over the n layers with finite a_l, b_l and
    a_l != 0 (RD is NaN when n = 0)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    keep = np.isfinite(a) & np.isfinite(b) & (a != 0)
    if not keep.any():
        return math.nan, 0
    return float(np.mean(np.abs(a[keep] - b[keep]) / np.abs(a[keep]))), int(keep.sum())


@dataclass(frozen=True)
class Comparison:
    """One statistic and layer family compared between two runs."""

    statistic: str
    family: str
    params: tuple[str, ...]  # layers logged in both runs, in model order
    a: np.ndarray  # per-layer averages over run A's steps
    b: np.ndarray
    rd: float
    layers_used: int  # layers in RD (finite averages, a_l != 0)
    only_a: tuple[str, ...] = ()
    only_b: tuple[str, ...] = ()


def compare_runs(run_a: Run, run_b: Run) -> list[Comparison]:
    """Per statistic and layer family logged by both runs: both runs' per-layer averages and their RD.

    Raises:
        RunDirError: the runs have no per-layer spectrum statistic (and layer family) in common.
    """
    spectra_a, spectra_b = run_a.spectra(), run_b.spectra()
    out = []
    for stat, families in spectra_a.items():
        for family, params_a in families.items():
            params_b = spectra_b.get(stat, {}).get(family)
            if not params_b:
                continue
            common = [p for p in params_a if p in set(params_b)]
            if not common:
                continue
            a, b = layer_means(run_a, stat, common), layer_means(run_b, stat, common)
            rd, used = relative_difference(a, b)
            out.append(Comparison(stat, family, tuple(common), a, b, rd, used,
                                  tuple(p for p in params_a if p not in set(common)),
                                  tuple(p for p in params_b if p not in set(common))))
    if not out:
        def describe(run: Run, spectra: dict) -> str:
            n = sum(len(ps) for fams in spectra.values() for ps in fams.values())
            return f"{str(run.path)!r} has {n} per-layer spectrum series" + (
                f" ({', '.join(sorted(spectra))})" if spectra else "")

        raise RunDirError(f"nothing to compare: the runs log no per-layer gradient-spectrum statistic "
                          f"(grad_spectrum/<stat>/<param>) for the same layers; {describe(run_a, spectra_a)}, "
                          f"{describe(run_b, spectra_b)}")
    return out


def format_comparison_table(comparisons: Sequence[Comparison]) -> str:
    """A plain-text table: statistic, layer family, layers, RD."""
    header = ("statistic", "family", "layers", "RD")
    rows = [(c.statistic, c.family, str(c.layers_used), "nan" if math.isnan(c.rd) else f"{c.rd:.4g}")
            for c in comparisons]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
             for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --- figures ------------------------------------------------------------------------------------------------


class _Figures:
    """Saves figures as PNGs under ``out/figures`` and hands back their ``<img>`` tags."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.dir = out / "figures"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.count = 0

    def save(self, fig: Any, stem: str, alt: str) -> str:
        self.count += 1
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("_")[:80] or "figure"
        name = f"{self.count:03d}_{slug}.png"
        fig.savefig(self.dir / name, format="png", dpi=fig.dpi)
        width, height = (int(round(x)) for x in fig.get_size_inches() * fig.dpi)
        return (f'<img src="figures/{html.escape(name)}" alt="{html.escape(alt)}" width="{width}" '
                f'height="{height}">')


    def save_png(self, png: bytes, stem: str, alt: str) -> str:
        """An already encoded PNG (a logged TensorBoard image), shown at twice its size, pixels kept sharp."""
        self.count += 1
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("_")[:80] or "figure"
        name = f"{self.count:03d}_{slug}.png"
        (self.dir / name).write_bytes(png)
        width, height = struct.unpack(">II", png[16:24]) if png[:8] == b"\x89PNG\r\n\x1a\n" else (0, 0)
        size = f' width="{2 * width}" height="{2 * height}"' if width else ""
        return (f'<img src="figures/{html.escape(name)}" alt="{html.escape(alt)}"{size} '
                'style="image-rendering: pixelated">')


def _finite_positive(values: Iterable[np.ndarray]) -> bool:
    return all(bool(np.all(v[np.isfinite(v)] > 0)) for v in values)


def _line_figure(lines: Sequence[tuple[str, np.ndarray, np.ndarray, dict]], title: str, ylabel: str,
                 log_y: bool = False, xlabel: str = "optimizer step", width: float = 8.0, height: float = 3.4) -> Any:
    from gradwatch.integrations.figures import new_figure

    fig = new_figure(width, height)
    ax = fig.add_subplot()
    for label, x, y, style in lines:
        ax.plot(x, y, label=label, marker="o" if len(x) < 30 else None, markersize=3, **style)
    if log_y and _finite_positive([y for _, _, y, _ in lines]):
        ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if len(lines) > 1 or lines and lines[0][0]:
        ax.legend(fontsize=7, loc="best")
    return fig


def _small_multiples(run: Run, tags: Sequence[str], title: str, strip: str = "") -> Any:
    """One panel per tag, sharing the step axis."""
    from gradwatch.integrations.figures import new_figure

    fig = new_figure(8.0, 0.4 + 1.6 * len(tags))
    axes = fig.subplots(len(tags), 1, sharex=True, squeeze=False)[:, 0]
    for ax, tag in zip(axes, tags):
        s = run.scalars[tag]
        ax.plot(s.steps, s.values, marker="o" if len(s.steps) < 30 else None, markersize=3)
        ax.set_ylabel(tag.removeprefix(strip), fontsize=8, rotation=0, ha="right", va="center")
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("optimizer step")
    fig.suptitle(title, fontsize=10)
    return fig


# --- HTML ---------------------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; } h3 { font-size: 1.05em; }
code, pre { font-family: ui-monospace, "SFMono-Regular", Menlo, monospace; font-size: 0.9em; }
pre { white-space: pre-wrap; margin: 0; }
img { max-width: 100%; height: auto; display: block; margin: 0.5em 0 1.5em; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f5f5f5; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.severity-critical, .severity-error { color: #b00020; font-weight: bold; }
.severity-warning { color: #a05a00; font-weight: bold; } .alarm { color: #b00020; font-weight: bold; }
.note { color: #555; font-size: 0.9em; }
nav ul { columns: 2; }
"""


def _esc(value: Any) -> str:
    return html.escape(str(value))


def _page(title: str, body: Sequence[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{_esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _section(anchor: str, title: str, parts: list[str]) -> tuple[str, str, str]:
    return anchor, title, f'<h2 id="{anchor}">{_esc(title)}</h2>\n' + "\n".join(parts)


def _spectra_section(run: Run, figs: _Figures) -> tuple[str, str, str] | None:
    from gradwatch.integrations.figures import heatmap_plot

    spectra = run.spectra()
    if not spectra:
        return None
    parts = ['<p class="note">Each heatmap is one statistic of one layer family: rows are the family\'s '
             'layers in model order, columns the logged steps; magenta marks NaN (a step whose gradient was not '
             'finite) or a step the layer was not logged.</p>']
    for stat, families in spectra.items():
        parts.append(f"<h3>{_esc(stat)}</h3>")
        log_scale = stat.split("/")[-1] in LOG_SCALE_STATS
        for family, params in families.items():
            values, steps = layer_matrix(run, stat, params)
            fig = heatmap_plot(values, params, steps.tolist(), title=f"{stat}  ·  {family}", log_scale=log_scale,
                               colorbar_label=stat.split("/")[-1])
            parts.append(figs.save(fig, f"heatmap_{stat}_{family}", f"heatmap of {stat} for {family}"))
        mad = {t.split("/", 3)[3]: run.scalars[t] for t in run.tags(f"grad_spectrum/mad/{stat}/")}
        if mad:
            lines = [(fam, s.steps, s.values, {}) for fam, s in sorted(mad.items(), key=lambda kv: natural_key(kv[0]))]
            fig = _line_figure(lines, f"cross-layer MAD of {stat} per layer family", f"MAD of {stat}",
                               log_y=log_scale)
            parts.append(figs.save(fig, f"mad_{stat}", f"cross-layer MAD of {stat}"))
    nonfinite = run.scalars.get("grad_spectrum/nonfinite_layers")
    if nonfinite is not None and np.nansum(nonfinite.values) > 0:
        fig = _line_figure([("", nonfinite.steps, nonfinite.values, {})], "layers with a non-finite gradient",
                           "layers")
        parts.append(figs.save(fig, "nonfinite_layers", "layers with a non-finite gradient per step"))
    return _section("spectra", "Gradient spectra", parts)


def _sharpness_section(run: Run, figs: _Figures) -> tuple[str, str, str] | None:
    lam, thr = run.scalars.get("sharpness/lambda_max"), run.scalars.get("sharpness/threshold")
    pre = run.scalars.get("sharpness/lambda_max_precond")
    if lam is None and pre is None:
        return None
    lines = []
    if lam is not None:
        lines.append(("lambda_max (top Hessian eigenvalue)", lam.steps, lam.values, {"color": "C0"}))
    if pre is not None:
        lines.append(("lambda_max_precond (P^-1/2 H P^-1/2)", pre.steps, pre.values, {"color": "C2"}))
    if thr is not None:
        lines.append(("stability threshold", thr.steps, thr.values, {"color": "C3", "linestyle": "--"}))
    fig = _line_figure(lines, "sharpness against the edge-of-stability threshold", "eigenvalue", log_y=True)
    parts = ['<p class="note">Gradient descent is stable while the top eigenvalue stays below the threshold '
             '(2/lr for SGD; for Adam/AdamW the preconditioned eigenvalue is the one to compare with it).</p>',
             figs.save(fig, "sharpness", "sharpness and its threshold per step")]
    rows = []
    for tag in ("sharpness/lambda_max", "sharpness/lambda_max_precond", "sharpness/threshold", "sharpness/ratio",
                "sharpness/trace"):
        s = run.scalars.get(tag)
        if s is not None and len(s.steps):
            rows.append(f"<tr><td><code>{_esc(tag)}</code></td><td class=\"num\">{int(s.steps[-1])}</td>"
                        f"<td class=\"num\">{_fmt(float(s.values[-1]))}</td></tr>")
    if rows:
        parts.append("<table><tr><th>tag</th><th>last step</th><th>value</th></tr>" + "".join(rows) + "</table>")
    return _section("sharpness", "Sharpness", parts)


def _pair_text(pair: Any) -> str:
    if not isinstance(pair, dict):
        return _esc(pair)
    alarm = bool(pair.get("alarm"))
    extra = ", ".join(f"{_esc(k)} {_esc(_fmt(v))}" for k, v in pair.items()
                      if k not in ("a", "b", "alarm") and isinstance(v, (int, float)) and not isinstance(v, bool))
    text = (f"<code>{_list_text(pair.get('a'))}</code> &harr; <code>{_list_text(pair.get('b'))}</code>"
            + (f" ({extra})" if extra else ""))
    return f'<span class="alarm">{text} ALARM</span>' if alarm else text


def _value_text(value: Any) -> str:
    return _list_text(value) if isinstance(value, list) else _esc(_fmt(value))


def _list_text(value: Any, most: int = 20) -> str:
    if isinstance(value, (list, tuple)):
        shown = ", ".join(_esc(v) for v in value[:most])
        return shown + (f", ... ({len(value)} in all)" if len(value) > most else "")
    return _esc(value)


def _signals_section(run: Run, figs: _Figures) -> tuple[str, str, str] | None:
    tags = run.tags("signals/")
    if not tags and not run.signals:
        return None
    parts = []
    a, b = run.scalars.get("signals/pair_loss/a"), run.scalars.get("signals/pair_loss/b")
    if a is not None or b is not None:
        lines = [(f"group {k}", s.steps, s.values, {}) for k, s in (("a", a), ("b", b)) if s is not None]
        fig = _line_figure(lines, "loss of the most opposing pair's two groups", "probe loss")
        parts.append(figs.save(fig, "signals_pair_loss", "loss of the opposing pair's groups per step"))
    picture = run.pictures.get("signals/pair_examples")
    if picture is not None:
        parts.append(f"<h3>Examples of the pairs at step {picture[0]} (signals/pair_examples)</h3>"
                     '<p class="note">A row per side of the pairs shown in the signals/pairs table (pair 1 a, '
                     "pair 1 b, pair 2 a, ...), in the table's order.</p>" + figs.save_png(
                         picture[1], "signals_pair_examples", f"thumbnails of the pairs' examples at step {picture[0]}"))
    others = [t for t in tags if not t.startswith("signals/pair_loss/")]
    if others:
        fig = _small_multiples(run, others, "per-example loss changes on the probe set", strip="signals/")
        parts.append(figs.save(fig, "signals_scalars", "signals scalars per step: " + ", ".join(others)))
    if run.signals:
        records = sorted(run.signals, key=lambda r: r.get("step", 0) if isinstance(r.get("step"), int) else 0)
        shown = records[-_MAX_RECORD_ROWS:]
        rows = []
        for r in shown:
            pairs = r.get("pairs") or []
            pairs_html = "<br>".join(_pair_text(p) for p in pairs) if isinstance(pairs, list) else _esc(pairs)
            rows.append(f"<tr><td class=\"num\">{_esc(r.get('step', ''))}</td><td>{_list_text(r.get('outliers', ''))}"
                        f"</td><td>{pairs_html}</td></tr>")
        note = (f'<p class="note">The last {len(shown)} of {len(records)} records.</p>'
                if len(records) > len(shown) else "")
        parts.append("<h3>Outliers and opposing pairs (signals.jsonl)</h3>" + note +
                     "<table><tr><th>step</th><th>outlier examples</th><th>opposing pairs (a &harr; b)</th></tr>"
                     + "".join(rows) + "</table>")
    return _section("signals", "Opposing signals", parts)


def _stability_section(run: Run, figs: _Figures) -> tuple[str, str, str] | None:
    from gradwatch.integrations.figures import heatmap_plot

    per_layer, run_wide = stability_layers(run.scalars)
    if not per_layer and not run_wide:
        return None
    parts = []
    if run_wide:
        fig = _small_multiples(run, run_wide, "run-wide stability signals", strip="stability/")
        parts.append(figs.save(fig, "stability_scalars", "stability scalars per step: " + ", ".join(run_wide)))
    for quantity, families in per_layer.items():
        parts.append(f"<h3>{_esc(quantity)}</h3>")
        for family, names in families.items():
            values, steps = tag_matrix(run, [f"stability/{quantity}/{n}" for n in names])
            positive = bool(np.all(values[np.isfinite(values)] > 0))
            fig = heatmap_plot(values, names, steps.tolist(), title=f"{quantity}  ·  {family}",
                               log_scale=positive and quantity != "attention/entropy_min", colorbar_label=quantity)
            parts.append(figs.save(fig, f"stability_{quantity}_{family}", f"heatmap of {quantity} for {family}"))
    return _section("stability", "Stability", parts)


def _alerts_section(run: Run) -> tuple[str, str, str] | None:
    if not run.alerts:
        return None
    rows = []
    for r in sorted(run.alerts, key=lambda r: r.get("step", 0) if isinstance(r.get("step"), int) else 0):
        severity = str(r.get("severity", ""))
        evidence = r.get("evidence")
        if isinstance(evidence, dict):
            evidence_html = "<br>".join(f"<code>{_esc(k)}</code>: {_value_text(v)}" for k, v in evidence.items())
        elif evidence in (None, "", []):
            evidence_html = ""
        else:
            evidence_html = "<pre>" + _esc(json.dumps(evidence, indent=1, default=str)) + "</pre>"
        remedies = r.get("remedies") or []
        if isinstance(remedies, str):
            remedies = [remedies]
        remedies_html = "<ul>" + "".join(f"<li>{_esc(x)}</li>" for x in remedies) + "</ul>" if remedies else ""
        rows.append(f"<tr><td class=\"num\">{_esc(r.get('step', ''))}</td>"
                    f"<td class=\"severity-{_esc(re.sub(r'[^a-z]', '', severity.lower()))}\">{_esc(severity)}</td>"
                    f"<td><code>{_esc(r.get('rule', ''))}</code></td><td>{_esc(r.get('message', ''))}</td>"
                    f"<td>{evidence_html}</td><td>{remedies_html}</td></tr>")
    table = ("<table><tr><th>step</th><th>severity</th><th>rule</th><th>message</th><th>evidence</th>"
             "<th>remedies</th></tr>" + "".join(rows) + "</table>")
    return _section("alerts", f"Alerts ({len(run.alerts)})", [table])


def _overhead_section(run: Run, figs: _Figures) -> tuple[str, str, str] | None:
    s = run.scalars.get("gradwatch/overhead")
    if s is None:
        return None
    fig = _line_figure([("", s.steps, 100 * s.values, {})], "share of wall time spent in gradwatch", "overhead (%)",
                       height=2.8)
    finite = s.values[np.isfinite(s.values)]
    last = f"last {100 * finite[-1]:.2f}%, max {100 * finite.max():.2f}%" if finite.size else "no finite value"
    return _section("overhead", "Overhead", [f'<p class="note">{_esc(last)}.</p>',
                                             figs.save(fig, "overhead", "gradwatch overhead per step")])


def write_report(run: Run, out: str | os.PathLike) -> Path:
    """Write ``out/index.html`` and ``out/figures/*.png`` for ``run``; returns the page's path."""
    out = Path(out)
    figs = _Figures(out)
    built = (_spectra_section(run, figs), _sharpness_section(run, figs), _signals_section(run, figs),
             _stability_section(run, figs), _alerts_section(run), _overhead_section(run, figs))
    sections = [s for s in built if s is not None]
    all_steps = [s.steps for s in run.scalars.values() if len(s.steps)]
    span = (f"steps {int(min(s.min() for s in all_steps))} to {int(max(s.max() for s in all_steps))}"
            if all_steps else "no scalars")
    body = [f"<h1>gradwatch report: {_esc(run.name)}</h1>",
            f'<p class="note">Run directory <code>{_esc(run.path)}</code>'
            + (f", event files in <code>{_esc(run.event_dir)}</code>" if run.event_dir else "")
            + f"; {_esc(span)}.</p>",
            "<nav><ul>" + "".join(f'<li><a href="#{a}">{_esc(t)}</a></li>' for a, t, _ in sections) + "</ul></nav>",
            *(s for _, _, s in sections)]
    index = out / "index.html"
    index.write_text(_page(f"gradwatch report: {run.name}", body), encoding="utf-8")
    return index


def _layer_axis(params: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    labels = []
    for p in params:
        idx = _LAYER_INDEX.findall(p)
        labels.append(".".join(idx) if idx else p.rsplit(".", 2)[0][-12:])
    return np.arange(len(params)), labels


def write_comparison(run_a: Run, run_b: Run, comparisons: Sequence[Comparison], out: str | os.PathLike) -> Path:
    """Write ``out/index.html`` (the RD table and both runs' per-layer curves), ``out/figures/*.png`` and
    ``out/compare.json``; returns the page's path."""
    from gradwatch.integrations.figures import new_figure

    out = Path(out)
    figs = _Figures(out)
    rows = "".join(f"<tr><td>{_esc(c.statistic)}</td><td><code>{_esc(c.family)}</code></td>"
                   f"<td class=\"num\">{c.layers_used}</td><td class=\"num\">{_esc(_fmt(c.rd))}</td></tr>"
                   for c in comparisons)
    body = [f"<h1>gradwatch compare: {_esc(run_a.name)} vs {_esc(run_b.name)}</h1>",
            f'<p class="note">A = <code>{_esc(run_a.path)}</code>, B = <code>{_esc(run_b.path)}</code>. '
            "For each statistic and layer family, a_l and b_l are layer l's statistic averaged over all logged "
            "steps of each run; RD = mean over layers of |a_l - b_l| / |a_l| (layers logged in both runs, finite "
            "averages, a_l &ne; 0).</p>",
            "<table><tr><th>statistic</th><th>family</th><th>layers</th><th>RD</th></tr>" + rows + "</table>"]
    current = None
    for c in comparisons:
        if c.statistic != current:
            current = c.statistic
            body.append(f"<h2>{_esc(c.statistic)}</h2>")
        x, labels = _layer_axis(c.params)
        fig = new_figure(8.0, 3.2)
        ax = fig.add_subplot()
        ax.plot(x, c.a, marker="o", markersize=4, label=f"A: {run_a.name}")
        ax.plot(x, c.b, marker="s", markersize=4, label=f"B: {run_b.name}")
        if c.statistic.split("/")[-1] in LOG_SCALE_STATS and _finite_positive([c.a, c.b]):
            ax.set_yscale("log")
        step = max(1, len(x) // 24)
        ax.set_xticks(x[::step], labels[::step], fontsize=7)
        ax.set_xlabel("layer")
        ax.set_ylabel(f"{c.statistic} (mean over steps)")
        ax.set_title(f"{c.statistic}  ·  {c.family}   RD = {_fmt(c.rd)}", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        body.append(figs.save(fig, f"layers_{c.statistic}_{c.family}", f"{c.statistic} per layer of {c.family}"))
        missing = [f"{len(c.only_a)} only in A" if c.only_a else "", f"{len(c.only_b)} only in B" if c.only_b else ""]
        if any(missing):
            body.append(f'<p class="note">Layers left out: {_esc(", ".join(m for m in missing if m))}.</p>')
    (out / "compare.json").write_text(json.dumps(
        {"run_a": str(run_a.path), "run_b": str(run_b.path),
         "rows": [{"statistic": c.statistic, "family": c.family, "layers": list(c.params), "layers_used": c.layers_used,
                   "rd": None if math.isnan(c.rd) else c.rd, "a": [None if math.isnan(v) else v for v in c.a.tolist()],
                   "b": [None if math.isnan(v) else v for v in c.b.tolist()]} for c in comparisons]}, indent=1),
        encoding="utf-8")
    index = out / "index.html"
    index.write_text(_page(f"gradwatch compare: {run_a.name} vs {run_b.name}", body), encoding="utf-8")
    return index
