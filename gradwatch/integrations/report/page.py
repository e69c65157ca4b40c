"""Writing the pages: the HTML of ``gradwatch report`` (one section per family, the alerts, the overhead)
and of ``gradwatch compare``."""

from __future__ import annotations

import html
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gradwatch.integrations.report.compare import Comparison
from gradwatch.integrations.report.plots import (
    LOG_SCALE_STATS,
    _Figures,
    _fmt,
    _layer_profile_figure,
    _line_figure,
    _small_multiples,
)
from gradwatch.integrations.report.runs import Run, layer_matrix, natural_key, stability_layers, tag_matrix

_MAX_RECORD_ROWS = 200


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


def _section(anchor: str, title: str, parts: list[str]) -> tuple[str, str, str]:
    return anchor, title, f'<h2 id="{anchor}">{_esc(title)}</h2>\n' + "\n".join(parts)


def spectra_section(run: Run, figs: _Figures) -> tuple[str, str, str] | None:
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


def sharpness_section(run: Run, figs: _Figures) -> tuple[str, str, str] | None:
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


def signals_section(run: Run, figs: _Figures) -> tuple[str, str, str] | None:
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
        thumbnails = figs.save_png(picture[1], "signals_pair_examples",
                                   f"thumbnails of the pairs' examples at step {picture[0]}")
        parts.append(f"<h3>Examples of the pairs at step {picture[0]} (signals/pair_examples)</h3>"
                     '<p class="note">A row per side of the pairs shown in the signals/pairs table (pair 1 a, '
                     "pair 1 b, pair 2 a, ...), in the table's order.</p>" + thumbnails)
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


def stability_section(run: Run, figs: _Figures) -> tuple[str, str, str] | None:
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


# The built-in families' sections, until their registrations carry them (``Family.report``; the built-in
# declarations live in gradwatch/metrics/, edited elsewhere at the time): looked up by the family's own stem
# only for a family that declares no hook. Nothing else in the report names a family.
_GENERIC_MOST_TAGS = 24


def generic_section(family: Any, run: Run, figs: _Figures) -> tuple[str, str, str] | None:
    """The section of a family without a report hook: its ``<stem>/`` scalars as small multiples (per-layer tags
    beyond the first few are counted, not drawn)."""
    tags = run.tags(f"{family.stem}/")
    if not tags:
        return None
    shown = tags[:_GENERIC_MOST_TAGS]
    title = (family.summary or family.key).strip()
    fig = _small_multiples(run, shown, f"{family.stem} scalars", strip=f"{family.stem}/")
    parts = [figs.save(fig, f"{family.stem}_scalars", f"{family.stem} scalars per step: " + ", ".join(shown))]
    if len(tags) > len(shown):
        parts.append(f'<p class="note">{len(tags) - len(shown)} more {_esc(family.stem)}/ tags are not drawn '
                     f"({_esc(', '.join(tags[len(shown):len(shown) + 5]))}, ...).</p>")
    return _section(family.stem, title[:1].upper() + title[1:], parts)


def family_sections(run: Run, figs: _Figures) -> list[tuple[str, str, str] | None]:
    """One section per registered family, in registration order: its ``Family.report`` hook, else the
    generic section."""
    from gradwatch.registry import families

    out = []
    for fam in families():
        hook = fam.report_hook()
        out.append(hook(run, figs) if hook is not None else generic_section(fam, run, figs))
    return out


def write_report(run: Run, out: str | os.PathLike) -> Path:
    """Write ``out/index.html`` and ``out/figures/*.png`` for ``run``; returns the page's path."""
    out = Path(out)
    figs = _Figures(out)
    built = [*family_sections(run, figs), _alerts_section(run), _overhead_section(run, figs)]
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


def write_comparison(run_a: Run, run_b: Run, comparisons: Sequence[Comparison], out: str | os.PathLike) -> Path:
    """Write ``out/index.html`` (the RD table and both runs' per-layer curves), ``out/figures/*.png`` and
    ``out/compare.json``; returns the page's path."""
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
        fig = _layer_profile_figure(c, run_a.name, run_b.name)
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
