"""The ``score-data`` subcommand of ``gradwatch``, and ``compare`` of two scorings (wired into gradwatch.cli)."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

PROG = "gradwatch"


def add_score_data_parser(commands: Any) -> argparse.ArgumentParser:
    p = commands.add_parser(
        "score-data", help="score a dataset by per-example gradient spectra (data quality)",
        description=textwrap.fill(
            "Score every example of a dataset by the singular-value spectra of its own gradient (Li et al. 2024, "
            "2025): per example and per q/k/v/o and MLP matrix of every transformer block, the nuclear norm, "
            "effective rank, spectral norm, stable rank and Frobenius norm, and their means per layer group (all, "
            "q, k, v, o, mlp, and early/middle/late thirds of the blocks). Writes scores.jsonl (and scores.parquet "
            "with pyarrow), summary.json, ranking.jsonl and index.html into OUT. Stopped, it resumes where it was "
            "when run again with the same arguments; the same dataset scored twice gives identical files.",
            width=100),
        epilog="dataset formats (JSONL one object a line, or a `datasets` save_to_disk folder):\n"
               '  {"instruction": ..., "response": ...}   (also prompt/question, output/completion/answer, input)\n'
               '  {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}\n\n'
               "loss: causal LMs: mean cross-entropy over the response tokens only; encoders (BERT, MiniLM):\n"
               "  1 - cos(mean-pooled prompt, mean-pooled response)\n\n"
               f"examples:\n  {PROG} score-data ./my-model data.jsonl -o scores/data\n"
               f"  {PROG} compare scores/clean scores/noisy",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="a local Hugging Face model folder (config, weights, tokenizer)")
    p.add_argument("dataset", metavar="DATASET", help="a JSONL file or a `datasets` save_to_disk folder")
    p.add_argument("-o", "--out", metavar="OUT", default=None,
                   help="output directory (default: ./gradwatch-scores/<dataset name>)")
    p.add_argument("--split", default=None, help="the split of a DatasetDict folder (default: train)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="score the first N examples only")
    p.add_argument("--objective", choices=("causal_lm", "pair_cosine"), default=None,
                   help="the per-example loss (default: causal_lm for a model with a causal-LM head, else pair_cosine)")
    p.add_argument("--max-length", type=int, default=512, metavar="N", help="tokens per example at most (default 512)")
    p.add_argument("--max-memory-mb", type=float, default=1024.0, metavar="MB",
                   help="cap on a chunk's per-example gradients and activations (estimated; default 1024)")
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="examples per chunk (overrides the cap; 1: one example at a time)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="the model's dtype")
    p.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda, cuda:1, ...; default cpu)")
    p.add_argument("--rank-by", default="effective_rank/all", metavar="STAT/GROUP",
                   help="what the ranking orders by (default effective_rank/all; stats: nuclear_norm, effective_rank, "
                        "spectral_norm, stable_rank, frobenius_norm; "
                        "or 'loss')")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="torch threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-figures", action="store_true", help="no index.html and figures")
    p.set_defaults(handler=score_data_command)
    return p


def _error(message: str) -> int:
    print(message, file=sys.stderr)
    return 2


def score_data_command(ns: argparse.Namespace) -> int:
    from gradwatch.scoring.data import load_examples
    from gradwatch.scoring.hf import load_model
    from gradwatch.scoring.score import ScoringOptions, format_summary, score_dataset

    name = f"{PROG} score-data"
    try:
        if ns.limit is not None and ns.limit < 1:
            raise ValueError(f"--limit expected an int >= 1, got {ns.limit}")
        if ns.threads is not None and ns.threads < 1:
            raise ValueError(f"--threads expected an int >= 1, got {ns.threads}")
        examples = load_examples(ns.dataset, ns.split, ns.limit)  # every record parsed before any is scored
        options = ScoringOptions(objective=ns.objective, max_length=ns.max_length, max_memory_mb=ns.max_memory_mb,
                                 batch_size=ns.batch_size, rank_by=ns.rank_by)
        if ns.threads is not None:
            import torch

            torch.set_num_threads(ns.threads)
        model, tokenizer, objective = load_model(ns.model, ns.objective, ns.dtype, ns.device)
        options = ScoringOptions(**{**options.__dict__, "objective": objective})
        out = ns.out or os.path.join("gradwatch-scores", Path(ns.dataset.rstrip("/\\")).stem)
        result = score_dataset(model, tokenizer, examples, out, options, model_name=str(Path(ns.model).resolve()),
                               dataset_name=str(Path(ns.dataset).resolve()), progress=not ns.no_progress, figures=not ns.no_figures)
    except ValueError as error:
        return _error(f"{name}: {str(error).removeprefix('gradwatch score-data: ')}")
    except OSError as error:
        return _error(f"{name}: {error}")
    s = result.summary
    print(f"{name}: {s['scored']} of {s['examples']} examples scored ({result.resumed} from before, {result.scored_now} "
          f"now in {result.seconds:.1f} s{f', {result.examples_per_second:.2f} examples/s' if result.scored_now else ''}); "
          f"{objective} loss, {len(s['matrices'])} matrices")
    if s["failed"]:
        print(f"{name}: {len(s['failed'])} examples not scored, e.g. {s['failed'][0]['error']}")
    print("\nmean over examples, per layer group:")
    print(format_summary(s))
    print(f"\n{name}: wrote {result.out_dir}/ (scores.jsonl, summary.json, ranking.jsonl"
          f"{', scores.parquet' if (result.out_dir / 'scores.parquet').is_file() else ''}"
          f"{', index.html' if (result.out_dir / 'index.html').is_file() else ''})")
    return 0


def compare_scorings_command(ns: argparse.Namespace) -> int:
    from gradwatch.scoring.compare import compare_scorings, format_differences, load_scoring

    try:
        a, b = load_scoring(ns.run_a), load_scoring(ns.run_b)
        diffs = compare_scorings(a, b)
    except ValueError as error:
        return _error(f"{PROG} compare: {error}")
    print(format_differences(diffs, a, b))
    return 0
