"""Static reports from a run directory: reading gradwatch's TensorBoard scalars and JSONL records back,
the figures (PNG, matplotlib's Agg canvas), the HTML pages of ``gradwatch report`` and ``gradwatch compare``.

A *run directory* is the directory a trainer's TensorBoard writer logs to (``lightning_logs/version_0``,
HF's ``output_dir/runs/<run>``), or any directory above exactly one such directory with gradwatch's tags.
It holds the event files (scalar tags under each registered family's stem, ``grad_spectrum/<stat>/<param>``,
``sharpness/...``, ``moe/...``, and ``gradwatch/overhead``) and the records ``signals.jsonl`` and ``alerts.jsonl``.
Each family's section of the report is its ``Family.report`` hook (or a generic one): the page names no family.

Run comparison (``gradwatch compare``) follows the seed papers: each statistic's per-layer averages over the two
runs and their relative difference RD; the formula is in :mod:`gradwatch.integrations.report.compare`.

The package: :mod:`~gradwatch.integrations.report.runs` reads run directories,
:mod:`~gradwatch.integrations.report.compare` compares two runs,
:mod:`~gradwatch.integrations.report.plots` draws the figures and
:mod:`~gradwatch.integrations.report.page` writes the pages; every name below is importable from here.
"""

from gradwatch.integrations.report.compare import (
    Comparison,
    compare_runs,
    format_comparison_table,
    layer_means,
    relative_difference,
)
from gradwatch.integrations.report.page import family_sections, generic_section, write_comparison, write_report
from gradwatch.integrations.report.plots import LOG_SCALE_STATS
from gradwatch.integrations.report.runs import (
    PICTURE_TAGS,
    RECORD_FILES,
    SPECTRUM_ORDER,
    STABILITY_PER_LAYER,
    Run,
    RunDirError,
    Series,
    gradwatch_prefixes,
    layer_family,
    layer_matrix,
    load_run,
    natural_key,
    read_jsonl,
    read_scalars,
    spectrum_layers,
    spectrum_tag,
    stability_layers,
    tag_matrix,
)

__all__ = ["GRADWATCH_PREFIXES", "LOG_SCALE_STATS", "PICTURE_TAGS", "RECORD_FILES", "SPECTRUM_ORDER",
           "STABILITY_PER_LAYER", "Comparison", "Run", "RunDirError", "Series", "compare_runs", "family_sections",
           "format_comparison_table", "generic_section", "gradwatch_prefixes",
           "layer_family", "layer_matrix", "layer_means", "load_run", "natural_key",
           "read_jsonl", "read_scalars", "relative_difference", "spectrum_layers", "spectrum_tag", "stability_layers",
           "tag_matrix", "write_comparison", "write_report"]


def __getattr__(name: str) -> object:
    if name == "GRADWATCH_PREFIXES":  # derived from the registry when asked
        return gradwatch_prefixes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
