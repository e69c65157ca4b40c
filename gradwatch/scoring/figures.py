"""The page of figures of a scoring: ``index.html`` with, per statistic, each role's per-layer mean over the
examples and the distribution over examples of the ``all`` group, plus the ends of the ranking."""

from __future__ import annotations

import html
import importlib.util
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gradwatch.scoring.groups import ROLES


def matplotlib_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _per_layer_figure(path: Path, summary: Mapping[str, Any], run_matrices: Sequence[Mapping[str, Any]], stat: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    means = summary["per_layer"][stat]
    for role in ROLES:
        pts = [(m["block"], means[j]) for j, m in enumerate(run_matrices) if m["role"] == role and means[j] is not None]
        if not pts:
            continue
        blocks = sorted({b for b, _ in pts})
        ys = [sum(v for b2, v in pts if b2 == b) / sum(1 for b2, _ in pts if b2 == b) for b in blocks]
        ax.plot(blocks, ys, marker="o", label=role)
    ax.set_xlabel("block")
    ax.set_ylabel(f"mean {stat}")
    if stat in ("nuclear_norm", "spectral_norm", "frobenius_norm"):
        ax.set_yscale("log")
    ax.legend(fontsize=7, ncol=5)
    ax.set_title(f"{stat} per layer (mean over examples)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_page(out: Path, summary: Mapping[str, Any], ranked: Sequence[Mapping[str, Any]], ends: int = 5) -> Path:
    """Write ``out/index.html`` and its PNG figures; returns the page's path."""
    import json

    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    parts = [f"<html><head><meta charset='utf-8'><title>gradwatch score-data</title></head><body>"
             f"<h1>gradwatch score-data</h1><p>model {html.escape(str(summary['model']))}, dataset "
             f"{html.escape(str(summary['dataset']))}: {summary['scored']} of {summary['examples']} examples scored "
             f"({summary['objective']} loss)</p>"]
    for stat in summary["per_layer"]:
        name = f"per_layer_{stat}.png"
        _per_layer_figure(out / name, summary, run["matrices"], stat)
        parts.append(f"<h2>{stat}</h2><img src='{name}'>")
        row = summary["groups"][stat]
        cells = "".join(f"<tr><td>{g}</td><td>{s.get('mean', math.nan):.5g}</td><td>{s.get('p10', math.nan):.5g}</td>"
                        f"<td>{s.get('median', math.nan):.5g}</td><td>{s.get('p90', math.nan):.5g}</td></tr>"
                        for g, s in row.items() if "/" not in g)
        parts.append(f"<table border=1><tr><th>group</th><th>mean</th><th>p10</th><th>median</th><th>p90</th></tr>{cells}</table>")
    if ranked:
        by = html.escape(str(ranked[0]["by"]))

        def rows(items: Sequence[Mapping[str, Any]]) -> str:
            return "".join(f"<tr><td>{r['rank']}</td><td>{r['index']}</td><td>{r['value']}</td>"
                           f"<td>{html.escape(str(r['prompt']))}</td><td>{html.escape(str(r['response']))}</td></tr>"
                           for r in items)

        head = "<tr><th>rank</th><th>index</th><th>value</th><th>prompt</th><th>response</th></tr>"
        parts.append(f"<h2>ranking by {by}: first {ends}</h2><table border=1>{head}{rows(ranked[:ends])}</table>")
        parts.append(f"<h2>last {ends}</h2><table border=1>{head}{rows(ranked[-ends:])}</table>")
    parts.append("</body></html>")
    page = out / "index.html"
    page.write_text("\n".join(parts), encoding="utf-8")
    return page
